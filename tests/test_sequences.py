"""Padding and position ids (README, "Sequence layout"): `pad_rows`, `position_ids`, and that generation and
the scoring pass give every token the same position id."""
import pytest
import torch

from fastrlhf.generation import generate
from fastrlhf.passes import sequence_hidden_states
from fastrlhf.sequences import pad_rows, position_ids

transformers = pytest.importorskip("transformers")

ROWS = [[5, 6, 7], [8], []]


def test_pad_rows_left_and_right():
    ids, mask = pad_rows(ROWS, 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_rows(ROWS, 9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_pad_rows_width():
    ids, mask = pad_rows(ROWS, 0, side="left", width=5)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8], [0, 0, 0, 0, 0]]
    assert mask.sum(1).tolist() == [3, 1, 0]
    ids, _ = pad_rows(ROWS, 0, side="right", width=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]


def test_pad_rows_errors():
    with pytest.raises(ValueError, match=r"width: expected >= the longest row \(3\), got 2"):
        pad_rows(ROWS, 0, side="left", width=2)
    with pytest.raises(ValueError, match="side"):
        pad_rows(ROWS, 0, side="center")


def test_pad_rows_empty():
    ids, mask = pad_rows([], 0, side="right")
    assert ids.shape == mask.shape == (0, 0)
    ids, mask = pad_rows([[], []], 0, side="left")
    assert ids.shape == mask.shape == (2, 0)
    ids, mask = pad_rows([[], []], 3, side="left", width=2)
    assert ids.tolist() == [[3, 3], [3, 3]] and mask.tolist() == [[0, 0], [0, 0]]


def test_position_ids_count_valid_tokens_and_give_pads_one():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 1, 1, 1, 0]]
    assert position_ids(mask.bool()).dtype == torch.long


def _tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    seen = []   # the position_ids of every forward of the trunk, as the model receives them
    model.model.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["position_ids"].clone()),
                                          with_kwargs=True)
    return model, seen


@pytest.mark.parametrize("stop_early", [False, True])
def test_generation_and_the_scoring_pass_use_position_ids(stop_early):
    """Trap: a pass that counts positions over the padded row (or gives pads another id) sees the
    response at other positions than generation did, so its log-probs are not the sampler's."""
    model, seen = _tiny_llama()
    prompts, prompt_mask = pad_rows([[3, 4, 5, 6], [7, 8], [9]], 0, side="left")
    N, P = 5, prompts.shape[1]
    eos = None
    if stop_early:   # row 0 stops after its first (greedy) token: the rollout then has response padding
        eos = int(generate(model, prompts, prompt_mask, max_new_tokens=1, temperature=0.0).sequences[0, P])
    seen.clear()
    gen = generate(model, prompts, prompt_mask, max_new_tokens=N, temperature=0.0, eos_token_id=eos,
                   pad_token_id=0)
    n = gen.response_mask.shape[1]
    attn = torch.cat([prompt_mask, gen.response_mask], 1)                        # the rollout's [B, P+n]
    if stop_early:
        assert gen.response_mask[0].tolist() == [1] + [0] * (n - 1)
    # generation: the prefill [B, P], then one [B, 1] per decode step; the last drawn token is not fed back
    fed = torch.cat(seen, 1)[:, :P + n - 1]
    want = position_ids(attn)[:, :P + n - 1]
    valid = attn[:, :P + n - 1] == 1
    assert torch.equal(fed[valid], want[valid])
    assert torch.equal(seen[0], position_ids(prompt_mask))                    # pads included: 1
    # the scoring pass over the whole rollout
    seen.clear()
    sequence_hidden_states(model, gen.sequences, attn)
    assert len(seen) == 1 and torch.equal(seen[0], position_ids(attn))
