"""The trainer's wiring: every knob of `fastrlhf train` changes the computation as documented, and every
statistic in metrics.jsonl equals an independent formula written here (float64, from plain model
forwards), not the helper that produced it. Direct calls into fastrlhf.train (setup / rollout /
micro_batch_loss / update) on a 1-layer, 32-wide model; the policy and value head are perturbed away
from the reference and from zero so that the KL terms and the values are not trivially 0."""
import dataclasses
import math
import random
import re
from pathlib import Path

import pytest
import torch

from fastrlhf import train
from fastrlhf.config import TrainConfig, parse_args
from fastrlhf.rewards import make_reward

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]
B = 8   # rollout rows


def varied_reward(tmp_path) -> str:
    """--reward scoring a response by its characters and digits: varied scores from a random policy."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fn = tmp_path / "varied.py"
    fn.write_text("def score(prompts, responses):\n"
                  "    return [len(r) / 3 + sum(c.isdigit() for c in r) for r in responses]\n")
    return f"{fn}:score"


def make_run(tmp_path, *flags, perturb=True):
    cfg = parse_args(["--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_batch_size", "4",
                      "--num_mini_batches", "2", "--sft_steps", "0", "--eval_samples", "4",
                      "--max_new_tokens", "4", "--digits", "2", "--reward", varied_reward(tmp_path), *TINY, *flags])
    run = train.setup(cfg)
    if perturb:   # policy ≠ reference (KL ≠ 0), values ≠ 0
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in run.bundle.policy_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            for p in run.bundle.value_head.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return run


def forward64(model, ids, attn, P, n, temperature):
    """Plain HF forward -> (log-probs [B, V, n] of softmax(logits/T) at the response positions, final hidden
    [B, n, H]) in float64. Positions count each row's valid tokens (left padding)."""
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    logits = out.logits[:, P - 1:P - 1 + n].double() / temperature
    return torch.log_softmax(logits, -1), out.hidden_states[-1][:, P - 1:P - 1 + n].double()


def kl_formula(lp, ref, est):
    """Schulman's estimators of KL(π || π_ref) per token, r = ref − lp."""
    r = ref - lp
    return {"k1": -r, "k2": 0.5 * r * r, "k3": torch.exp(r) - 1 - r}[est]


def mmean(x, m):
    return (x * m).sum() / m.sum()


def gae_formula(rewards, values, mask, gamma, lam):
    Bn, T = rewards.shape
    adv = torch.zeros(Bn, T, dtype=torch.float64)
    for b in range(Bn):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def independent_rollout_terms(run, roll, prompts, *, T, est, beta_reward, gamma, lam, whiten, adv_clip,
                              scaling, score_clip):
    """Everything a rollout computes, from scratch."""
    m = roll.mask.double()
    with torch.no_grad():
        lp_all, hidden = forward64(run.bundle.policy, roll.input_ids, roll.attn, roll.P, m.shape[1], T)
        with run.bundle.reference() as ref_model:
            ref_all, _ = forward64(ref_model, roll.input_ids, roll.attn, roll.P, m.shape[1], T)
    lab = roll.labels[..., None]
    lp, ref = lp_all.gather(-1, lab)[..., 0] * m, ref_all.gather(-1, lab)[..., 0] * m
    ent = -(lp_all.exp() * lp_all).sum(-1) * m
    w, bias = run.bundle.value_head.weight.detach().double(), run.bundle.value_head.bias.detach().double()
    values = (hidden @ w[0] + bias[0]) * m
    raw = torch.tensor(run.job.reward_fn(prompts, roll.texts), dtype=torch.float64)
    mean, std = raw.mean(), raw.std(unbiased=False)    # the running moments after one batch
    scores = {"none": raw, "std": raw / (std + 1e-8), "mean_std": (raw - mean) / (std + 1e-8)}[scaling]
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    kl = kl_formula(lp, ref, est) * m
    rewards = -beta_reward * kl
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        if n:
            rewards[b, n - 1] += scores[b]
    adv, returns = gae_formula(rewards, values, m, gamma, lam)
    raw_adv = adv.clone()
    if whiten:
        k = m.sum()
        mu = (adv * m).sum() / k
        var = (((adv - mu) * m) ** 2).sum() / (k - 1)
        adv = (adv - mu) / torch.sqrt(var + 1e-8) * m
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    return dict(old_logprobs=lp, ref_logprobs=ref, entropy=ent, old_values=values, raw_scores=raw, scores=scores,
                kl_seq=kl.sum(1), advantages=adv * m, returns=returns, raw_adv=raw_adv)


