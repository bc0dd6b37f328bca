import hashlib
import json
import os
import random
import re

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


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    """Unpickling this calls open(marker, "w"): code a crafted state.pt would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_load_refuses_a_state_that_runs_code(tmp_path):
    path = checkpoint.save(tmp_path, 1, {"w": torch.ones(2)}, {})
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "x": _Payload(marker)}, path / "state.pt")
    # a forged checkpoint comes with a manifest that matches it
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {"size": (path / "state.pt").stat().st_size,
                                     "sha256": _sha256(path / "state.pt")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(path) is None
    with pytest.raises(ValueError, match=re.escape(str(path / "state.pt")) + ".*tensors and plain data"):
        checkpoint.load(path)
    assert not marker.exists()
    torch.load(path / "state.pt", weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def test_save_refuses_a_state_the_loader_would_refuse(tmp_path):
    with pytest.raises(ValueError, match=r"state\['rng'\]\[1\]: .*numpy.ndarray"):
        checkpoint.save(tmp_path, 1, {"rng": ("MT19937", np.zeros(3))}, {})
    with pytest.raises(ValueError, match=r"state\['lr'\]: .*numpy.float64"):
        checkpoint.save(tmp_path, 1, {"lr": np.float64(1e-3)}, {})   # a float subclass pickles as numpy's
    assert list(tmp_path.iterdir()) == []


def test_rng_states_survive_a_weights_only_save_and_load(tmp_path):
    gens = {"py": random.Random(1), "torch": torch.Generator().manual_seed(2)}
    np.random.rand(3)  # numpy's state with a cached position that is not 624
    np.random.randn()  # ... and a cached gaussian
    checkpoint.save(tmp_path, 1, {"rng": checkpoint.rng_state(gens)}, {})
    want = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item(), gens["py"].random(),
            torch.rand(1, generator=gens["torch"]).item())
    state, _ = checkpoint.load(tmp_path / "checkpoint-1")
    checkpoint.set_rng_state(state["rng"], gens)
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(1).item(), gens["py"].random(),
           torch.rand(1, generator=gens["torch"]).item())
    assert got == want


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _scramble(f):
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])  # same size, different bytes
    f.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated state.pt": (lambda p: _truncate(p / "state.pt"), r"state.pt is \d+ bytes, manifest.json says"),
    "empty state.pt": (lambda p: (p / "state.pt").write_bytes(b""), r"state.pt is 0 bytes"),
    "scrambled state.pt": (lambda p: _scramble(p / "state.pt"), r"state.pt does not match the sha256"),
    "cut config.json": (lambda p: _truncate(p / "config.json"), r"config.json is \d+ bytes"),
    "missing manifest": (lambda p: (p / "manifest.json").unlink(), r"manifest.json is missing"),
    "cut manifest": (lambda p: _truncate(p / "manifest.json"), r"manifest.json is unreadable"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_is_skipped_for_the_newest_intact(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"step": step, "w": torch.randn(64)}, {"seed": step, "name": "x" * 40})
    corrupt(tmp_path / "checkpoint-2")
    assert checkpoint.verify(tmp_path / "checkpoint-1") is None
    assert re.search(reason, checkpoint.verify(tmp_path / "checkpoint-2"))
    warned = re.escape(str(tmp_path / "checkpoint-2")) + ".*" + reason
    with pytest.warns(UserWarning, match=warned):
        assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint-1"
    with pytest.warns(UserWarning, match=warned):
        assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1"]
    assert checkpoint.load(tmp_path / "checkpoint-1")[0]["step"] == 1
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "checkpoint-2")) + ".*" + reason):
        checkpoint.load(tmp_path / "checkpoint-2")


def test_all_corrupt_means_no_checkpoint(tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, {"step": step}, {})
    (tmp_path / "checkpoint-1" / "state.pt").write_bytes(b"")
    _scramble(tmp_path / "checkpoint-2" / "state.pt")
    with pytest.warns(UserWarning) as record:
        assert checkpoint.latest(tmp_path) is None
    assert ["checkpoint-2" in str(w.message) for w in record] == [True, False]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "checkpoint-1" / "state.pt")) + " is 0 bytes"):
        checkpoint.load(tmp_path / "checkpoint-1")


def test_keep_never_prunes_the_last_intact_checkpoints(tmp_path):
    checkpoint.save(tmp_path, 1, {"step": 1}, {}, keep=2)
    checkpoint.save(tmp_path, 2, {"step": 2}, {}, keep=2)
    _truncate(tmp_path / "checkpoint-2" / "state.pt")
    checkpoint.save(tmp_path, 3, {"step": 3}, {}, keep=2)   # keeps 3 and 1: 2 does not count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    checkpoint.save(tmp_path, 4, {"step": 4}, {}, keep=2)   # keeps 4 and 3, the rest goes, corrupt or not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    with pytest.raises(ValueError, match="keep: expected None or an int >= 1, got 0"):
        checkpoint.save(tmp_path, 5, {}, {}, keep=0)


def test_next_save_removes_what_a_killed_save_left(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 1, {"w": torch.ones(3)}, {})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": torch.zeros(3)}, {})
    monkeypatch.setattr(torch, "save", real_save)
    assert any(p.name.startswith(".tmp-checkpoint-2-") for p in tmp_path.iterdir())
    checkpoint.save(tmp_path, 3, {"w": torch.zeros(3)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_clean_partial_restores_a_resave_killed_between_its_renames(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 4, {"v": 0}, {})
    checkpoint.save(tmp_path, 5, {"v": 1}, {})
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:       # checkpoint-5 -> .old-checkpoint-5 done; killed before tmp -> checkpoint-5
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 5, {"v": 2}, {})
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "checkpoint-5").exists() and (tmp_path / ".old-checkpoint-5").is_dir()
    (tmp_path / ".old-checkpoint-4").mkdir()   # a stale copy next to its checkpoint: removed
    checkpoint.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert checkpoint.load(tmp_path / "checkpoint-5")[0]["v"] == 1
    assert checkpoint.load(tmp_path / "checkpoint-4")[0]["v"] == 0
    checkpoint.clean_partial(tmp_path / "nothing")   # no output dir yet: nothing to do
