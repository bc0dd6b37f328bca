"""The trainer on several processes (fastrlhf.distributed): 2 CPU processes on gloo.

One spawn (`two_ranks`) runs every in-process check on both ranks; the CLI tests launch
`torchrun --nproc_per_node 2 -m fastrlhf train` on a 1-layer built-in model."""
import dataclasses
import datetime
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastrlhf import config, distributed, metrics, ref, train
from fastrlhf.algos import RunningMoments
from fastrlhf.tasks import PromptListTask

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64", "--sft_steps", "0", "--eval_samples", "2", "--max_new_tokens", "3"]
LORA = ["--use_peft", "--lora_r", "4", "--lora_dropout", "0"]   # no dropout: the same forward on any rank
BENT = ["--batch_entropy_coef", "0.5"]   # p̄ over the whole mini-batch: every rank's micro-batches
WORLD, ROWS = 2, 8          # processes; rollout rows in all (ROWS // WORLD per rank)
# (per-rank flags, single-process flags): one optimizer step over the whole rollout, the 2-rank runs with
# half of it each, without and with gradient accumulation
SETTINGS = {
    "no_accumulation": (["--per_device_batch_size", "4"], ["--per_device_batch_size", "8"]),
    "accumulation": (["--per_device_batch_size", "2", "--gradient_accumulation_steps", "2"],
                     ["--per_device_batch_size", "8"]),
    "batch_entropy_accumulation": (["--per_device_batch_size", "2", "--gradient_accumulation_steps", "2", *BENT],
                                   ["--per_device_batch_size", "4", "--gradient_accumulation_steps", "2", *BENT]),
    "lora": (["--per_device_batch_size", "4", *LORA], ["--per_device_batch_size", "8", *LORA]),
    "fsdp_lora": (["--per_device_batch_size", "4", "--fsdp", *LORA], ["--per_device_batch_size", "8", *LORA]),
    "fsdp_accumulation": (["--per_device_batch_size", "2", "--gradient_accumulation_steps", "2", "--fsdp"],
                          ["--per_device_batch_size", "8"]),
}
# The first AdamW step moves a parameter by lr·g/(|g| + 1e-8): where |g| is near 1e-8 (batch entropy reaches every
# vocabulary row), fp32 summation-order noise in g moves it by up to ~1e-2·lr; lr 3e-5 keeps that under 1e-6
# (at the default 3e-4 one weight of 3200 of the batch-entropy run lands 6.5e-6 apart).
COMMON = [*TINY, "--num_mini_batches", "1", "--ppo_epochs", "1", "--num_threads", "1", "--device", "cpu",
          "--learning_rate", "3e-5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_inputs(rank: int):
    """Rank `rank`'s [2, T_r] tensor, mask and scores (T differs between ranks, as rollouts' widths do)."""
    g = torch.Generator().manual_seed(100 + rank)
    T = 3 + 2 * rank
    x = torch.randn(2, T, generator=g)
    mask = (torch.rand(2, T, generator=g) > 0.3).long()
    return x, mask, torch.randn(3 + rank, generator=g)


def _params(run):
    """The trainable parameters, whole (under --fsdp gathered from every rank's shard: a collective)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in run.bundle.trainable_parameters()]


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    out = {}
    with distributed.session(60, "cpu") as dist:
        x, mask, scores = _stat_inputs(rank)
        out["whiten"] = dist.whiten(x, mask)
        moments = distributed.GlobalMoments(dist)
        moments.update(scores)
        moments.update(scores * 2 + 1)
        out["moments"] = moments.state_dict()
        out["loss_tokens"] = dist.loss_tokens(mask.sum()).item()
        out["masked_mean"] = dist.masked_mean(x, mask).item()
        out["cat"] = dist.cat(torch.tensor([float(rank)]))
        out["average"] = dist.average({"a": float(rank)})
        roll = torch.load(Path(tmp) / "rollout.pt", weights_only=False)
        half = ROWS // WORLD
        for name, (flags, _) in SETTINGS.items():
            cfg = config.parse_args([*COMMON, *flags, "--output_dir", str(Path(tmp) / name)])
            run = train.setup(cfg, dist)
            run.parallel = run.parallel or distributed.wrap(dist, run.bundle)   # --fsdp: sharded by setup
            rows = roll.rows(torch.arange(rank * half, (rank + 1) * half))
            train.update(run, rows)
            out[name] = _params(run)
        # --fsdp checkpoint round trip: save, resume in a fresh sharded run, one more update on both
        run.step = 1
        train.checkpoint.save_run(run)
        resumed = train.setup(config.parse_args([*COMMON, *SETTINGS["fsdp_accumulation"][0], "--output_dir",
                                                 str(Path(tmp) / "fsdp_accumulation"), "--resume"]), dist)
        train.checkpoint.resume(resumed, "latest")
        out["resumed_before"] = _params(resumed)
        train.update(run, rows)
        train.update(resumed, rows)
        out["resumed_after"], out["continued_after"] = _params(resumed), _params(run)
    torch.save(out, Path(tmp) / f"rank{rank}.pt")


def _ragged(roll):
    """The rollout with responses of 1..3 tokens (rank 0's rows hold fewer tokens than rank 1's, so the loss
    normalizer matters) and advantages and returns drawn at random (an untrained policy scores 0 on every
    prompt, which leaves nothing to learn)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 1, 2, 1, 3, 2, 3, 3])
    mask = (torch.arange(roll.mask.shape[1])[None] < lengths[:, None]).long()
    attn = torch.cat([roll.attn[:, :roll.P], mask], 1)
    return dataclasses.replace(roll, mask=mask, attn=attn, advantages=torch.randn(mask.shape, generator=g) * mask,
                               returns=torch.randn(mask.shape, generator=g) * mask)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The single-process rollout and updates, and both ranks' results (`_worker`)."""
    tmp = tmp_path_factory.mktemp("dist")
    single = {}
    roll = None
    for name, (_, flags) in SETTINGS.items():
        cfg = config.parse_args([*COMMON, *flags, "--output_dir", str(tmp / f"single-{name}")])
        run = train.setup(cfg)
        if roll is None:   # one rollout for every setting and both process counts
            roll = _ragged(train.rollout(run, run.job.task.sample(ROWS, random.Random(0))))
            torch.save(roll, tmp / "rollout.pt")
        train.update(run, roll)
        single[name] = _params(run)
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks, roll


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_update_on_two_ranks_equals_one_process_on_the_whole_batch(two_ranks, setting):
    single, ranks, _ = two_ranks
    start = [p.detach() for p in train.setup(config.parse_args([*COMMON, *SETTINGS[setting][1], "--output_dir",
                                                                 "/nonexistent-fastrlhf"])).bundle.trainable_parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(single[setting], start))
    assert moved > 1e-5                                    # the update changed the weights
    for r in range(WORLD):
        for a, b in zip(single[setting], ranks[r][setting]):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_fsdp_checkpoint_resumes_the_sharded_weights_and_optimizer(two_ranks):
    _, ranks, _ = two_ranks
    for r in range(WORLD):
        for a, b in zip(ranks[r]["fsdp_accumulation"], ranks[r]["resumed_before"]):
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        for a, b in zip(ranks[r]["continued_after"], ranks[r]["resumed_after"]):   # Adam's moments came back
            torch.testing.assert_close(b, a, atol=0, rtol=0)
        assert any((a != b).any() for a, b in zip(ranks[r]["resumed_after"], ranks[r]["resumed_before"]))