ROLLOUT_CASES = {
    # flags, then the settings the formulas use
    "ppo_default": ([], dict(T=1.0, est="k1", beta_reward=0.05, gamma=1.0, lam=0.95, whiten=True, adv_clip=None,
                             scaling="none", score_clip=None)),
    "k3_gamma_lam_noclip_nowhiten_T": (
        ["--kl_estimator", "k3", "--kl_coef", "0.3", "--gamma", "0.8", "--lam", "0.6", "--whiten_advantages", "false",
         "--temperature", "0.7", "--adv_clip", "0.05"],
        dict(T=0.7, est="k3", beta_reward=0.3, gamma=0.8, lam=0.6, whiten=False, adv_clip=0.05, scaling="none",
             score_clip=None)),
    "kl_in_loss_k2_mean_std_clip": (
        ["--kl_in", "loss", "--kl_estimator", "k2", "--kl_coef", "0.5", "--score_scaling", "mean_std",
         "--score_clip", "0.8"],
        dict(T=1.0, est="k2", beta_reward=0.0, gamma=1.0, lam=0.95, whiten=True, adv_clip=None, scaling="mean_std",
             score_clip=0.8)),
    "ppo_max_std": (["--algo", "ppo-max"], dict(T=1.0, est="k1", beta_reward=0.01, gamma=1.0, lam=0.95, whiten=False,
                                                adv_clip=None, scaling="std", score_clip=None)),
}


@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_rollout_matches_independent_formulas(tmp_path, case):
    """Log-probs at the sampling temperature, entropy, values, scores (scaling, clip), KL-shaped per-token
    rewards (estimator, β, kl_in), GAE (γ, λ), whitening and the advantage clip, each from scratch."""
    flags, s = ROLLOUT_CASES[case]
    run = make_run(tmp_path, *flags)
    prompts = run.job.task.sample(B, random.Random(5))
    roll = train.rollout(run, prompts)
    want = independent_rollout_terms(run, roll, prompts, **s)
    assert want["kl_seq"].abs().max() > 0.05                       # the KL terms matter here
    assert want["old_values"].abs().max() > 0.1
    if s["score_clip"] is not None:
        assert (want["scores"].abs() == s["score_clip"]).any()      # the clip is active
    if s["adv_clip"] is not None:
        assert (want["raw_adv"].abs() > s["adv_clip"]).any()
    for k, v in want.items():
        if k != "raw_adv":
            torch.testing.assert_close(getattr(roll, k).double(), v, rtol=1e-4, atol=2e-5, msg=lambda e: f"{k}: {e}")


def test_score_moments_run_over_steps(tmp_path):
    """--score_scaling std divides by the std of every score seen so far (population), not the batch's."""
    run = make_run(tmp_path, "--score_scaling", "std")
    seen = []
    for seed in (1, 2):
        prompts = run.job.task.sample(B, random.Random(seed))
        roll = train.rollout(run, prompts)
        seen += run.job.reward_fn(prompts, roll.texts)
    allraw = torch.tensor(seen, dtype=torch.float64)
    torch.testing.assert_close(roll.scores.double(), roll.raw_scores.double() / (allraw.std(unbiased=False) + 1e-8))


# ----------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ----------------------------------------------------------------------------------------------------

def batch_entropy_formula(lp_all, m):
    """Mean over positions with a valid token of H(p̄_t), p̄_t the mean of the valid rows' distributions."""
    p = lp_all.exp() * m[..., None]
    count = m.sum(0)
    pbar = p.sum(0) / count.clamp_min(1)[:, None]
    h = -(torch.where(pbar > 0, pbar * pbar.log(), torch.zeros_like(pbar))).sum(-1)
    return h[count > 0].mean()


def ptx_nll_formula(run, texts):
    tok = run.bundle.tokenizer
    rows = [list(tok.encode(t))[:run.cfg.max_prompt_length + run.cfg.max_new_tokens] + [tok.eos_token_id]
            for t in texts]
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    lp = torch.log_softmax(run.bundle.policy(input_ids=ids, attention_mask=attn).logits[:, :-1].double(), -1)
    tgt = lp.gather(-1, ids[:, 1:, None])[..., 0]
    m = attn[:, 1:].double()
    return -(tgt * m).sum() / m.sum()


LOSS_CASES = {
    "ppo_every_term": (
        ["--cliprange", "0.1", "--cliprange_high", "0.3", "--dual_clip", "1.3", "--cliprange_value", "0.05",
         "--vf_coef", "0.7", "--entropy_coef", "0.05", "--batch_entropy_coef", "0.03", "--kl_in", "loss",
         "--kl_estimator", "k2", "--kl_coef", "0.2", "--ptx_coef", "0.5", "--temperature", "0.8"],
        dict(algo="ppo", lo=0.1, hi=0.3, dual=1.3, vclip=0.05, vf=0.7, ent=0.05, bent=0.03, kl=0.2, est="k2",
             ptx=0.5, T=0.8)),
    "ppo_plain": ([], dict(algo="ppo", lo=0.2, hi=0.2, dual=None, vclip=0.2, vf=0.1, ent=0.0, bent=0.0, kl=0.0,
                           est="k1", ptx=0.0, T=1.0)),
    "apa": (["--algo", "apa", "--adv_coeff", "3.0", "--kl_in", "loss", "--kl_coef", "0.1", "--kl_estimator", "k3"],
            dict(algo="apa", lo=None, hi=None, dual=None, vclip=None, vf=1.0, ent=0.0, bent=0.0, kl=0.1, est="k3",
                 ptx=0.0, T=1.0, adv_coeff=3.0)),
}


