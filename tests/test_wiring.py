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
from fastrlhf.models import ModelConfig

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]
B = 8   # rollout rows


def varied_reward(tmp_path) -> str:
    """--reward scoring a response by its characters and digits: varied scores from a random policy."""
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
