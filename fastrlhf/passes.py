"""Model passes over a batch of sequences [B, P + n] (README, "Sequence layout"): hidden states, response
log-probs and entropy, the supervised next-token loss, values. Every pass gives a token the position id
of `sequences.position_ids`, as generation does. The vocabulary-sized work is on the fused linear path
(README, "Fused linear path"): hidden states and the output layer's weight, never [B, n, V] logits.

The trainer (fastrlhf.train) and the warm-start (fastrlhf.warm_start) both run these passes.
"""
from __future__ import annotations

import torch

from . import hf
from .fused_linear import fused_linear_logprobs
from .models import Bundle, critic_hidden_states, values
from .ref import masked_mean
from .sequences import position_ids


def sequence_hidden_states(model, input_ids, attn) -> torch.Tensor:
    """Final hidden states [B, T, H] of a causal LM (peft-wrapped or not) over input_ids [B, T] with
    attention mask attn [B, T], at the position ids generation uses; no logits computed."""
    return hf.hidden_states(model, input_ids, attn, position_ids=position_ids(attn))


def response_logprobs_and_entropy(hidden, weight, bias, labels, temperature, chunk_size=None):
    """hidden [B, n, H], labels [B, n] -> (log-prob [B, n], entropy [B, n]) float32 of the labels under
    softmax(logits / temperature), without [B, n, V] logits."""
    return fused_linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                 chunk_size=chunk_size)


def nll(model, input_ids, attn, start: int, target_mask) -> torch.Tensor:
    """Mean next-token negative log-likelihood of input_ids[:, start:start+n] where target_mask [B, n]
    is 1 (supervised warm-start, ptx loss)."""
    n = target_mask.shape[1]
    weight, bias = hf.output_layer(model)
    labels = input_ids[:, start:start + n].masked_fill(target_mask == 0, -100)
    lp = fused_linear_logprobs(sequence_hidden_states(model, input_ids, attn)[:, start - 1:start - 1 + n], weight,
                               labels, bias=bias)
    return -masked_mean(lp, target_mask)


def value_forward(bundle: Bundle, input_ids, attn, policy_hidden, P: int, n: int) -> torch.Tensor:
    """Values [B, n] for the response positions: the head on the policy trunk (policy_hidden [B, n, H],
    the policy's hidden states at those positions), or on the critic."""
    if bundle.critic is not None:
        return values(bundle, critic_hidden_states(bundle, input_ids, attn)[:, P - 1:P - 1 + n])
    return values(bundle, policy_hidden)


__all__ = ["nll", "response_logprobs_and_entropy", "sequence_hidden_states", "value_forward"]