def rollout_with_spread(run, seed=3):
    """A rollout whose old log-probs and old values are moved off the current ones, so that ratios and
    values land on both sides of their clip ranges."""
    roll = train.rollout(run, run.job.task.sample(B, random.Random(seed)))
    g = torch.Generator().manual_seed(seed)
    m = roll.mask.float()
    return dataclasses.replace(roll, old_logprobs=roll.old_logprobs + 0.4 * torch.randn(m.shape, generator=g) * m,
                               old_values=roll.old_values + 0.3 * torch.randn(m.shape, generator=g) * m)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_micro_batch_loss_and_its_statistics_match_formulas(tmp_path, case):
    """loss = policy loss (PPO clip low/high, dual clip; or APA with 1/λ) + kl_coef·k + entropy and
    batch-entropy bonuses (subtracted) + vf_coef·value loss (value clip) + ptx_coef·NLL(ptx texts), and
    policy_loss, value_loss, clip_frac, approx_kl, value_clip_frac, each from scratch."""
    flags, s = LOSS_CASES[case]
    ptx = tmp_path / "sft.txt"
    ptx.write_text("1+2=3\n12+30=42\n7+7=14\n")
    run = make_run(tmp_path, *flags, "--ptx_file", str(ptx))
    roll = rollout_with_spread(run)
    idx = torch.arange(B)
    mb = roll.rows(idx)
    m = mb.mask.double()
    data_state = run.streams.data.getstate()
    loss, stats = train.micro_batch_loss(run, mb, train.loss_config(run))
    drawn = random.Random()
    drawn.setstate(data_state)
    texts = [run.job.ptx_texts[drawn.randrange(len(run.job.ptx_texts))] for _ in range(B)] if s["ptx"] else []

    with torch.no_grad():
        lp_all, hidden = forward64(run.bundle.policy, mb.input_ids, mb.attn, mb.P, m.shape[1], s["T"])
        lp = lp_all.gather(-1, mb.labels[..., None])[..., 0]
        ent = -(lp_all.exp() * lp_all).sum(-1)
        old, ref, A = mb.old_logprobs.double(), mb.ref_logprobs.double(), mb.advantages.double()
        ratio = torch.exp(lp - old)
        if s["algo"] == "ppo":
            pg = torch.maximum(-A * ratio, -A * ratio.clamp(1 - s["lo"], 1 + s["hi"]))
            if s["dual"] is not None:
                pg = torch.where(A < 0, torch.minimum(pg, -s["dual"] * A), pg)
            clipped = ((A > 0) & (ratio > 1 + s["hi"])) | ((A < 0) & (ratio < 1 - s["lo"]))
            clip_frac = mmean(clipped.double(), m)
            assert 0 < clip_frac < 1
            if s["dual"] is not None:
                assert ((A < 0) & (-A * ratio > -s["dual"] * A) & (m > 0)).any()   # the dual clip acts
        else:
            pg = (lp - ref - s["adv_coeff"] * A) ** 2
            clip_frac = torch.tensor(0.0, dtype=torch.float64)
        policy = mmean(pg, m) + s["kl"] * mmean(kl_formula(lp, ref, s["est"]), m) - s["ent"] * mmean(ent, m)
        policy = policy - s["bent"] * batch_entropy_formula(lp_all, m)
        w, bias = run.bundle.value_head.weight.double(), run.bundle.value_head.bias.double()
        V, V_old, R = hidden @ w[0] + bias[0], mb.old_values.double(), mb.returns.double()
        err = (V - R) ** 2
        if s["vclip"] is None:
            value, vfrac = 0.5 * mmean(err, m), torch.tensor(0.0, dtype=torch.float64)
        else:
            err_c = (V_old + (V - V_old).clamp(-s["vclip"], s["vclip"]) - R) ** 2
            value, vfrac = 0.5 * mmean(torch.maximum(err, err_c), m), mmean((err_c > err).double(), m)
            assert 0 < vfrac < 1
        approx_kl = mmean(ratio - 1 - torch.log(ratio), m)
        total = policy + s["vf"] * value
        if s["ptx"]:
            nll = ptx_nll_formula(run, texts)
            assert nll > 0.5
            total = total + s["ptx"] * nll
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["policy_loss"].double(), policy, **close)
    torch.testing.assert_close(stats["value_loss"].double(), value, **close)
    torch.testing.assert_close(loss.detach().double(), total, **close)
    torch.testing.assert_close(stats["clip_frac"].double(), clip_frac, **close)
    torch.testing.assert_close(stats["value_clip_frac"].double(), vfrac, **close)
    torch.testing.assert_close(stats["approx_kl"].double(), approx_kl, **close)


# ----------------------------------------------------------------------------------------------------
# The update: optimizer steps, learning rates, clipping, schedule
# ----------------------------------------------------------------------------------------------------

def trainable(run):
    return {"policy": [p.detach().clone() for p in run.bundle.policy_parameters()],
            "critic": [p.detach().clone() for p in run.bundle.critic_parameters()]}


