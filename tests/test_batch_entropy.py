"""Batch entropy: the reference (torch) and the Triton kernels (kernels/batch_entropy.py, under
TRITON_INTERPRET=1 on CPU) against the float64 formula of README "Batch entropy", written here."""
import math

import pytest
import torch

import fastrlhf as F
from fastrlhf.kernels import token_logprobs as K

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _h_batch_f64(x, mask, tau):
    """p̄_t = Σ_b m_bt p_bt / Σ_b m_bt; H_batch = mean over positions with a valid token of −Σ p̄ log p̄."""
    p = torch.softmax(x.double() / tau, -1)
    m = mask.double()
    cnt = m.sum(0)
    pbar = (m[:, :, None] * p).sum(0) / cnt.clamp_min(1.0)[:, None]
    h_t = -(pbar * torch.log(torch.where(pbar > 0, pbar, torch.ones_like(pbar)))).sum(-1)
    return torch.where(cnt > 0, h_t, torch.zeros_like(h_t)).sum() / (cnt > 0).sum().clamp_min(1)


def _run(backend, x, mask, tau, upstream):
    xx = x.clone().requires_grad_()
    with F.use_backend(backend):
        h = F.batch_entropy(xx, mask, temperature=tau)
    (h * upstream).backward()
    return h, xx.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _mask(B, T):
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 1] = 0                                                    # a position with no valid token
    mask[0] = 0                                                       # an all-masked sequence
    mask[1, 0] = 1
    return mask


