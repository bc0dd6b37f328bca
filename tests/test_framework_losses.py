"""The recipes of README "Use from verl" and "Use from OpenRLHF": each framework helper that a fastrlhf op
replaces, written here in float64 from the framework's own formula (the frameworks are not installed),
against the fastrlhf call with the README's argument mapping: values and logits gradients.

verl (volcengine/verl): verl/utils/torch_functional.py logprobs_from_logits, entropy_from_logits,
masked_mean; verl/trainer/ppo/core_algos.py agg_loss, compute_policy_loss (clip_ratio_c dual clip),
kl_penalty_forward. OpenRLHF (OpenRLHF/OpenRLHF): openrlhf/models/utils.py log_probs_from_logits,
compute_entropy, masked_mean, compute_approx_kl; openrlhf/models/loss.py PolicyLoss."""
import pytest
import torch

import fastrlhf as F
from fastrlhf import ref

B, T, V = 4, 6, 17


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1                                   # every row has a token (verl's seq means divide by Σ m)
    lp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref_lp = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, T, generator=g)
    return logits, labels, mask, old, ref_lp, adv


# ---------------------------------------------------------------------------------------------------------
# The frameworks' formulas, float64
# ---------------------------------------------------------------------------------------------------------

def logprobs_from_logits(logits, labels):
    """verl logprobs_from_logits / OpenRLHF log_probs_from_logits: x_y − logsumexp(x)."""
    return logits.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def entropy_from_logits(logits):
    """verl entropy_from_logits / OpenRLHF compute_entropy: logsumexp(x) − Σ softmax(x)·x."""
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def verl_masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat, mask, mode):
    """verl core_algos.agg_loss."""
    if mode == "token-mean":
        return verl_masked_mean(loss_mat, mask)
    seq = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return seq.mean()
    if mode == "seq-mean-token-mean":
        return (seq / mask.sum(-1)).mean()
    return seq.sum() / mask.shape[-1]                 # seq-mean-token-sum-norm


def verl_policy_loss(old, lp, adv, mask, clip_low, clip_high, clip_ratio_c, mode):
    """verl compute_policy_loss: the log-ratio clamped to ±20, PPO clip, dual clip −A·c for A < 0."""
    ratio = torch.exp((lp - old).clamp(-20, 20))
    l1, l2 = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    dual = torch.minimum(-adv * clip_ratio_c, clipped)
    return verl_agg_loss(torch.where(adv < 0, dual, clipped), mask, mode)


def verl_kl_penalty(lp, ref_lp, kind):
    """verl kl_penalty_forward: k1 = ℓ − ℓ_ref, k2 = ½(ℓ − ℓ_ref)², low_var_kl (k3) with its clamps."""
    if kind == "k1":
        return lp - ref_lp
    if kind == "k2":
        return 0.5 * (lp - ref_lp) ** 2
    d = (ref_lp - lp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(-10, 10)


def openrlhf_masked_mean(x, mask, dim=None):
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def openrlhf_policy_loss(lp, old, adv, mask, eps_low, eps_high, dual_clip, token_level_loss):
    """OpenRLHF PolicyLoss (policy_loss_type "ppo")."""
    ratio = (lp - old).exp()
    s1, s2 = ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    if dual_clip is None:
        loss = -torch.min(s1, s2)
    else:
        c1 = torch.min(s1, s2)
        loss = -torch.where(adv < 0, torch.max(c1, dual_clip * adv), c1)
    if token_level_loss:
        return openrlhf_masked_mean(loss, mask)
    return openrlhf_masked_mean(loss, mask, dim=-1).mean()


def openrlhf_approx_kl(lp, base, kind):
    """OpenRLHF compute_approx_kl, clamped to ±10."""
    r = lp - base
    kl = {"k1": r, "k2": r ** 2 / 2, "k3": torch.exp(-r) - 1 + r}[kind]
    return kl.clamp(-10, 10)


# ---------------------------------------------------------------------------------------------------------

def _close(a, b, tol=1e-5):
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a - b).abs().max()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy(temperature):
    """verl logprobs_from_logits(logits / τ, y) and entropy_from_logits; OpenRLHF log_probs_from_logits(logits,
    y, temperature) -> F.token_logprobs / F.token_entropy / F.logprobs_and_entropy(temperature=τ)."""
    logits, labels, mask, *_ = _data()
    x64 = logits.double() / temperature
    lp, ent = F.logprobs_and_entropy(logits, labels, temperature=temperature)
    _close(lp, logprobs_from_logits(x64, labels))
    _close(ent, entropy_from_logits(x64))
    _close(F.token_logprobs(logits, labels, temperature=temperature), logprobs_from_logits(x64, labels))
    _close(F.token_entropy(logits, temperature=temperature, mask=mask), entropy_from_logits(x64) * mask)