def test_learning_rates_of_policy_and_value_head(tmp_path):
    """One optimizer step of AdamW (no weight decay) moves each weight with a nonzero gradient by
    lr·g/(|g| + ε) ≈ lr: the policy by --learning_rate, the value head by --critic_learning_rate, both
    times the warmup factor 1/(warmup_steps + 1) of the first step."""
    run = make_run(tmp_path, "--ppo_epochs", "1", "--num_mini_batches", "1", "--per_device_batch_size", "8",
                   "--learning_rate", "1e-3", "--critic_learning_rate", "2e-2", "--warmup_steps", "1")
    roll = train.rollout(run, run.job.task.sample(B, random.Random(1)))
    before = trainable(run)
    train.update(run, roll)
    after = trainable(run)
    for group, lr in (("policy", 1e-3 / 2), ("critic", 2e-2 / 2)):
        step = torch.cat([(a - b).abs().flatten() for a, b in zip(after[group], before[group])])
        moved = step[step > 0]
        assert moved.numel() > 0.5 * step.numel(), group
        torch.testing.assert_close(moved.median(), torch.tensor(lr), rtol=1e-2, atol=0, msg=group)
        assert moved.max() <= lr * 1.0001, group


def test_weight_decay_is_decoupled_and_applies_to_the_policy(tmp_path):
    """AdamW: p ← p − lr·wd·p − lr·adam_step, so two runs from the same state differ by −lr·wd·p."""
    outs = {}
    for wd in ("0", "0.1"):
        run = make_run(tmp_path / wd, "--ppo_epochs", "1", "--num_mini_batches", "1", "--per_device_batch_size", "8",
                       "--learning_rate", "1e-2", "--weight_decay", wd)
        roll = train.rollout(run, run.job.task.sample(B, random.Random(1)))
        start = [p.detach().clone() for p in run.bundle.policy_parameters()]
        train.update(run, roll)
        outs[wd] = [p.detach().clone() for p in run.bundle.policy_parameters()]
    for p0, a, b in zip(start, outs["0"], outs["0.1"]):
        torch.testing.assert_close(b - a, -1e-2 * 0.1 * p0, rtol=1e-3, atol=1e-7)


