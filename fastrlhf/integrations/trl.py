"""TRL's GRPOTrainer with its log-probs, entropies and loss on fastrlhf's fused linear path (README,
"Use from TRL"): the [B, T, V] logits are never materialized, on-policy steps need no second pass.

    from fastrlhf.integrations.trl import GRPOTrainer      # instead of: from trl import GRPOTrainer
    trainer = GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...)

The constructor is TRL's own. Two TRL methods are replaced (trl/trainer/grpo_trainer.py, TRL 1.16):
`_get_per_token_logps_and_entropies` (the no-grad old / reference log-probs) and `_compute_loss` (one
`fastrlhf.fused_linear_policy_loss` call per micro-batch, then TRL's metrics under TRL's names). TRL's
loss, per `loss_type` (A the advantage, ρ = π/π_old, KL TRL's k3 of π against π_ref):

    per_token = −min(min(ρ, δ)·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·[ρ·]k3
    grpo     seq-mean-token-mean                      divided by gradient_accumulation_steps (GA)
    bnpo     token-mean over the micro-batch          divided by GA
    dr_grpo  Σ / (B · max_completion_length)          divided by GA
    dapo     Σ / (num_items_in_batch · GA / (steps_per_generation · processes))

which are fastrlhf's loss_agg_mode with a normalizer (`_aggregation`). TRL's δ (two-sided clipping,
arXiv:2505.07291) equals fastrlhf's dual clip c = δ for δ >= 1 + ε_high: for A < 0 both are the median
of (−Aρ, −A·clip(ρ), −Aδ), and for A > 0 the δ bound never binds. `use_bias_correction_kl` is
kl_importance_weighted (ρ·k3, differentiated through ρ as TRL does). Options whose maths the fused loss
does not express are refused at construction (`check_supported`).
"""
from __future__ import annotations

import inspect

import torch
import trl
from trl.trainer.utils import nanmax, nanmin

from .. import hf
from ..fused_linear import fused_linear_logprobs, fused_linear_policy_loss

# TRL loss_type -> fastrlhf loss_agg_mode
LOSS_TYPES = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
              "dapo": "token-mean"}


def check_supported(args) -> None:
    """ValueError naming the first GRPOConfig option (and its supported values) that the fused loss cannot
    express: other loss types, sequence-level importance sampling, the entropy bonus and high-entropy
    token mask, vLLM importance-sampling correction, the off-policy sequence mask, δ < 1 + ε_high."""
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    rules = [
        ("loss_type", args.loss_type, args.loss_type in LOSS_TYPES, f"one of {tuple(LOSS_TYPES)}"),
        ("importance_sampling_level", args.importance_sampling_level, args.importance_sampling_level == "token",
         "'token'"),
        ("epsilon", args.epsilon, 0 <= args.epsilon < 1, "a number in [0, 1)"),
        ("delta", args.delta, args.delta is None or (args.delta >= 1 + eps_high and args.delta > 1),
         f"None or a number > 1 and >= 1 + epsilon_high = {1 + eps_high}"),
        ("top_entropy_quantile", args.top_entropy_quantile, args.top_entropy_quantile == 1.0, "1.0"),
        ("entropy_coef", args.entropy_coef, args.entropy_coef == 0.0, "0.0"),
        ("use_adaptive_entropy", args.use_adaptive_entropy, not args.use_adaptive_entropy, "False"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold, args.off_policy_mask_threshold is None,
         "None"),
        ("use_vllm", args.use_vllm, not args.use_vllm, "False"),
    ]
    for name, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"fastrlhf.integrations.trl.GRPOTrainer: {name}: expected {expected}, got {value!r}")


