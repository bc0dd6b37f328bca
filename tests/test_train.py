"""End-to-end runs of `fastrlhf train` / `fastrlhf eval` on a tiny model (CPU)."""
import dataclasses
import json
import math

import pytest
import torch

from fastrlhf import checkpoint, config, evaluate, metrics, train

# A 1-layer, 32-wide built-in Llama: every run below takes seconds.
TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]


def small(out, *extra):
    return ["--output_dir", str(out), "--max_steps", "2", "--per_device_batch_size", "4", "--sft_steps", "0",
            "--eval_samples", "4", "--max_new_tokens", "3", *TINY, *extra]


def records(out):
    return metrics.read_metrics(out / "metrics.jsonl")


def _check_records(recs, n):
    assert [r["step"] for r in recs] == list(range(1, n + 1))
    for r in recs:
        for k in metrics.REQUIRED:
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
        assert 0.0 <= r["reward_mean"] <= 1.0


REGULARIZERS = {
    "ppo": ["--kl_in", "loss", "--kl_estimator", "k3", "--kl_coef", "0.1", "--dual_clip", "3",
            "--cliprange_high", "0.28"],
    "ppo-max": ["--adaptive_kl", "--kl_coef", "0.1", "--kl_target", "0.01", "--score_scaling", "mean_std",
                "--report_to", "tensorboard"],
    "apa": ["--kl_in", "loss", "--kl_coef", "0.1", "--kl_estimator", "k2", "--optim", "adamw_8bit",
            "--critic_learning_rate", "1e-3"],
}


@pytest.mark.parametrize("algo", ["ppo", "ppo-max", "apa"])
def test_each_algorithm_with_every_regularizer(algo, tmp_path):
    ptx = tmp_path / "sft.txt"
    ptx.write_text("1+1=2\n2+3=5\n4+4=8\n")
    out = tmp_path / "run"
    argv = small(out, "--algo", algo, "--entropy_coef", "0.01", "--batch_entropy_coef", "0.01",
                 "--ptx_file", str(ptx), "--ptx_coef", "0.1", "--gradient_accumulation_steps", "2",
                 "--partial_credit", "--sft_steps", "2", *REGULARIZERS[algo])
    assert train.main(argv) == 0
    recs = records(out)
    _check_records(recs, 2)
    assert all(r["batch_entropy"] > 0 for r in recs)   # the mini-batch's, from the pre-pass (2 micro-batches)
    if algo == "ppo-max":
        assert recs[1]["kl_coef"] != 0.1          # the controller moved β
        assert list((out / "tensorboard").iterdir())
    state, cfg = checkpoint.load(checkpoint.latest(out))
    assert state["step"] == 2 and cfg["algo"] == algo
    assert (out / "curves.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_after"] is not None
    # the warm-start reset the reference to the warm-started policy: KL is exactly 0 before any update
    assert recs[0]["kl"] == 0.0


def test_lora_reference_starts_at_zero_kl_and_trains_only_the_adapter(tmp_path):
    out = tmp_path / "run"
    assert train.main(small(out, "--use_peft", "--lora_r", "4", "--gradient_checkpointing", "--max_steps", "1")) == 0
    recs = records(out)
    assert recs[0]["kl"] == 0.0
    state, _ = checkpoint.load(checkpoint.latest(out))
    assert state["policy"] and all("lora_" in k for k in state["policy"])


def test_logprobs_recomputed_under_the_sampling_temperature(tmp_path):
    """Trap: sampling at τ ≠ 1 with top-k/top-p and padded rows, then scoring the tokens at another
    temperature or over pads. The recomputed old log-probs must equal the sampler's, and the KL to the
    (identical) reference must be exactly 0 before any update."""
    out = tmp_path / "run"
    assert train.main(small(out, "--temperature", "0.7", "--top_k", "5", "--top_p", "0.9", "--max_steps", "1",
                            "--max_new_tokens", "5")) == 0
    rec = records(out)[0]
    assert rec["logprob_gap"] < 1e-4
    assert rec["kl"] == 0.0


def _strip(recs):
    timing = ("tokens_per_s", "step_time_s", "peak_mem_mib")
    return [{k: v for k, v in r.items() if k not in timing and not k.startswith("memory/")} for r in recs]