def test_optimizer_steps_micro_batches_and_grad_norm(tmp_path, monkeypatch):
    """ppo_epochs × num_mini_batches optimizer steps per update, each over per_device_batch_size ×
    gradient_accumulation_steps rows in micro-batches of per_device_batch_size, every row once per epoch;
    the gradient is clipped to --max_grad_norm before each step and grad_norm is the mean of the
    unclipped norms; the update's loss statistics are the means over micro-batches."""
    run = make_run(tmp_path, "--ppo_epochs", "3", "--num_mini_batches", "2", "--per_device_batch_size", "2",
                   "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.05", "--learning_rate", "1e-3")
    assert train.rollout_batch(run.cfg) == B
    roll = train.rollout(run, run.job.task.sample(B, random.Random(1)))
    rows, losses, norms, clipped = [], [], [], []
    real_loss, real_acc = train.micro_batch_loss, train.accumulate_gradients

    def loss_spy(run_, mb, cfg, *rest):
        loss, stats = real_loss(run_, mb, cfg, *rest)
        rows.append(mb.texts)
        losses.append({k: float(v.detach()) for k, v in {"loss": loss, **stats}.items()})
        return loss, stats

    def acc_spy(run_, roll_, mini, cfg):
        out = real_acc(run_, roll_, mini, cfg)
        g = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])
        norms.append(g.norm().item())
        return out

    params = [p for g in run.optim.optimizer.param_groups for p in g["params"]]
    run.optim.optimizer.register_step_pre_hook(lambda *_: clipped.append(
        torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm().item()))
    monkeypatch.setattr(train, "micro_batch_loss", loss_spy)
    monkeypatch.setattr(train, "accumulate_gradients", acc_spy)
    stats = train.update(run, roll)
    assert len(norms) == len(clipped) == 3 * 2 and len(rows) == 3 * 2 * 2
    assert all(len(r) == 2 for r in rows)
    for e in range(3):   # each epoch covers every row once
        assert sorted(sum(rows[4 * e:4 * e + 4], [])) == sorted(roll.texts)
    for n, c in zip(norms, clipped):
        assert n > 0.05 and c == pytest.approx(0.05, rel=1e-4)
    assert stats["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    for k in losses[0]:
        assert stats[k] == pytest.approx(sum(r[k] for r in losses) / len(losses), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_learning_rate_schedule(tmp_path, kind):
    """Warmup (k+1)/(w+1) for the first w optimizer steps, then constant / linear to 0 / cosine to 0 over
    max_steps × ppo_epochs × num_mini_batches optimizer steps, for both groups."""
    run = make_run(tmp_path, "--lr_scheduler_type", kind, "--warmup_steps", "2", "--learning_rate", "1e-3",
                   "--critic_learning_rate", "1e-2", "--ppo_epochs", "2", "--max_steps", "3", perturb=False)
    total, w = 3 * 2 * 2, 2
    for k in range(total + 1):
        if k < w:
            f = (k + 1) / (w + 1)
        else:
            frac = (k - w) / (total - w)
            f = {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]
        lrs = [g["lr"] for g in run.optim.optimizer.param_groups]
        assert lrs == pytest.approx([1e-3 * f, 1e-2 * f], abs=1e-12), k
        run.optim.optimizer.step()
        run.optim.scheduler.step()


# ----------------------------------------------------------------------------------------------------
# Sampling knobs
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--top_k", "1"], ["--top_p", "1e-6"]])
def test_top_k_1_and_tiny_top_p_sample_the_argmax(tmp_path, flags):
    run = make_run(tmp_path, *flags, "--temperature", "1.5", "--max_new_tokens", "5")
    roll = train.rollout(run, run.job.task.sample(B, random.Random(2)))
    m = roll.mask.bool()
    with torch.no_grad():
        lp_all, _ = forward64(run.bundle.policy, roll.input_ids, roll.attn, roll.P, m.shape[1], 1.5)
    assert torch.equal(lp_all.argmax(-1)[m], roll.labels[m])


def test_sampling_is_not_greedy_without_them(tmp_path):
    run = make_run(tmp_path, "--temperature", "1.5", "--max_new_tokens", "5")
    roll = train.rollout(run, run.job.task.sample(B, random.Random(2)))
    m = roll.mask.bool()
    with torch.no_grad():
        lp_all, _ = forward64(run.bundle.policy, roll.input_ids, roll.attn, roll.P, m.shape[1], 1.5)
    assert not torch.equal(lp_all.argmax(-1)[m], roll.labels[m])


def test_prompt_and_response_lengths(tmp_path):
    """Prompts are left-truncated to --max_prompt_length tokens (their ends kept), responses have at
    most --max_new_tokens."""
    run = make_run(tmp_path, "--max_prompt_length", "3", "--max_new_tokens", "2")
    prompts = run.job.task.sample(B, random.Random(2))
    roll = train.rollout(run, prompts)
    tok = run.bundle.tokenizer
    assert roll.P == 3 and roll.mask.shape[1] <= 2
    for row, p in zip(roll.input_ids[:, :3].tolist(), prompts):
        assert row == list(tok.encode(p))[-3:]


def test_seed_sets_every_stream(tmp_path):
    texts = {}
    for seed in ("0", "0", "1"):
        run = make_run(tmp_path / seed, "--seed", seed, perturb=False)
        prompts = run.job.task.sample(B, run.streams.data)
        texts.setdefault(seed, []).append((prompts, train.rollout(run, prompts).texts))
    assert texts["0"][0] == texts["0"][1] and texts["0"][0] != texts["1"][0]


# ----------------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------------

def test_every_metric_in_metrics_jsonl_matches_its_formula(tmp_path, monkeypatch):
    """Each record's fields from the step's rollout (prompts, responses, sampler log-probs) and the
    weights before its update, recomputed here; the adaptive β over steps; the learning rate from the
    schedule; and no field left unchecked."""
    from fastrlhf import metrics
    T, est, beta0, target, horizon, lr = 0.9, "k3", 0.1, 0.01, 50.0, 1e-2
    flags = ["--adaptive_kl", "--kl_coef", str(beta0), "--kl_target", str(target), "--kl_horizon", str(horizon),
             "--kl_estimator", est, "--temperature", str(T), "--score_scaling", "std", "--learning_rate", str(lr),
             "--lr_scheduler_type", "linear", "--ppo_epochs", "2"]
    real_setup, real_sample, real_rollout, real_update = train.setup, train.sample, train.rollout, train.update
    steps = []

    def setup_spy(cfg, dist=None):
        run = real_setup(cfg, dist)
        with torch.no_grad():
            for p in run.bundle.value_head.parameters():
                p.normal_()
        return run

    def sample_spy(run, prompts, **kw):
        out = real_sample(run, prompts, **kw)
        if "temperature" not in kw:   # the rollout's sampling, not the held-out evaluation (temperature 0)
            steps.append({"prompts": list(prompts), "sample_lp": out[5].double()})
        return out

    def rollout_spy(run, prompts):
        roll = real_rollout(run, prompts)
        m = roll.mask.double()
        with torch.no_grad():
            lp_all, _ = forward64(run.bundle.policy, roll.input_ids, roll.attn, roll.P, m.shape[1], T)
            with run.bundle.reference() as ref_model:
                ref_all, _ = forward64(ref_model, roll.input_ids, roll.attn, roll.P, m.shape[1], T)
        lab = roll.labels[..., None]
        steps[-1].update(roll=roll, lp=lp_all.gather(-1, lab)[..., 0] * m, ref=ref_all.gather(-1, lab)[..., 0] * m,
                         ent=-(lp_all.exp() * lp_all).sum(-1), m=m)
        return roll

    def update_spy(run, roll):
        steps[-1]["stats"] = real_update(run, roll)
        return steps[-1]["stats"]

    for name, spy in (("setup", setup_spy), ("sample", sample_spy), ("rollout", rollout_spy), ("update", update_spy)):
        monkeypatch.setattr(train, name, spy)
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "3", "--per_device_batch_size", "4", "--num_mini_batches", "2",
            "--sft_steps", "40", "--sft_batch_size", "16", "--eval_samples", "4", "--max_new_tokens", "4",
            "--reward", varied_reward(tmp_path), *TINY, *flags]   # the warm start: answers end in EOS
    assert train.main(argv) == 0
    recs = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3] and len(steps) == 3
    beta, seen, ragged = beta0, [], []
    reward_fn = make_reward(varied_reward(tmp_path), reward_model=None, reward_label=0, partial_credit=False,
                                  device=torch.device("cpu"), tokenizer=None)
    for k, (rec, s) in enumerate(zip(recs, steps), 1):
        m, roll = s["m"], s["roll"]
        raw = torch.tensor(reward_fn(s["prompts"], roll.texts), dtype=torch.float64)
        seen += raw.tolist()
        kl = (kl_formula(s["lp"], s["ref"], est) * m).sum(1).mean().item()
        if k > 1:
            assert kl > 1e-3
        beta *= 1 + min(max(kl / target - 1, -0.2), 0.2) * B / horizon
        n_opt = k * 2 * 2
        want = {
            "step": k, "reward_mean": raw.mean().item(), "reward_std": raw.std().item(),
            "score_scaled_mean": (raw / (torch.tensor(seen, dtype=torch.float64).std(unbiased=False) + 1e-8)).mean().item(),
            "kl": kl, "kl_coef": beta, "entropy": mmean(s["ent"], m).item(),
            "logprob_gap": ((s["lp"] - s["sample_lp"]).abs() * m).max().item(),
            "response_len": m.sum(1).mean().item(), "lr": lr * max(0.0, 1 - n_opt / (3 * 2 * 2)),
            **s["stats"],
        }
        assert raw.std() > 0
        ragged.append(bool((m.sum(1) != m.shape[1]).any()))
        for key, v in want.items():
            assert rec[key] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, key)
        assert rec["tokens_per_s"] == pytest.approx(m.sum().item() / rec["step_time_s"], rel=1e-6)
        phases = {key: v for key, v in rec.items() if key.startswith("memory/peak_mib_")}
        assert set(phases) == {f"memory/peak_mib_{p}" for p in ("generation", "scoring", "update")}
        assert rec["peak_mem_mib"] == pytest.approx(max(phases.values()) or metrics.peak_mem_mib(torch.device("cpu")),
                                                    rel=0.5)
        checked = set(want) | set(phases) | {"tokens_per_s", "step_time_s", "peak_mem_mib"}
        assert set(rec) == checked, set(rec) ^ checked
    assert any(ragged)   # padding in the responses, so that masked and unmasked statistics differ
    assert set(steps[0]["stats"]) == {"loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "value_clip_frac",
                                      "grad_norm"}


