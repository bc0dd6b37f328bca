"""fastrlhf.optim: every `--optim` choice takes a step of about lr; bad names and no trainable
parameters are errors."""
import pytest
import torch
from torch import nn

from fastrlhf.optim import make_optimizer


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit"])
def test_optimizers_step(name):
    w = nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: bitsandbytes keeps 8-bit states
    opt = make_optimizer([w], name, lr=1e-2)
    before = w.detach().clone()
    w.grad = torch.randn_like(w)
    opt.step()
    assert not torch.equal(before, w)
    assert (w - before).abs().max() < 0.05  # an Adam step moves each weight by about lr


def test_optimizer_errors():
    with pytest.raises(ValueError, match="optim: expected one of"):
        make_optimizer([nn.Parameter(torch.zeros(2))], "sgd")
    with pytest.raises(ValueError, match="params"):
        make_optimizer([torch.zeros(2)], "adamw_torch")
