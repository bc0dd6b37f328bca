"""fastrlhf: fused kernels and a lean single-GPU trainer for PPO, PPO-max and APA.

Public functional API (see README): every op dispatches through `fastrlhf.ops`.
"""
from .fused_linear import fused_linear_batch_probs, fused_linear_logprobs, fused_linear_policy_loss
from .generation import Generation, generate
from .info import info
from .ops import (
    BatchProbs,
    LossConfig,
    apa_policy_loss,
    batch_entropy,
    batch_probs,
    gae,
    kl_penalty,
    logprobs_and_entropy,
    policy_loss_from_logits,
    ppo_policy_loss,
    sample_tokens,
    token_entropy,
    token_logprobs,
    use_backend,
    value_loss,
    whiten,
)

__version__ = "0.1.0"

__all__ = [
    "BatchProbs", "Generation", "LossConfig", "batch_probs", "fused_linear_batch_probs", "fused_linear_logprobs",
    "fused_linear_policy_loss", "generate", "info", "apa_policy_loss", "batch_entropy", "gae", "kl_penalty",
    "logprobs_and_entropy",
    "policy_loss_from_logits", "ppo_policy_loss", "sample_tokens", "token_entropy", "token_logprobs",
    "use_backend", "value_loss", "whiten",
]