# ----------------------------------------------------------------------------------------------------
# Warm start, data, reward, optimizer, threads, precision
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_warm_start_knobs(tmp_path, monkeypatch, noise):
    """--sft_steps optimizer steps on batches of --sft_batch_size prompts whose answers are wrong with
    probability --sft_noise, at --sft_learning_rate (one AdamW step moves a weight by ≈ lr); the reference
    is the warm-started policy afterwards."""
    from fastrlhf import warm_start as ws
    from fastrlhf.tasks import solve
    run = make_run(tmp_path, "--sft_steps", "2", "--sft_batch_size", "6", "--sft_noise", str(noise),
                   "--sft_learning_rate", "1e-3", "--reward", "arithmetic", perturb=False)
    batches, moves = [], []
    real_nll = ws.nll
    start = [p.detach().clone() for p in run.bundle.policy_parameters()]

    def nll_spy(model, seq, attn, P, target):
        if len(batches) == 1:   # the first optimizer step happened
            moves.append(torch.cat([(p.detach() - s).abs().flatten()
                                    for p, s in zip(run.bundle.policy_parameters(), start)]))
        batches.append((seq, attn, P, target))
        return real_nll(model, seq, attn, P, target)

    monkeypatch.setattr(ws, "nll", nll_spy)
    ws.warm_start(run)
    assert len(batches) == 2
    tok = run.bundle.tokenizer
    for seq, attn, P, target in batches:
        assert seq.shape[0] == 6
        for row, t in zip(seq.tolist(), target.tolist()):
            prompt = tok.decode(row[:P], skip_special_tokens=True)
            answer = tok.decode([x for x, keep in zip(row[P:], t) if keep], skip_special_tokens=True)
            assert (int(answer) == solve(prompt)) == (noise == 0.0), (prompt, answer)
    moved = moves[0][moves[0] > 0]
    assert moved.median() == pytest.approx(1e-3, rel=0.05)
    with run.bundle.reference() as ref_model:
        for (k, a), b in zip(ref_model.state_dict().items(), run.bundle.policy.state_dict().values()):
            assert torch.equal(a, b), k


def test_task_digits_and_operators_reach_the_prompts(tmp_path):
    run = make_run(tmp_path, "--digits", "3", "--operators", "*-", perturb=False)
    prompts = run.job.task.sample(200, random.Random(0))
    ops_seen = {re.findall(r"[*+-]", p)[0] for p in prompts}
    assert ops_seen == {"*", "-"}
    assert max(max(map(int, re.findall(r"\d+", p))) for p in prompts) >= 100