def test_resume_equals_uninterrupted(tmp_path):
    common = ["--algo", "ppo-max", "--sft_steps", "3", "--save_steps", "2", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(small(full, *common, "--max_steps", "4")) == 0
    assert train.main(small(part, *common, "--max_steps", "2")) == 0
    assert train.main(small(part, *common, "--max_steps", "4", "--resume")) == 0
    assert _strip(records(full)) == _strip(records(part))
    a, _ = checkpoint.load(full / "checkpoint-4")
    b, _ = checkpoint.load(part / "checkpoint-4")
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    assert torch.equal(a["value_head"]["weight"], b["value_head"]["weight"])
    assert a["moments"] == b["moments"] and a["kl_ctl"] == b["kl_ctl"]


def test_eval_scores_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(small(out, "--max_steps", "1")) == 0
    capsys.readouterr()
    assert evaluate.eval_main([str(out), "--eval_samples", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 1 and result["eval_samples"] == 8 and 0.0 <= result["reward_mean"] <= 1.0
    assert evaluate.eval_main([str(tmp_path / "nothing")]) == 2


def test_sentiment_prompts_file_with_user_callable(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The movie was"}\n{"prompt": "My day"}\n')
    fn = tmp_path / "r.py"
    fn.write_text("def n_chars(prompts, responses):\n    return [len(r) / 10 for r in responses]\n")
    out = tmp_path / "run"
    assert train.main(small(out, "--task", "sentiment", "--prompts", str(prompts), "--reward", f"{fn}:n_chars",
                            "--max_steps", "1")) == 0
    assert len(records(out)) == 1
    # eval imports a reward file named in a checkpoint only when the user names it
    marker = tmp_path / "ran"
    fn.write_text(fn.read_text() + f"open({str(marker)!r}, 'w').close()\n")
    assert evaluate.eval_main([str(out), "--eval_samples", "2", "--prompts", str(prompts)]) == 2
    assert not marker.exists()
    assert evaluate.eval_main([str(out), "--eval_samples", "2", "--prompts", str(prompts),
                               "--reward", f"{fn}:n_chars"]) == 0
    assert marker.exists()


def test_vader_on_builtin_sentiment_prompts(tmp_path):
    out = tmp_path / "run"
    assert train.main(small(out, "--task", "sentiment", "--max_steps", "1", "--max_new_tokens", "6")) == 0
    assert len(records(out)) == 1


def test_reward_model_and_ppo_max_critic_from_it(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    rm_cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, max_position_embeddings=64)
    rm = LlamaForSequenceClassification(rm_cfg)
    rm.save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nhow are you\n")
    out = tmp_path / "run"
    assert train.main(small(out, "--algo", "ppo-max", "--prompts", str(prompts), "--reward_model",
                            str(tmp_path / "rm"), "--max_steps", "1")) == 0
    state, cfg = checkpoint.load(checkpoint.latest(out))
    assert cfg["model"]["critic_model_name_or_path"] == str(tmp_path / "rm")
    assert state["critic"] and state["value_head"]["weight"].shape == (1, 16)   # the head sits on the critic
    # ... and started as the reward model's score head (2 Adam steps of lr 3e-4 away from it)
    assert rm.score.weight.abs().max() > 0.01
    torch.testing.assert_close(state["value_head"]["weight"], rm.score.weight, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_default_job_learns_within_a_seeded_budget(tmp_path):
    """A slim version of `fastrlhf train` with no flags: the default model, warm-start and settings,
    fewer RL steps. The last fifth's mean reward beats the first fifth's."""
    out = tmp_path / "run"
    assert train.main(["--output_dir", str(out), "--max_steps", "60", "--eval_samples", "64"]) == 0
    first, last = metrics.fifth_means(records(out))
    assert last >= first + 0.1, (first, last)


def test_update_loss_ignores_padding_columns(tmp_path):
    """Trap: unmasked padding. Appending all-pad response columns to a rollout (what a longer
    micro-batch neighbour causes) changes neither the loss nor its statistics."""
    from fastrlhf.config import parse_args
    run = train.setup(parse_args(small(tmp_path, "--max_new_tokens", "4", "--entropy_coef", "0.01",
                                       "--batch_entropy_coef", "0.01")))
    roll = train.rollout(run, run.job.task.sample(4, run.streams.data))
    pad = 3
    columns = {}
    for k in train.Rollout.SEQUENCE_FIELDS + train.Rollout.TOKEN_FIELDS:
        t = getattr(roll, k)
        fill = run.bundle.tokenizer.pad_token_id if k in ("input_ids", "labels") else 0
        columns[k] = torch.cat([t, torch.full((t.shape[0], pad), fill, dtype=t.dtype)], dim=1)
    padded = dataclasses.replace(roll, **columns)
    idx = torch.arange(4)
    cfg = train.loss_config(run)
    loss_a, stats_a = train.micro_batch_loss(run, roll.rows(idx), cfg)
    loss_b, stats_b = train.micro_batch_loss(run, padded.rows(idx), cfg)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(stats_a[k], stats_b[k]) for k in stats_a)


def test_gradient_does_not_depend_on_micro_batch_size(tmp_path):
    """The update's loss is the masked mean over all tokens of the mini-batch, also when its
    micro-batches hold different numbers of response tokens."""
    from fastrlhf.config import parse_args
    run = train.setup(parse_args(small(tmp_path, "--max_new_tokens", "6", "--entropy_coef", "0.01")))
    roll = train.rollout(run, run.job.task.sample(6, run.streams.data))
    roll.mask[0, 1:] = 0                                          # uneven response lengths
    roll.mask[3, 2:] = 0
    params = [p for g in run.optim.optimizer.param_groups for p in g["params"]]
    cfg = train.loss_config(run)
    grads = []
    for micro in (6, 4, 1):
        run.sizes.micro_batch = micro
        run.optim.optimizer.zero_grad(set_to_none=True)
        train.accumulate_gradients(run, roll, torch.arange(6), cfg)
        grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)


def test_generation_in_chunks_pads_to_the_longest_response(tmp_path):
    """What a memory plan does on a GPU (generation in chunks, smaller micro-batches), forced on the CPU."""
    from fastrlhf.config import parse_args
    run = train.setup(parse_args(small(tmp_path, "--max_new_tokens", "6")))
    run.sizes.generation_batch, run.sizes.micro_batch = 3, 2
    seq, attn, P, mask, texts, lp = train.sample(run, run.job.task.sample(8, run.streams.data))
    assert seq.shape == (8, P + mask.shape[1]) and attn.shape == seq.shape and lp.shape == mask.shape
    pad = run.bundle.tokenizer.pad_token_id
    assert (seq[:, P:][mask == 0] == pad).all() and (lp[mask == 0] == 0).all()
    assert torch.equal(mask.sum(1) > 0, torch.ones(8, dtype=torch.bool))
    assert (mask[:, :-1] >= mask[:, 1:]).all()                    # right padded
    roll = train.rollout(run, run.job.task.sample(8, run.streams.data))
    stats = train.update(run, roll)
    assert math.isfinite(stats["loss"])


def test_out_of_memory_becomes_a_clear_message(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "micro_batch_loss", oom)
    with pytest.raises(SystemExit) as e:
        train.main(small(tmp_path))
    msg = str(e.value)
    assert "out of memory during update" in msg and "micro_batch=4" in msg and "lower" in msg


def test_rollout_rows_pick_rows_and_drop_only_padding_columns(tmp_path):
    from fastrlhf.config import parse_args
    run = train.setup(parse_args(small(tmp_path, "--max_new_tokens", "6")))
    roll = train.rollout(run, run.job.task.sample(6, run.streams.data))
    assert roll.mask.shape[1] >= 3
    roll.mask[5], roll.mask[2] = 0, 0                             # rows 5 and 2: responses of 2 and 1 tokens
    roll.mask[5, :2], roll.mask[2, :1] = 1, 1
    idx = torch.tensor([5, 2])
    sub = roll.rows(idx)
    assert sub.input_ids.shape == sub.attn.shape == (2, roll.P + 2) and sub.P == roll.P
    for k in train.Rollout.TOKEN_FIELDS:
        assert torch.equal(getattr(sub, k), getattr(roll, k)[idx, :2]), k
    for k in train.Rollout.ROW_FIELDS:
        assert torch.equal(getattr(sub, k), getattr(roll, k)[idx]), k
    assert torch.equal(sub.input_ids, roll.input_ids[idx, :roll.P + 2])
    assert sub.texts == [roll.texts[5], roll.texts[2]]


def test_optimizer_groups_are_the_policy_then_the_value_head(tmp_path):
    """Group 0 trains the policy at --learning_rate, group 1 the value head at --critic_learning_rate."""
    from fastrlhf.config import parse_args
    run = train.setup(parse_args(small(tmp_path, "--learning_rate", "1e-4", "--critic_learning_rate", "1e-3")))
    policy, critic = run.optim.optimizer.param_groups
    assert policy["params"] == run.bundle.policy_parameters() and policy["lr"] == 1e-4
    assert critic["params"] == list(run.bundle.value_head.parameters()) and critic["lr"] == 1e-3
    assert policy["params"] + critic["params"] == run.bundle.trainable_parameters()


def test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert train.main(small(out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5")) == 0
    before = sorted(p.name for p in out.iterdir())
    assert train.main(small(out, "--max_steps", "1")) == 2                  # would clobber the run
    assert sorted(p.name for p in out.iterdir()) == before
    assert train.main(small(out, "--max_steps", "1", "--overwrite_output_dir")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]   # the old 1..3 are gone
    assert [r["step"] for r in records(out)] == [1]


def test_non_finite_numbers_are_refused_before_loading():
    for flag in ("--learning_rate", "--kl_coef", "--entropy_coef", "--temperature"):
        for value in ("inf", "nan"):
            with pytest.raises(ValueError, match=f"{flag[2:]}: expected a finite number"):
                config.parse_args([flag, value])


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, capsys):
    real = train.micro_batch_loss
    calls = []

    def nan_on_second_step(run, mb, loss_cfg, *rest):
        loss, stats = real(run, mb, loss_cfg, *rest)
        calls.append(run.step)
        return (loss * float("nan") if run.step == 1 else loss), stats

    monkeypatch.setattr(train, "micro_batch_loss", nan_on_second_step)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"step 2: non-finite loss .*stopped before the optimizer step"):
        train.main(small(out, "--max_steps", "3"))
    assert [r["step"] for r in records(out)] == [1]


def test_resume_applies_changeable_flags_and_refuses_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(small(out, "--max_steps", "2", "--learning_rate", "1e-3")) == 0
    for flag, value in (("--algo", "apa"), ("--seed", "7"), ("--per_device_batch_size", "2"), ("--lora_r", "4")):
        capsys.readouterr()
        assert train.main(small(out, "--max_steps", "3", "--learning_rate", "1e-3", "--resume", flag, value)) == 2
        err = capsys.readouterr().err
        assert "cannot change on --resume" in err and f"--{flag[2:]} " in err, err
    with pytest.raises(ValueError, match=r"--seed 0 \(checkpoint\) vs 7 \(now\)"):
        config.parse_args(small(out, "--max_steps", "3", "--learning_rate", "1e-3", "--resume", "--seed", "7"))
    capsys.readouterr()
    assert train.main(small(out, "--max_steps", "3", "--learning_rate", "1e-6", "--resume")) == 0
    err = capsys.readouterr().err
    assert "--learning_rate 0.001 -> 1e-06" in err and "--max_steps 2 -> 3" in err
    last = records(out)[-1]
    assert last["step"] == 3 and last["lr"] == pytest.approx(1e-6)       # the new rate trained step 3


def test_resume_sets_the_new_learning_rates_before_the_first_step(tmp_path):
    out = tmp_path / "run"
    assert train.main(small(out, "--max_steps", "1", "--learning_rate", "1e-3", "--critic_learning_rate", "1e-2")) == 0
    cfg = config.parse_args(small(out, "--max_steps", "2", "--learning_rate", "1e-6", "--critic_learning_rate", "1e-5",
                                  "--resume"))
    run = train.setup(cfg)
    checkpoint.resume(run, cfg.resume)
    assert [g["lr"] for g in run.optim.optimizer.param_groups] == [1e-6, 1e-5]


def test_error_in_a_rollout_checkpoints_the_last_step_and_resume_loses_nothing(tmp_path, monkeypatch):
    """A reward function that raises (here: any error after the rollout consumed its random draws and
    updated the reward moments) leaves a checkpoint of the last completed step; resuming from it gives
    exactly the uninterrupted run."""
    fn = tmp_path / "r.py"                      # varied scores, so the running moments matter
    fn.write_text("def n_chars(prompts, responses):\n    return [len(r) / 3 for r in responses]\n")
    common = ["--algo", "ppo-max", "--seed", "3", "--save_total_limit", "5", "--reward", f"{fn}:n_chars"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(small(full, *common, "--max_steps", "4")) == 0
    real = train.rollout

    def failing(run, prompts):
        roll = real(run, prompts)
        if run.step == 2:
            raise RuntimeError("reward server went away")
        return roll

    monkeypatch.setattr(train, "rollout", failing)
    with pytest.raises(RuntimeError, match="reward server"):
        train.main(small(part, *common, "--max_steps", "4"))
    assert [p.name for p in checkpoint.list_checkpoints(part)] == ["checkpoint-2"]
    monkeypatch.setattr(train, "rollout", real)
    assert train.main(small(part, *common, "--max_steps", "4", "--resume")) == 0
    assert _strip(records(full)) == _strip(records(part))


@pytest.mark.parametrize("error", [RuntimeError("device lost"), KeyboardInterrupt(), FloatingPointError()])
def test_error_in_an_update_checkpoints_the_last_step_and_resume_loses_nothing(tmp_path, monkeypatch, error):
    """An error inside step 2's update, after its first optimizer step changed the weights and the
    optimizer state (ppo_epochs 2: two optimizer steps per update), leaves a checkpoint of step 1 as
    step 1 ended (weights, optimizer, schedule, moments, random streams), from which --resume gives exactly
    the uninterrupted run. FloatingPointError stands for the non-finite loss path: a NaN loss there."""
    fn = tmp_path / "r.py"                      # varied scores, so the running moments matter
    fn.write_text("def n_chars(prompts, responses):\n    return [len(r) / 3 for r in responses]\n")
    common = ["--seed", "4", "--ppo_epochs", "2", "--score_scaling", "std", "--lr_scheduler_type", "linear",
              "--save_total_limit", "5", "--reward", f"{fn}:n_chars"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main(small(full, *common, "--max_steps", "3")) == 0
    real, calls = train.micro_batch_loss, []

    def failing(run, mb, loss_cfg, *rest):
        loss, stats = real(run, mb, loss_cfg, *rest)
        if run.step == 1:
            calls.append(1)
            if len(calls) == 2:                  # the second optimizer step of step 2
                if isinstance(error, FloatingPointError):
                    return loss * float("nan"), stats
                raise error
        return loss, stats

    monkeypatch.setattr(train, "micro_batch_loss", failing)
    expected = SystemExit if isinstance(error, FloatingPointError) else type(error)
    with pytest.raises(expected):
        train.main(small(part, *common, "--max_steps", "3"))
    assert [p.name for p in checkpoint.list_checkpoints(part)] == ["checkpoint-1"]
    monkeypatch.setattr(train, "micro_batch_loss", real)
    assert train.main(small(part, *common, "--max_steps", "3", "--resume")) == 0
    assert _strip(records(full)) == _strip(records(part))
    a, _ = checkpoint.load(full / "checkpoint-3")
    b, _ = checkpoint.load(part / "checkpoint-3")
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k


def test_no_update_snapshot_while_the_last_step_is_saved(tmp_path, monkeypatch):
    """The host copy before an update is taken only when the last completed step has no checkpoint
    (every step saved: never)."""
    taken = []
    real = train.update_snapshot
    monkeypatch.setattr(train, "update_snapshot", lambda run: taken.append(run.step) or real(run))
    assert train.main(small(tmp_path / "a", "--max_steps", "3", "--save_steps", "1")) == 0
    assert taken == []
    assert train.main(small(tmp_path / "b", "--max_steps", "3")) == 0
    assert taken == [1, 2]
