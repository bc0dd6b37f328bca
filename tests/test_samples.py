"""`<output_dir>/samples.jsonl` (fastrlhf.metrics.SampleLogger): a few (prompt, response, reward) per step,
line-atomic, cut back to the resumed step on --resume."""
import json

import pytest

from fastrlhf import metrics, train
from fastrlhf.rewards import arithmetic_reward

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]


def small(out, *extra):
    return ["--output_dir", str(out), "--per_device_batch_size", "4", "--sft_steps", "0", "--eval_samples", "4",
            "--max_new_tokens", "3", *TINY, *extra]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_logger_keeps_n_per_step_and_cuts_back_on_resume(tmp_path):
    log = metrics.SampleLogger(tmp_path, 2)
    log.log(1, ["p1", "p2", "p3"], ["r1", "r2", "r3"], [0.5, 1, 0.0])
    log.log(2, ["q1"], ["s1"], [0.25])
    assert lines(tmp_path / "samples.jsonl") == [
        {"step": 1, "prompt": "p1", "response": "r1", "reward": 0.5},
        {"step": 1, "prompt": "p2", "response": "r2", "reward": 1.0},
        {"step": 2, "prompt": "q1", "response": "s1", "reward": 0.25}]
    with open(tmp_path / "samples.jsonl", "a") as f:   # a kill in the middle of step 3's write
        f.write('{"step": 3, "prompt": "x", "resp')
    metrics.SampleLogger(tmp_path, 2, start_step=1)   # resume at step 1: steps 2 and the torn line go
    assert [r["step"] for r in lines(tmp_path / "samples.jsonl")] == [1, 1]
    metrics.SampleLogger(tmp_path / "off", 0).log(1, ["p"], ["r"], [1.0])
    assert not (tmp_path / "off").exists()
    with pytest.raises(ValueError, match="log_samples"):
        metrics.SampleLogger(tmp_path, -1)


def test_train_writes_samples_and_resume_matches_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--save_steps", "2", "--log_samples", "3", "--seed", "3"]
    assert train.main(small(full, *common, "--max_steps", "3")) == 0
    got = lines(full / "samples.jsonl")
    assert [r["step"] for r in got] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for r in got:   # each reward is the arithmetic reward of its prompt and response
        assert r["reward"] == arithmetic_reward([r["prompt"]], [r["response"]])[0]
    # a run that went on to step 3, resumed from its step-2 checkpoint: step 3's samples are written once
    assert train.main(small(part, *common, "--max_steps", "3")) == 0
    assert train.main(small(part, *common, "--max_steps", "3", "--resume", str(part / "checkpoint-2"))) == 0
    assert lines(part / "samples.jsonl") == got
    # --overwrite_output_dir removes the old file; --log_samples 0 writes none
    assert train.main(small(full, "--max_steps", "1", "--log_samples", "0", "--overwrite_output_dir")) == 0
    assert not (full / "samples.jsonl").exists()