def test_fsdp_refuses_what_it_cannot_shard(monkeypatch):
    base = [*TINY, "--output_dir", "/nonexistent-fastrlhf", "--fsdp"]
    with pytest.raises(ValueError, match=r"fsdp: bitsandbytes' quantized weights \(--ref_load_in_8bit\)"):
        config.parse_args([*base, "--ref_load_in_8bit"])
    with pytest.raises(ValueError, match="fsdp: bitsandbytes' 8-bit optimizers .* got 'adamw_8bit'"):
        config.parse_args([*base, "--optim", "adamw_8bit"])
    with pytest.raises(ValueError, match="fsdp: with --use_peft the warm start's reference .* got 5"):
        config.parse_args([*base, "--use_peft", "--sft_steps", "5"])
    with pytest.raises(ValueError, match="fsdp: expected several processes"):
        train.setup(config.parse_args(base))


def test_global_statistics_equal_the_concatenated_batch(two_ranks):
    _, ranks, _ = two_ranks
    xs, masks, scores = zip(*(_stat_inputs(r) for r in range(WORLD)))
    # whitening: ref.whiten over every rank's valid tokens at once (widths differ: flatten the valid ones)
    flat_x = torch.cat([x[m.bool()] for x, m in zip(xs, masks)])
    want = ref.whiten(flat_x[None], torch.ones_like(flat_x)[None].long())[0]
    got = torch.cat([ranks[r]["whiten"][masks[r].bool()] for r in range(WORLD)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for r in range(WORLD):
        assert (ranks[r]["whiten"][~masks[r].bool()] == 0).all()
    # float64 formula of the whitening
    v = flat_x.double().numpy()
    np.testing.assert_allclose(got.double().numpy(), (v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-8), atol=1e-6)
    # reward moments: two updates of every rank's scores = one process fed the concatenations
    single = RunningMoments()
    single.update(torch.cat(scores))
    single.update(torch.cat(scores) * 2 + 1)
    all_scores = torch.cat([torch.cat(scores), torch.cat(scores) * 2 + 1]).double().numpy()
    for r in range(WORLD):
        m = ranks[r]["moments"]
        assert m["count"] == single.count == len(all_scores)
        assert m["mean"] == pytest.approx(single.mean, abs=1e-12) == pytest.approx(all_scores.mean(), abs=1e-12)
        assert m["var"] == pytest.approx(single.var, abs=1e-12) == pytest.approx(all_scores.var(), abs=1e-12)
        # the loss normalizer: world_size × it = every rank's tokens
        assert ranks[r]["loss_tokens"] * WORLD == sum(int(mk.sum()) for mk in masks)
        assert ranks[r]["masked_mean"] == pytest.approx(flat_x.double().mean().item(), abs=1e-6)
        assert ranks[r]["cat"].tolist() == [0.0, 1.0]
        assert ranks[r]["average"] == {"a": 0.5}


def test_shard_task_and_stream_seed_split_the_data():
    prompts = [f"p{i}" for i in range(5)]
    shards = [distributed.shard_task(PromptListTask(prompts), distributed.Dist(rank=r, world_size=2))
              for r in range(2)]
    assert [list(s.prompts) for s in shards] == [["p0", "p2", "p4"], ["p1", "p3"]]
    assert distributed.shard_task(PromptListTask(prompts), distributed.Dist()).prompts == prompts
    with pytest.raises(ValueError, match="prompts: 1 prompt"):
        distributed.shard_task(PromptListTask(["a"]), distributed.Dist(rank=1, world_size=2))
    assert distributed.stream_seed(distributed.Dist(), 7) == 7
    assert distributed.stream_seed(distributed.Dist(rank=1, world_size=2), 7) == 7 + distributed.STREAM_OFFSET


# ----------------------------------------------------------------------------------------------------
# The CLI under torchrun
# ----------------------------------------------------------------------------------------------------

def _torchrun(out, *extra, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(_free_port()), "-m", "fastrlhf", "train", *TINY, "--per_device_batch_size", "2",
           "--output_dir", str(out), "--dist_timeout_s", "60", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _descendants(pid: int) -> list:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


TIMING = ("tokens_per_s", "step_time_s", "peak_mem_mib")


def _rows(out):
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("memory/")}
            for r in metrics.read_metrics(out / "metrics.jsonl")]


@pytest.mark.slow
def test_torchrun_trains_writes_one_metrics_file_and_resumes_after_sigkill(tmp_path):
    flags = ["--max_steps", "4", "--save_steps", "2", "--log_samples", "8", "--partial_credit", "--sft_steps", "30",
             "--sft_batch_size", "16",   # the warm start (the same on both ranks) gives rewards to learn from
             "--adaptive_kl", "--kl_coef", "0.1", "--kl_target", "0.01"]
    whole = tmp_path / "whole"
    res = _torchrun(whole, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = metrics.read_metrics(whole / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(r["world_size"] == WORLD for r in recs)
    assert any(r["reward_mean"] > 0 for r in recs) and any(r["loss"] != 0 for r in recs)
    assert sorted(p.name for p in whole.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2",
                                                                                             "checkpoint-4"]
    assert (whole / "summary.json").is_file() and (whole / "curves.png").is_file()
    samples = metrics.read_metrics(whole / "samples.jsonl")
    rows = WORLD * 2                                      # both ranks' rows (per_device_batch_size 2 each)
    assert [s["step"] for s in samples] == [t for t in range(1, 5) for _ in range(rows)]
    beta = 0.1
    for r in recs:                                        # global metrics and the KL controller's global input
        rewards = [s["reward"] for s in samples if s["step"] == r["step"]]
        assert r["reward_mean"] == pytest.approx(sum(rewards) / rows, abs=1e-6)
        beta *= 1 + min(max(r["kl"] / 0.01 - 1, -0.2), 0.2) * rows / 10000
        assert r["kl_coef"] == pytest.approx(beta, rel=1e-12)

    # the same run, killed (SIGKILL: the launcher and both ranks) once checkpoint-2 exists, then resumed
    killed = tmp_path / "killed"
    proc = _torchrun(killed, *flags, "--save_steps", "1", "--max_steps", "40", wait=False)
    deadline = time.time() + 180
    while not (killed / "checkpoint-2" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() else ""
        time.sleep(0.2)
    for pid in reversed(_descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    res = _torchrun(killed, *flags, "--save_steps", "1", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr
    # --save_steps is resumable and --max_steps too: the rows equal the uninterrupted run's
    assert _rows(killed) == _rows(whole)


@pytest.mark.slow
def test_torchrun_fsdp_exits_non_zero_with_the_failing_ranks_message(tmp_path):
    """Under --fsdp: step 1 completes (sharded rollout, update, metrics, a checkpoint gathered to rank 0),
    then rank 1's reward raises in step 2 (its third call: the held-out score is the first)."""
    reward = tmp_path / "reward.py"
    reward.write_text("import os\n\ncalls = []\n\ndef fn(prompts, responses):\n    calls.append(1)\n"
                      "    if os.environ['RANK'] == '1' and len(calls) == 3:\n"
                      "        raise RuntimeError('reward server unreachable from rank 1')\n"
                      "    return [0.0] * len(responses)\n")
    out = tmp_path / "run"
    t0 = time.time()
    res = _torchrun(out, "--max_steps", "3", "--save_steps", "1", "--fsdp", "--reward", f"{reward}:fn")
    assert res.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: reward server unreachable from rank 1" in res.stderr
    assert time.time() - t0 < 200       # no hang until the collective timeout
    assert [r["step"] for r in metrics.read_metrics(out / "metrics.jsonl")] == [1]
    state, _ = train.checkpoint.load(out / "checkpoint-1")
    assert state["world_size"] == WORLD and len(state["rank_rng"]) == WORLD
    assert set(state["policy"]) == {n for n, p in train.setup(config.parse_args(
        [*TINY, "--output_dir", "/nonexistent-fastrlhf"])).bundle.policy.named_parameters()}


def test_resume_on_another_world_size_fails_clearly(tmp_path):
    out = tmp_path / "run"
    assert train.main([*TINY, "--max_steps", "1", "--per_device_batch_size", "2", "--output_dir", str(out)]) == 0
    cfg = config.parse_args([*TINY, "--max_steps", "2", "--per_device_batch_size", "2", "--output_dir", str(out),
                             "--resume"])
    run = train.setup(cfg, distributed.Dist(rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"written by 1 process\(es\), this run has 2"):
        train.checkpoint.resume(run, "latest")
    assert dataclasses.is_dataclass(run.dist)


def test_session_passes_dist_timeout_s_and_reports_the_failing_rank(monkeypatch, capsys):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: seen.update(destroyed=True))
    cfg = config.parse_args([*TINY, "--dist_timeout_s", "12.5", "--output_dir", "/nonexistent-fastrlhf"])
    with pytest.raises(RuntimeError, match="boom"):
        with distributed.session(cfg.dist_timeout_s, "cpu") as dist:
            assert (dist.rank, dist.world_size, dist.local_rank) == (1, 2, 1)
            raise RuntimeError("boom")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=12.5), "destroyed": True}
    assert "fastrlhf train: rank 1 of 2 failed: RuntimeError: boom" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")             # one process: no group, nothing printed
    with distributed.session(1.0) as dist:
        assert not dist.active and dist.is_main
    assert "destroyed" in seen and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="dist_timeout_s: expected a number > 0, got 0.0"):
        config.parse_args([*TINY, "--dist_timeout_s", "0", "--output_dir", "/nonexistent-fastrlhf"])