def test_partial_credit_reaches_the_reward(tmp_path):
    prompts, near = ["12+30="], ["41"]
    scores = [make_run(tmp_path / str(pc), *(["--partial_credit"] if pc else []), "--reward", "arithmetic",
                       perturb=False).job.reward_fn(prompts, near)[0] for pc in (False, True)]
    assert scores[0] == 0.0 and 0.0 < scores[1] < 0.5


def test_optim_selects_the_optimizer(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    assert isinstance(make_run(tmp_path / "a", perturb=False).optim.optimizer, torch.optim.AdamW)
    run = make_run(tmp_path / "b", "--optim", "adamw_8bit", perturb=False)
    assert isinstance(run.optim.optimizer, bnb.optim.AdamW8bit)
    assert len(run.optim.optimizer.param_groups) == 2


def test_num_threads_and_bf16_on_cpu(tmp_path):
    """--num_threads sets torch's CPU threads; --bf16 autocasts on CUDA only (CPU: no autocast)."""
    threads = torch.get_num_threads()
    try:
        run = make_run(tmp_path, "--num_threads", "2", perturb=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    with run.autocast():
        assert not torch.is_autocast_enabled("cpu")


def _small_argv(out, tmp_path, *flags):
    return ["--output_dir", str(out), "--per_device_batch_size", "4", "--sft_steps", "0", "--eval_samples", "4",
            "--max_new_tokens", "3", "--reward", varied_reward(tmp_path), *TINY, *flags]


def test_save_minutes_checkpoints_after_a_step_that_ends_that_late(tmp_path):
    for minutes, want in (("0", ["checkpoint-3"]), ("1e-9", ["checkpoint-1", "checkpoint-2", "checkpoint-3"])):
        out = tmp_path / minutes
        assert train.main(_small_argv(out, tmp_path, "--max_steps", "3", "--save_minutes", minutes,
                                      "--save_total_limit", "5")) == 0
        assert sorted(p.name for p in out.glob("checkpoint-*")) == want


def test_logging_steps_is_the_progress_bar_period(tmp_path, monkeypatch):
    import tqdm.auto
    posts = []

    class Bar(list):
        def __init__(self, it, **kw):
            super().__init__(it)

        def set_postfix(self, **kw):
            posts.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    assert train.main(_small_argv(tmp_path / "run", tmp_path, "--max_steps", "4", "--logging_steps", "2")) == 0
    assert len(posts) == 2 and set(posts[0]) == {"reward", "kl", "ent", "tok_s"}


# ----------------------------------------------------------------------------------------------------
# Every knob has a test
# ----------------------------------------------------------------------------------------------------

W = "test_wiring.py::"
KNOB_TESTS = {
    "algo": [W + "test_micro_batch_loss_and_its_statistics_match_formulas", W + "test_rollout_matches_independent_formulas"],
    "task": ["test_tasks.py::test_make_task", "test_train.py::test_sentiment_prompts_file_with_user_callable"],
    "prompts": ["test_train.py::test_sentiment_prompts_file_with_user_callable"],
    "digits": [W + "test_task_digits_and_operators_reach_the_prompts"],
    "operators": [W + "test_task_digits_and_operators_reach_the_prompts"],
    "reward": [W + "test_rollout_matches_independent_formulas", "test_rewards.py::test_user_callable_from_file_and_module"],
    "partial_credit": [W + "test_partial_credit_reaches_the_reward"],
    "reward_model": ["test_train.py::test_reward_model_and_ppo_max_critic_from_it"],
    "reward_label": ["test_rewards.py::test_reward_model_scores_last_token_logit", "test_rewards.py::test_reward_label_default"],
    "output_dir": ["test_train.py::test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite"],
    "overwrite_output_dir": ["test_train.py::test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite"],
    "seed": [W + "test_seed_sets_every_stream"],
    "device": ["test_config.py::test_bad_flags_exit_2"],
    "num_threads": [W + "test_num_threads_and_bf16_on_cpu"],
    "bf16": [W + "test_num_threads_and_bf16_on_cpu"],
    "max_steps": ["test_train.py::test_resume_applies_changeable_flags_and_refuses_the_rest"],
    "save_steps": ["test_train.py::test_resume_equals_uninterrupted"],
    "save_minutes": [W + "test_save_minutes_checkpoints_after_a_step_that_ends_that_late"],
    "save_total_limit": ["test_train.py::test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite"],
    "resume": ["test_train.py::test_resume_equals_uninterrupted"],
    "report_to": ["test_train.py::test_each_algorithm_with_every_regularizer"],
    "logging_steps": [W + "test_logging_steps_is_the_progress_bar_period"],
    "per_device_batch_size": [W + "test_optimizer_steps_micro_batches_and_grad_norm"],
    "gradient_accumulation_steps": [W + "test_optimizer_steps_micro_batches_and_grad_norm"],
    "num_mini_batches": [W + "test_optimizer_steps_micro_batches_and_grad_norm"],
    "ppo_epochs": [W + "test_optimizer_steps_micro_batches_and_grad_norm"],
    "max_prompt_length": [W + "test_prompt_and_response_lengths"],
    "max_new_tokens": [W + "test_prompt_and_response_lengths"],
    "temperature": [W + "test_rollout_matches_independent_formulas", W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "top_k": [W + "test_top_k_1_and_tiny_top_p_sample_the_argmax"],
    "top_p": [W + "test_top_k_1_and_tiny_top_p_sample_the_argmax"],
    "learning_rate": [W + "test_learning_rates_of_policy_and_value_head"],
    "critic_learning_rate": [W + "test_learning_rates_of_policy_and_value_head"],
    "optim": [W + "test_optim_selects_the_optimizer", "test_optim.py::test_optimizers_step"],
    "weight_decay": [W + "test_weight_decay_is_decoupled_and_applies_to_the_policy"],
    "lr_scheduler_type": [W + "test_learning_rate_schedule"],
    "warmup_steps": [W + "test_learning_rate_schedule", W + "test_learning_rates_of_policy_and_value_head"],
    "max_grad_norm": [W + "test_optimizer_steps_micro_batches_and_grad_norm"],
    "vf_coef": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "gamma": [W + "test_rollout_matches_independent_formulas"],
    "lam": [W + "test_rollout_matches_independent_formulas"],
    "whiten_advantages": [W + "test_rollout_matches_independent_formulas"],
    "adv_clip": [W + "test_rollout_matches_independent_formulas"],
    "score_scaling": [W + "test_rollout_matches_independent_formulas", W + "test_score_moments_run_over_steps"],
    "score_clip": [W + "test_rollout_matches_independent_formulas"],
    "cliprange": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "cliprange_high": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "dual_clip": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "cliprange_value": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "adv_coeff": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "entropy_coef": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "batch_entropy_coef": [W + "test_micro_batch_loss_and_its_statistics_match_formulas",
                           "test_batch_entropy.py::test_trainer_update_is_the_same_for_every_micro_batch_size",
                           "test_batch_entropy.py::test_metrics_log_batch_entropy_each_step_only_when_it_is_on"],
    "batch_entropy_positions": ["test_batch_entropy.py::test_trainer_update_is_the_same_for_every_micro_batch_size"],
    "kl_coef": [W + "test_rollout_matches_independent_formulas", W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "kl_estimator": [W + "test_rollout_matches_independent_formulas", W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "kl_in": [W + "test_rollout_matches_independent_formulas", W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "adaptive_kl": [W + "test_every_metric_in_metrics_jsonl_matches_its_formula"],
    "kl_target": [W + "test_every_metric_in_metrics_jsonl_matches_its_formula"],
    "kl_horizon": [W + "test_every_metric_in_metrics_jsonl_matches_its_formula"],
    "ptx_file": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "ptx_coef": [W + "test_micro_batch_loss_and_its_statistics_match_formulas"],
    "sft_steps": [W + "test_warm_start_knobs"],
    "sft_noise": [W + "test_warm_start_knobs"],
    "sft_learning_rate": [W + "test_warm_start_knobs"],
    "sft_batch_size": [W + "test_warm_start_knobs"],
    "eval_samples": ["test_train.py::test_eval_scores_a_checkpoint"],
    "model": ["test_models.py::test_default_model_full_finetune_has_frozen_reference"],   # ModelConfig: test_models.py
    "stop": ["test_generate.py::test_stop_string_ends_the_mask_and_keeps_the_stream",
             "test_generate.py::test_trainer_draws_a_length_per_prompt_and_cuts_stop_strings"],
    "min_new_tokens": ["test_generate.py::test_trainer_draws_a_length_per_prompt_and_cuts_stop_strings"],
    "reward_input": ["test_rewards.py::test_reward_input_for_reward_models_and_vader"],
    "log_samples": ["test_samples.py::test_train_writes_samples_and_resume_matches_uninterrupted"],
    "fsdp": ["test_distributed.py::test_update_on_two_ranks_equals_one_process_on_the_whole_batch",
             "test_distributed.py::test_fsdp_refuses_what_it_cannot_shard"],
    "dist_timeout_s": ["test_distributed.py::test_session_passes_dist_timeout_s_and_reports_the_failing_rank"],
    "whiten_scope": ["test_paper_knobs.py::test_whiten_scope_minibatch_whitens_each_optimizer_steps_rows"],
    "critic": ["test_paper_knobs.py::test_critic_copy_is_a_separate_trunk_with_an_mlp_head",
               "test_paper_knobs.py::test_critic_copy_starts_from_the_warm_started_policy"],
    "critic_warmup_steps": ["test_paper_knobs.py::test_critic_warmup_updates_only_the_value_model_then_ppo"],
    "num_layers_unfrozen": ["test_paper_knobs.py::test_num_layers_unfrozen_trains_only_the_top_blocks"],
}


def test_every_knob_has_a_test():
    """A new TrainConfig field fails here until it is given a test in KNOB_TESTS (and each test named
    there exists)."""
    assert set(KNOB_TESTS) == {f.name for f in dataclasses.fields(TrainConfig)}
    here = Path(__file__).parent
    for knob, tests in KNOB_TESTS.items():
        for t in tests:
            file, name = t.split("::")
            assert re.search(rf"^def {name}\(", (here / file).read_text(), re.M), (knob, t)