class GRPOTrainer(trl.GRPOTrainer):
    """`trl.GRPOTrainer` (same constructor) with the fused linear path for log-probs, entropies and loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_supported(self.args)
        if self.aux_loss_enabled:
            raise ValueError("fastrlhf.integrations.trl.GRPOTrainer: router_aux_loss_coef: expected 0.0 for a "
                             f"mixture-of-experts model (its load-balancing loss is not added), got "
                             f"{self.router_aux_loss_coef!r}")

    __init__.__signature__ = inspect.signature(trl.GRPOTrainer.__init__)

    def _matmul_dtype(self):
        # TRL runs its head under accelerator.autocast(), or in float32 with cast_lm_head_to_fp32
        return torch.float32 if self.args.cast_lm_head_to_fp32 else "autocast"

    def _completion_hidden(self, model, input_ids, attention_mask, logits_to_keep):
        """Hidden states [B, k, H] whose logits predict the k completion tokens (positions −k−1 .. −2)."""
        hidden = hf.hidden_states(model, input_ids, attention_mask)
        return hidden[:, -logits_to_keep - 1:-1]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **multimodal):
        """TRL's signature: (log-probs [B, k], entropies [B, k] or None, None), 0 where attention_mask is 0."""
        given = sorted(k for k, v in multimodal.items() if v is not None)
        if given or compute_aux_loss:
            raise ValueError(f"fastrlhf.integrations.trl.GRPOTrainer: text-only models: expected no "
                             f"{given or ['compute_aux_loss']} inputs")
        batch_size = batch_size or input_ids.size(0)
        weight, bias = hf.output_layer(model)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            labels = ids[:, -logits_to_keep:].masked_fill(attn[:, -logits_to_keep:] == 0, -100)
            with self.accelerator.autocast():
                hidden = self._completion_hidden(model, ids, attn, logits_to_keep)
                lp, ent = fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=self.temperature,
                                                return_entropy=True, matmul_dtype=self._matmul_dtype())
            logps.append(lp)
            entropies.append(torch.where(labels != -100, ent, 0.0))
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _aggregation(self, inputs, mask, mode):
        """(loss_agg_mode, normalizer) of TRL's loss_type, gradient accumulation included (module docstring)."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":
            return "seq-mean-token-mean", mask.size(0) * accum
        if self.loss_type == "bnpo":
            return "token-mean", mask.sum().clamp(min=1.0) * accum
        if self.loss_type == "dr_grpo":
            return "seq-mean-token-sum-norm", mask.size(0) * self.max_completion_length * accum
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return "token-mean", normalizer

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        k = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mode = "train" if self.model.training else "eval"
        agg_mode, normalizer = self._aggregation(inputs, mask, mode)
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")            # None: on-policy
        ref_lp = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        weight, bias = hf.output_layer(model)
        with self.accelerator.autocast():
            hidden = self._completion_hidden(model, input_ids, attention_mask, k)
            loss, out = fused_linear_policy_loss(
                hidden, weight, completion_ids, mask, advantages, old, ref_lp, bias=bias,
                temperature=self.temperature, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
                dual_clip=self.args.delta, kl_coef=self.beta, kl_estimator="k3",
                kl_importance_weighted=bool(self.beta != 0.0 and self.args.use_bias_correction_kl),
                loss_agg_mode=agg_mode, normalizer=normalizer, matmul_dtype=self._matmul_dtype())
        self._log_loss_metrics(mode, out, old, advantages, mask)
        return loss

    def _log_loss_metrics(self, mode, out, old, advantages, mask):
        """TRL's metrics of `_compute_loss` (names and formulas): kl, entropy, clip ratios."""
        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):
            return (x * mask).sum(-1) / mask.sum(-1)

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(global_masked_mean(out["kl"]))
        metrics["entropy"].append(global_masked_mean(out["entropy"]))
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        lp = out["logprobs"]
        ratio = torch.ones_like(lp) if old is None else torch.exp(lp - old)
        if self.args.delta is not None:
            ratio = ratio.clamp(max=self.args.delta)
        low = (ratio < 1 - self.epsilon_low) & (adv < 0)
        high = (ratio > 1 + self.epsilon_high) & (adv > 0)
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low.float()))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high.float()))
        metrics["clip_ratio/region_mean"].append(global_masked_mean((low | high).float()))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low.float()))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high.float()))).item())


__all__ = ["GRPOTrainer", "LOSS_TYPES", "check_supported"]
