import random

import numpy as np
import pytest
import torch

from fastrlhf import checkpoint


def test_save_load_round_trip_and_keep(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, {"seed": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    state, cfg = checkpoint.load(checkpoint.latest(tmp_path))
    assert state["step"] == 3 and torch.equal(state["w"], torch.full((2,), 3.0)) and cfg == {"seed": 3}


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"w": torch.ones(3)}, {})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt  # killed after the file is written, before the rename

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": torch.zeros(3)}, {})
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest(tmp_path).name == "checkpoint-1"
    state, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert torch.equal(state["w"], torch.ones(3))
    assert not (tmp_path / "checkpoint-2").exists()


def test_resave_same_step_replaces(tmp_path):
    checkpoint.save(tmp_path, 5, {"v": 1}, {})
    checkpoint.save(tmp_path, 5, {"v": 2}, {})
    assert checkpoint.load(tmp_path / "checkpoint-5")[0]["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]


def test_rng_states_round_trip():
    gens = {"py": random.Random(1), "torch": torch.Generator().manual_seed(2)}
    state = checkpoint.rng_state(gens)
    want = (random.random(), np.random.rand(), torch.rand(1).item(), gens["py"].random(),
            torch.rand(1, generator=gens["torch"]).item())
    checkpoint.set_rng_state(state, gens)
    got = (random.random(), np.random.rand(), torch.rand(1).item(), gens["py"].random(),
           torch.rand(1, generator=gens["torch"]).item())
    assert got == want


def test_trainable_state_only_trainable():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    m[0].requires_grad_(False)
    state = checkpoint.trainable_state(m)
    assert set(state) == {"1.weight", "1.bias"}
    with torch.no_grad():
        m[1].weight.zero_()
    checkpoint.load_trainable_state(m, state)
    assert torch.equal(m[1].weight, state["1.weight"])
    with pytest.raises(ValueError, match="do not match"):
        checkpoint.load_trainable_state(m, {"nope": torch.zeros(1)})


def test_load_rejects_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="state.pt"):
        checkpoint.load(tmp_path)