def test_masked_mean():
    _, _, mask, old, *_ = _data()
    _close(ref.masked_mean(old, mask), verl_masked_mean(old.double(), mask.double()), 1e-6)
    _close(ref.masked_mean(old, mask), openrlhf_masked_mean(old.double(), mask.double()), 1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    """verl kl_penalty(logprob, ref_logprob, "k1" | "k2" | "low_var_kl") and OpenRLHF compute_approx_kl(lp,
    base, kl_estimator) -> F.kl_penalty(lp, ref_lp, kind) (equal inside their clamps)."""
    *_, old, ref_lp, _ = _data()
    ours = F.kl_penalty(old, ref_lp, kind)
    _close(ours, verl_kl_penalty(old.double(), ref_lp.double(), kind))
    _close(ours, openrlhf_approx_kl(old.double(), ref_lp.double(), kind))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_verl_actor_loss(mode):
    """verl's actor loss: compute_policy_loss(old, lp, A, mask, clip low/high, clip_ratio_c, loss_agg_mode)
    − entropy_coeff·agg_loss(entropy) + kl_loss_coef·agg_loss(kl_penalty(lp, ref, low_var_kl)) ->
    F.policy_loss_from_logits(..., dual_clip=clip_ratio_c, entropy_coef, kl_coef, kl_estimator="k3",
    loss_agg_mode=mode): value and logits gradient."""
    logits, labels, mask, old, ref_lp, adv = _data()
    x64 = logits.double().requires_grad_()
    lp64, ent64 = logprobs_from_logits(x64, labels), entropy_from_logits(x64)
    m = mask.double()
    expect = (verl_policy_loss(old.double(), lp64, adv.double(), m, 0.2, 0.28, 3.0, mode)
              - 0.01 * verl_agg_loss(ent64, m, mode)
              + 0.05 * verl_agg_loss(verl_kl_penalty(lp64, ref_lp.double(), "k3"), m, mode))
    expect.backward()
    x = logits.clone().requires_grad_()
    loss, out = F.policy_loss_from_logits(x, labels, mask, adv, old, ref_lp, clip_low=0.2, clip_high=0.28,
                                          dual_clip=3.0, entropy_coef=0.01, kl_coef=0.05, kl_estimator="k3",
                                          loss_agg_mode=mode)
    loss.backward()
    _close(loss, expect.detach())
    _close(x.grad, x64.grad)
    # verl's pg_clipfrac: the masked mean of (clipped > unclipped)
    ratio = torch.exp(out["logprobs"].double() - old.double())
    frac = ((-adv * ratio.clamp(0.8, 1.28)) > (-adv * ratio)).double()
    _close(out["clip_frac"], verl_masked_mean(frac, m), 1e-6)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_openrlhf_policy_loss(token_level_loss, dual_clip):
    """OpenRLHF PolicyLoss(clip_eps_low, clip_eps_high, dual_clip, token_level_loss)(lp, old, A, action_mask) ->
    F.policy_loss_from_logits(..., clip_low, clip_high, dual_clip, loss_agg_mode="token-mean" if
    token_level_loss else "seq-mean-token-mean"), with lp from the same logits (log_probs_from_logits)."""
    logits, labels, mask, old, _, adv = _data(1)
    x64 = logits.double().requires_grad_()
    expect = openrlhf_policy_loss(logprobs_from_logits(x64, labels), old.double(), adv.double(), mask.double(),
                                  0.2, 0.3, dual_clip, token_level_loss)
    expect.backward()
    x = logits.clone().requires_grad_()
    loss, _ = F.policy_loss_from_logits(
        x, labels, mask, adv, old, clip_low=0.2, clip_high=0.3, dual_clip=dual_clip,
        loss_agg_mode="token-mean" if token_level_loss else "seq-mean-token-mean")
    loss.backward()
    _close(loss, expect.detach())
    _close(x.grad, x64.grad)


def test_on_policy_grpo_step_of_both():
    """The on-policy step both frameworks take with old = sg(ℓ) (ratio 1): F.policy_loss_from_logits with
    old_logprobs=None and per-sequence advantages [B] equals the formula with old = ℓ detached."""
    logits, labels, mask, _, _, adv = _data(2)
    seq_adv = adv[:, 0]
    x64 = logits.double().requires_grad_()
    lp64 = logprobs_from_logits(x64, labels)
    expect = openrlhf_policy_loss(lp64, lp64.detach(), seq_adv.double()[:, None].expand(B, T), mask.double(),
                                  0.2, 0.2, None, False)
    expect.backward()
    x = logits.clone().requires_grad_()
    loss, _ = F.policy_loss_from_logits(x, labels, mask, seq_adv, loss_agg_mode="seq-mean-token-mean")
    loss.backward()
    _close(loss, expect.detach())
    _close(x.grad, x64.grad)