@pytest.mark.parametrize("V,block,dtype,tau", [
    (37, 4096, torch.float32, 1.0),
    (300, 128, torch.float32, 0.7),        # three vocabulary blocks, the last partial
    (300, 128, torch.bfloat16, 1.0),
    (37, 16, torch.float16, 1.3),
])
def test_value_and_grad_against_float64(monkeypatch, V, block, dtype, tau):
    monkeypatch.setattr(K, "MAX_BLOCK_V", block)
    B, T = 4, 5
    x = (torch.randn(B, T, V) * 2).to(dtype)
    mask = _mask(B, T)
    upstream = float(torch.rand(()) * 3 + 0.5)
    x64 = x.double().requires_grad_()
    (_h_batch_f64(x64, mask, tau) * upstream).backward()
    h64 = _h_batch_f64(x, mask, tau)
    h_r, grad_r = _run("torch", x, mask, tau, upstream)
    h_t, grad_t = _run("triton", x, mask, tau, upstream)
    assert h_t.dtype == torch.float32 and h_t.dim() == 0 and grad_t.dtype == dtype
    floor_g = 1e-7 + EPS[dtype] * x64.grad.abs().max().item()
    for fast, slow, exact, floor in ((h_t, h_r, h64, 1e-5), (grad_t, grad_r, x64.grad, floor_g)):
        e_ref, e_fast = _max_err(slow, exact), _max_err(fast, exact)
        assert e_ref <= 1e-4 + floor, "reference too far from float64"
        assert e_fast <= 2 * e_ref + floor, (e_fast, e_ref)
    assert (grad_t[0] == 0).all() and (grad_t[:, 1] == 0).all()       # masked tokens get no gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_zero_mask_is_zero_not_nan(backend):
    x = torch.randn(2, 3, 11)
    h, grad = _run(backend, x, torch.zeros(2, 3), 1.0, 1.0)
    assert h.item() == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_logits_stay_finite(backend):
    x = torch.randn(3, 4, 20)
    x[..., ::3] = float("-inf")
    mask = torch.ones(3, 4)
    h, grad = _run(backend, x, mask, 1.0, 1.0)
    x64 = x[..., torch.arange(20) % 3 != 0].double().requires_grad_()
    _h_batch_f64(x64, mask, 1.0).backward()
    assert torch.isfinite(h) and torch.isfinite(grad).all() and (grad[..., ::3] == 0).all()
    torch.testing.assert_close(h.double(), _h_batch_f64(x64.detach(), mask, 1.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[..., torch.arange(20) % 3 != 0].double(), x64.grad, atol=1e-6, rtol=1e-5)


def test_non_contiguous_logits():
    """A [B, T, V] view with strides from slicing a bigger buffer (as after logits[:, :-1])."""
    full = torch.randn(3, 6, 25)
    x = full[:, :-1]
    mask = torch.ones(3, 5)
    h_r, grad_r = _run("torch", x, mask, 1.0, 2.0)
    h_t, grad_t = _run("triton", x, mask, 1.0, 2.0)
    torch.testing.assert_close(h_t, h_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_t, grad_r, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_large_vocab_against_float64():
    """Real kernels (compiled, default blocks) on a 151936 vocabulary, bf16."""
    x = (torch.randn(4, 16, 151936) * 2).to(torch.bfloat16).cuda()
    mask = _mask(4, 16).cuda()
    x64 = x.double().requires_grad_()
    (_h_batch_f64(x64, mask, 1.0) * 1.7).backward()
    h64 = _h_batch_f64(x, mask, 1.0)
    h_r, grad_r = _run("torch", x, mask, 1.0, 1.7)
    h_t, grad_t = _run("triton", x, mask, 1.0, 1.7)
    assert _max_err(h_t, h64) <= 2 * _max_err(h_r, h64) + 1e-5
    floor_g = 1e-9 + EPS[torch.bfloat16] * x64.grad.abs().max().item()
    assert _max_err(grad_t, x64.grad) <= 2 * _max_err(grad_r, x64.grad) + floor_g


# ----------------------------------------------------------------------------------------------------
# The mini-batch's H_batch whatever the micro-batch: BatchProbs, batch_probs=, positions all | last
# ----------------------------------------------------------------------------------------------------

LENGTHS = [5, 3, 0, 2, 4, 1, 5, 2]           # right-padded responses of B = 8 rows, one empty


def _right_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def _h_last_f64(x, mask, tau):
    """Padula & Soemers' definition: p̄ = mean over the rows with a response of softmax at the row's last
    valid token, H = −Σ p̄ log p̄ (written with a loop over rows, not fastrlhf's helpers)."""
    rows = []
    for b in range(x.shape[0]):
        valid = mask[b].nonzero().flatten()
        if len(valid):
            rows.append(torch.softmax(x[b, valid[-1]].double() / tau, -1))
    pbar = torch.stack(rows).mean(0)
    return -(pbar * pbar.log()).sum()


def _loss_f64(x, labels, mask, adv, old, tau, ent_coef, bent, positions):
    """The whole mini-batch's loss: masked mean of the clipped PPO loss − ent_coef·H, − bent·H_batch."""
    logp = torch.log_softmax(x.double() / tau, -1)
    lp = logp.gather(-1, labels[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    ratio = torch.exp(lp - old.double())
    A = adv.double()
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2))
    m = mask.double()
    tok = ((pg - ent_coef * ent) * m).sum() / m.sum()
    h = _h_batch_f64(x, mask, tau) if positions == "all" else _h_last_f64(x, mask, tau)
    return tok - bent * h


def _problem(B=8, T=5, V=37, H=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = _right_mask(LENGTHS, T)
    labels = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 - 3.5
    if H is None:
        return (torch.randn(B, T, V, generator=g) * 2, labels, mask, adv, old)
    return (torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g),
            labels, mask, adv, old)


def _micro_batches(mask, k):
    """Rows of each micro-batch of k rows, and its columns: cut after its longest response, as the trainer's."""
    for idx in torch.arange(mask.shape[0]).split(k):
        yield idx, max(1, int(mask[idx].sum(1).max()))


def _accumulate(loss_fn, probs_fn, mask, k, bent, exact=True):
    """The trainer's recipe over micro-batches of k rows: each micro-batch's loss × its token share, its
    batch-entropy part with coefficient bent/share (weight 1); exact=False leaves the statistics out (each
    micro-batch's own H_batch: the old behaviour) -> the accumulated loss value."""
    stats = None
    if exact:
        for idx, n in _micro_batches(mask, k):
            part = probs_fn(idx, n)
            stats = part if stats is None else stats + part
    total = 0.0
    for idx, n in _micro_batches(mask, k):
        share = mask[idx].sum() / mask.sum()
        coef = bent / share.item() if exact and share > 0 else bent
        loss, out = loss_fn(idx, n, coef, stats)
        (loss * share).backward()
        total += (loss * share).item()
    return total, stats


def _logits_fns(xx, labels, mask, adv, old, tau, ent_coef, positions):
    """`_accumulate`'s (loss_fn, probs_fn) on the logits path: policy_loss_from_logits of the micro-batch's
    rows of the leaf xx [B, T, V] (old log-probs as the reference too), and its fastrlhf.batch_probs."""
    def loss_fn(idx, n, coef, stats):
        return F.policy_loss_from_logits(xx[idx, :n], labels[idx, :n], mask[idx, :n], adv[idx, :n], old[idx, :n],
                                         old[idx, :n], temperature=tau, entropy_coef=ent_coef,
                                         batch_entropy_coef=coef, batch_probs=stats)

    def probs_fn(idx, n):
        return F.batch_probs(xx.detach()[idx, :n], mask[idx, :n], temperature=tau, positions=positions)

    return loss_fn, probs_fn


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_path_micro_batches_equal_the_mini_batch(backend, positions):
    """policy_loss_from_logits with batch_probs= (the sum of the micro-batches' fastrlhf.batch_probs) gives,
    for micro-batches of 1, 2, 4 and 8 rows, the loss and logits gradient of the whole mini-batch (float64
    oracle); without it (each micro-batch's own H_batch) they differ."""
    x, labels, mask, adv, old = _problem()
    tau, ent_coef, bent = 0.9, 0.05, 0.7
    x64 = x.double().requires_grad_()
    want = _loss_f64(x64, labels, mask, adv, old, tau, ent_coef, bent, positions)
    want.backward()

    def run(k, exact=True):
        xx = x.clone().requires_grad_()
        with F.use_backend(backend):
            total, stats = _accumulate(*_logits_fns(xx, labels, mask, adv, old, tau, ent_coef, positions), mask, k,
                                       bent, exact)
        return total, xx.grad, stats

    for k in (1, 2, 4, 8):
        total, grad, stats = run(k)
        assert total == pytest.approx(want.item(), abs=2e-5), k
        torch.testing.assert_close(grad.double(), x64.grad, atol=2e-6, rtol=1e-4, msg=lambda e: f"k={k}: {e}")
        h = _h_batch_f64(x, mask, tau) if positions == "all" else _h_last_f64(x, mask, tau)
        assert stats.entropy().item() == pytest.approx(h.item(), abs=1e-5)
    if positions == "all":   # no statistics on one micro-batch: today's call, the same values
        total, grad, _ = run(8, exact=False)
        assert total == pytest.approx(want.item(), abs=2e-5)
        torch.testing.assert_close(grad.double(), x64.grad, atol=2e-6, rtol=1e-4)
    _, naive, _ = run(2, exact=False)
    assert (naive.double() - x64.grad).abs().max() > 1e-3          # per micro-batch H_batch is another gradient


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_micro_batches_equal_the_mini_batch(backend, positions):
    """fused_linear_policy_loss with batch_probs= (the sum of fused_linear_batch_probs over the
    micro-batches): loss and gradients w.r.t. hidden, weight and bias of micro-batches of 1, 2, 4, 8 rows
    equal the whole mini-batch's (float64 oracle on hidden @ Wᵀ + b)."""
    hid, w, bias, labels, mask, adv, old = _problem(V=29, H=12, seed=1)
    tau, ent_coef, bent = 1.1, 0.05, 0.7
    leaves64 = [t.double().requires_grad_() for t in (hid, w, bias)]
    x64 = leaves64[0] @ leaves64[1].t() + leaves64[2]
    want = _loss_f64(x64, labels, mask, adv, old, tau, ent_coef, bent, positions)
    want.backward()
    for k in (1, 2, 4, 8):
        leaves = [t.clone().requires_grad_() for t in (hid, w, bias)]

        def loss_fn(idx, n, coef, stats):
            return F.fused_linear_policy_loss(leaves[0][idx, :n], leaves[1], labels[idx, :n], mask[idx, :n],
                                              adv[idx, :n], old[idx, :n], old[idx, :n], bias=leaves[2], chunk_size=3,
                                              temperature=tau, entropy_coef=ent_coef, batch_entropy_coef=coef,
                                              batch_probs=stats)

        def probs_fn(idx, n):
            return F.fused_linear_batch_probs(hid[idx, :n], w, mask[idx, :n], bias=bias, temperature=tau,
                                              positions=positions, chunk_size=3)

        with F.use_backend(backend):
            total, stats = _accumulate(loss_fn, probs_fn, mask, k, bent)
        assert total == pytest.approx(want.item(), abs=2e-5), k
        for got, exact in zip(leaves, leaves64):
            torch.testing.assert_close(got.grad.double(), exact.grad, atol=2e-6, rtol=1e-4,
                                       msg=lambda e: f"k={k}: {e}")


@pytest.mark.cuda
@pytest.mark.parametrize("positions", ["all", "last"])
def test_cuda_micro_batches_equal_the_mini_batch(positions):
    """Real kernels (compiled, default blocks), a 151936 vocabulary in bf16: micro-batches of 2 rows with the
    mini-batch's statistics give its loss and logits gradient (float64 oracle), within bf16 rounding."""
    x, labels, mask, adv, old = (t.cuda() for t in _problem(V=151936))
    x = x.to(torch.bfloat16)
    tau, ent_coef, bent = 1.0, 0.05, 0.7
    x64 = x.double().requires_grad_()
    want = _loss_f64(x64, labels, mask, adv, old, tau, ent_coef, bent, positions)
    want.backward()
    xx = x.clone().requires_grad_()
    total, _ = _accumulate(*_logits_fns(xx, labels, mask, adv, old, tau, ent_coef, positions), mask, 2, bent)
    assert total == pytest.approx(want.item(), abs=1e-3)
    floor = EPS[torch.bfloat16] * x64.grad.abs().max().item()
    assert _max_err(xx.grad, x64.grad) <= 4 * floor


def test_batch_probs_are_sums_that_add_and_match_both_paths():
    """BatchProbs of two halves added = the whole's; the fused linear statistics = those of the logits;
    the Triton statistics = the reference's; 'last' reads each row's last valid token."""
    hid, w, bias, _, mask, _, _ = _problem(V=29, H=12, seed=2)
    x = hid @ w.t() + bias
    for positions in ("all", "last"):
        whole = F.batch_probs(x, mask, positions=positions)
        short, long = torch.tensor([2, 3, 5, 7]), torch.tensor([0, 1, 4, 6])     # responses of <= 2 and <= 5
        halves = F.batch_probs(x[short, :2], mask[short, :2], positions=positions) + \
            F.batch_probs(x[long], mask[long], positions=positions)             # G: 2 + 5 -> 5 ("all")
        fused = F.fused_linear_batch_probs(hid, w, mask, bias=bias, positions=positions, chunk_size=5)
        with F.use_backend("triton"):
            tri = F.batch_probs(x, mask, positions=positions)
        for other in (halves, fused, tri):
            torch.testing.assert_close(other.probs, whole.probs, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other.count, whole.count)
        p = torch.softmax(x.double(), -1)
        if positions == "all":
            want = (p * mask[..., None]).sum(0)
        else:
            last = [int(mask[b].nonzero().max()) for b in range(8) if mask[b].any()]
            want = sum(p[b, t] for b, t in zip([b for b in range(8) if mask[b].any()], last))[None]
        torch.testing.assert_close(whole.probs.double(), want, atol=1e-5, rtol=1e-5)
        assert whole.count.tolist() == (mask.sum(0).tolist() if positions == "all" else [7.0])


def test_batch_probs_checks():
    x, labels, mask, adv, old = _problem()
    stats = F.batch_probs(x, mask, temperature=0.9)
    kw = dict(batch_entropy_coef=0.1, temperature=0.9)
    with pytest.raises(ValueError, match="batch_probs: expected statistics at the loss's temperature 1.0, got 0.9"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, old, batch_entropy_coef=0.1, batch_probs=stats)
    with pytest.raises(ValueError, match="batch_probs: expected None with batch_entropy_coef=0"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, old, temperature=0.9, batch_probs=stats)
    short = F.batch_probs(x[:, :3], mask[:, :3], temperature=0.9)
    with pytest.raises(ValueError, match=r"batch_probs: expected float32 probs \[G >= 5, 37\]"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, old, batch_probs=short, **kw)
    with pytest.raises(TypeError, match="batch_probs: expected None or a fastrlhf.BatchProbs, got tuple"):
        F.policy_loss_from_logits(x, labels, mask, adv, old, old, batch_probs=(stats.probs, stats.count), **kw)
    with pytest.raises(ValueError, match="positions: expected one of"):
        F.batch_probs(x, mask, positions="first")
    with pytest.raises(ValueError, match="other: expected BatchProbs with positions='all'"):
        stats + F.batch_probs(x, mask, temperature=0.9, positions="last")


# ----------------------------------------------------------------------------------------------------
# Through the trainer: the update and metrics.jsonl
# ----------------------------------------------------------------------------------------------------

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]


def _trainer_run(tmp_path, positions):
    """An 8-row rollout (one mini-batch) of a perturbed tiny policy with a varied reward."""
    import random

    from fastrlhf import train
    from fastrlhf.config import parse_args
    fn = tmp_path / "varied.py"
    fn.write_text("def score(prompts, responses):\n"
                  "    return [len(r) / 3 + sum(c.isdigit() for c in r) for r in responses]\n")
    cfg = parse_args(["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_batch_size", "8",
                      "--num_mini_batches", "1", "--ppo_epochs", "1", "--sft_steps", "0", "--max_new_tokens", "4",
                      "--min_new_tokens", "1", "--digits", "2", "--reward", f"{fn}:score",
                      "--batch_entropy_coef", "0.5", "--batch_entropy_positions", positions, "--temperature", "0.9",
                      *TINY])
    run = train.setup(cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in run.bundle.policy_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    roll = train.rollout(run, run.job.task.sample(8, random.Random(5)))
    assert len(set(roll.mask.sum(1).tolist())) > 1                     # ragged responses
    return run, roll


def _h_formula(run, roll, positions, tau):
    """H_batch of the rollout's rows from a plain float64 HF forward (no fastrlhf op)."""
    m = roll.mask.double()
    n = m.shape[1]
    pos = (roll.attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = run.bundle.policy(input_ids=roll.input_ids, attention_mask=roll.attn, position_ids=pos).logits
    x = logits[:, roll.P - 1:roll.P - 1 + n].double()
    return (_h_batch_f64(x, m, tau) if positions == "all" else _h_last_f64(x, m, tau)).item()


@pytest.mark.parametrize("positions", ["all", "last"])
def test_trainer_update_is_the_same_for_every_micro_batch_size(tmp_path, monkeypatch, positions):
    """One update over an 8-row mini-batch with per_device_batch_size 1, 2, 4 (gradient accumulation 8, 4,
    2) and 8: the same gradient before the optimizer step and the same parameters after it; the logged
    batch_entropy is the mini-batch's H_batch from an independent float64 forward. Without the pre-pass
    (each micro-batch's own H_batch) the gradient differs."""
    import dataclasses

    from fastrlhf import checkpoint, train
    run, roll = _trainer_run(tmp_path, positions)
    snap, shuffle = train.update_snapshot(run), run.streams.shuffle.get_state()
    h_want = _h_formula(run, roll, positions, 0.9)
    real_accumulate, grads = train.accumulate_gradients, []

    def spy(run, roll, mini, loss_cfg):
        out = real_accumulate(run, roll, mini, loss_cfg)
        grads.append([p.grad.clone() for p in run.bundle.policy_parameters()])
        return out

    monkeypatch.setattr(train, "accumulate_gradients", spy)

    def update(k):
        checkpoint.load_weights(run, snap)
        run.optim.optimizer.load_state_dict(snap["optimizer"])
        run.optim.scheduler.load_state_dict(snap["scheduler"])
        run.streams.shuffle.set_state(shuffle)
        run.cfg = dataclasses.replace(run.cfg, per_device_batch_size=k, gradient_accumulation_steps=8 // k)
        run.sizes.micro_batch = k
        stats = train.update(run, roll)
        return stats, grads[-1], [p.detach().clone() for p in run.bundle.policy_parameters()]

    stats8, grad8, params8 = update(8)
    assert stats8["batch_entropy"] == pytest.approx(h_want, rel=1e-5)
    for k in (1, 2, 4):
        stats, grad, params = update(k)
        assert stats["batch_entropy"] == pytest.approx(h_want, rel=1e-5), k
        for a, b in zip(grad, grad8):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4, msg=lambda e: f"k={k}: {e}")
        for a, b in zip(params, params8):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    monkeypatch.setattr(train, "mini_batch_probs", lambda *a: None)    # each micro-batch's own H_batch
    _, naive, _ = update(2)
    assert max((a - b).abs().max().item() for a, b in zip(naive, grad8)) > 1e-3 * max(
        b.abs().max().item() for b in grad8)


def test_metrics_log_batch_entropy_each_step_only_when_it_is_on(tmp_path):
    from fastrlhf import metrics, train
    base = ["--max_steps", "2", "--per_device_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--num_mini_batches", "1", "--ppo_epochs", "1", "--sft_steps", "0", "--eval_samples", "4", *TINY]
    for coef, logged in (("0.2", True), ("0", False)):
        out = tmp_path / f"run{coef}"
        assert train.main(["--output_dir", str(out), "--batch_entropy_coef", coef, *base]) == 0
        recs = metrics.read_metrics(out / "metrics.jsonl")
        assert [("batch_entropy" in r) for r in recs] == [logged, logged]
        if logged:
            assert all(0 < r["batch_entropy"] <= math.log(train.setup(train.parse_args(
                ["--output_dir", str(out), "--overwrite_output_dir", *base])).bundle.policy.config.vocab_size)
                for r in recs)


@pytest.mark.parametrize("positions", ["all", "last"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_masked_rows_reaches_no_statistic_value_or_gradient(backend, positions):
    """NaN logits / hidden states at masked positions (padding, the empty row): BatchProbs, the loss with
    batch_probs= and its gradient are those of the clean inputs, with a gradient of exactly 0 there."""
    hid, w, bias, labels, mask, adv, old = _problem(V=29, H=12, seed=3)
    dirty = hid.masked_fill((mask == 0)[..., None], float("nan"))
    kw = dict(temperature=1.0, batch_entropy_coef=0.4)
    with F.use_backend(backend):
        for make in (lambda h: h @ w.t() + bias, None):          # the logits path, then the fused linear path
            results = []
            for h in (hid, dirty):
                leaf = (make(h) if make else h).detach().requires_grad_()
                if make:
                    stats = F.batch_probs(leaf.detach(), mask, positions=positions)
                    loss, out = F.policy_loss_from_logits(leaf, labels, mask, adv, old, old, batch_probs=stats, **kw)
                else:
                    stats = F.fused_linear_batch_probs(h, w, mask, bias=bias, positions=positions, chunk_size=7)
                    loss, out = F.fused_linear_policy_loss(leaf, w, labels, mask, adv, old, old, bias=bias,
                                                           chunk_size=7, batch_probs=stats, **kw)
                loss.backward()
                results.append((stats.probs, loss.detach(), out["batch_entropy"], leaf.grad))
            for clean, got in zip(*results):
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, clean, atol=1e-6, rtol=1e-5)
            assert (results[1][3][mask == 0] == 0).all()


def test_fused_linear_batch_probs_mixed_dtypes_follow_matmul_dtype():
    """bf16 hidden states with an fp32 weight (autocast's layout): the statistics are those of the promoted
    fp32 GEMM by default and of the bf16 GEMM with matmul_dtype=bfloat16, against float64 sums of the
    softmax of the logits computed in that dtype; they feed the mixed-dtype loss."""
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 4, 16, 29
    h = torch.randn(B, T, H, generator=g).to(torch.bfloat16)
    w = torch.randn(V, H, generator=g) * 0.3
    mask = _mask(B, T)
    for dtype in (None, torch.bfloat16):
        stats = F.fused_linear_batch_probs(h, w, mask, temperature=0.9, matmul_dtype=dtype)
        x = (h.float() @ w.t()) if dtype is None else (h @ w.to(torch.bfloat16).t())
        p = torch.softmax(x.double() / 0.9, -1)
        torch.testing.assert_close(stats.probs.double(), (mask.double()[..., None] * p).sum(0), rtol=1e-5, atol=1e-6)
    labels = torch.randint(0, V, (B, T), generator=g)
    z = torch.zeros(B, T)
    stats = F.fused_linear_batch_probs(h, w, mask, temperature=0.9)
    loss, out = F.fused_linear_policy_loss(h, w, labels, mask, z, z, z, temperature=0.9, batch_entropy_coef=0.2,
                                           batch_probs=stats)
    assert torch.isfinite(loss) and out["batch_entropy"].item() == pytest.approx(stats.entropy().item())
