import json
import os

import pytest

from fastrlhf import metrics


def _record(step):
    return {k: float(step) for k in metrics.REQUIRED} | {"step": step}


def _log(out, steps, start_step=0):
    log = metrics.MetricsLogger(out, start_step=start_step)
    for s in steps:
        log.log(_record(s))
    log.close()
    return log


@pytest.mark.parametrize("tail", [b'{"step": 3, "reward_me', b'{"step": 3}', b"\x00\x00\x00\x00\n"],
                         ids=["cut mid-line", "newline missing", "zeros after a crash"])
def test_torn_last_line_is_skipped_then_overwritten(tmp_path, tail):
    _log(tmp_path, [1, 2])
    path = tmp_path / "metrics.jsonl"
    with open(path, "ab") as f:
        f.write(tail)   # a kill during the append of step 3
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2]
    _log(tmp_path, [3], start_step=2)   # the resume from checkpoint-2
    text = path.read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3]   # valid JSONL again


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n" + '{"step": 2, "re\n' + json.dumps(_record(3)) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: expected one JSON object per line"):
        metrics.read_metrics(path)
    path.write_text(json.dumps(_record(1)) + "\n\n[1, 2]\n" + '{"step": 4')   # a torn tail after it: still an error
    with pytest.raises(ValueError, match=f"{path}:3: .*got a JSON list"):
        metrics.read_metrics(path)


def test_killed_rewrite_leaves_the_old_file(tmp_path, monkeypatch):
    _log(tmp_path, [1, 2, 3])
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLogger(tmp_path, start_step=1)   # a resume from checkpoint-1 truncates to step 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]   # no temporary file left
    monkeypatch.undo()
    assert [r["step"] for r in _log(tmp_path, [2], start_step=1).records] == [1, 2]
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2]
