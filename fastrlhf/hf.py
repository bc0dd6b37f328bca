"""Hugging Face causal LMs on the fused linear path: final hidden states and the output layer, so a
trainer calls `fused_linear_policy_loss(hidden, weight, ...)` instead of `model(...).logits`.

Works on a plain `*ForCausalLM`, a peft-wrapped one (LoRA adapters in the trunk) and one with a
bitsandbytes 4/8-bit trunk (the output layer stays unquantized in transformers). Tied output layers
(GPT-2, `tie_word_embeddings=True`) need nothing special: the weight returned *is* the embedding
matrix and autograd sums both uses.

Logit transforms in the model's forward (transformers modeling files):
    logits * config.logit_scale            Cohere, Cohere2        -> folded into the hidden states
    logits / config.logits_scaling         Granite family         -> folded into the hidden states
    logits * config.logits_scaling         HyperCLOVA X           -> folded into the hidden states
    logits * config.lm_head_multiplier     Falcon-H1              -> folded into the hidden states
    tanh soft-capping (final_logit_softcapping, Gemma 2/3, ...)   -> refused: not linear in hidden
so that always `hidden_states(model, ...) @ weightᵀ + bias == model(...).logits`.

Distributed wrappers: a DistributedDataParallel model is unwrapped (`.module`) to find the output layer,
and an FSDP2 (`fully_shard`) model's sharded output weight is gathered (DTensor.full_tensor, which
autograd reduces back to the shards); in both the wrapper's own forward runs (it syncs gradients or
gathers parameters there), with output_hidden_states=True and logits_to_keep=1, so that one position of
logits is computed instead of [B, T, V].
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

# config field -> {model_type prefix: "mul" | "div"} (how the model applies it to its logits).
_SCALE_FIELDS = {
    "logit_scale": {"cohere": "mul"},
    "logits_scaling": {"granite": "div", "hyperclovax": "mul"},
    "lm_head_multiplier": {"falcon_h1": "mul"},
}


def _wrapped(model: nn.Module) -> bool:
    """True for a model whose forward must not be bypassed: DDP, or an FSDP2 (`fully_shard`) root."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                         # torch without distributed
        return False
    return isinstance(model, FSDPModule)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers `*ForCausalLM` inside a DDP and / or peft wrapper (itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model"):       # peft.PeftModel
        model = model.get_base_model()
    if not hasattr(model, "base_model_prefix") or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers causal LM (optionally peft-wrapped), "
                        f"got {type(model).__name__}")
    return model


def logit_scale(model: nn.Module) -> float:
    """s such that model(...).logits = s · (final hidden @ Wᵀ + b); ValueError for a logit transform that
    is not a scale (soft-capping) or a scale field this module does not know for the model type."""
    config = _unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(f"model: config.final_logit_softcapping = {cap} (tanh soft-capping of the logits) is "
                         f"not linear in the hidden states, so the fused linear path cannot apply it; "
                         f"use policy_loss_from_logits on model(...).logits")
    scale = 1.0
    model_type = getattr(text, "model_type", "") or ""
    for field, rules in _SCALE_FIELDS.items():
        value = getattr(text, field, None)
        if value is None:
            continue
        how = next((h for prefix, h in rules.items() if model_type.startswith(prefix)), None)
        if how is None:
            raise ValueError(f"model: config.{field} = {value} on model_type {model_type!r}: unknown logit "
                             f"transform for this model type (known: {rules}); refusing to guess")
        scale = scale * float(value) if how == "mul" else scale / float(value)
    return scale


def output_layer(model: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, H], bias [V] or None) of the model's output layer, the live parameters (gradients
    flow into them; a tied weight is the input embedding matrix)."""
    base = _unwrap(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"model: {type(base).__name__} has no output embeddings (get_output_embeddings() "
                         f"returned None)")
    if hasattr(head, "base_layer") or not isinstance(head, nn.Linear):
        raise ValueError(f"model: the output layer is a {type(head).__name__}, expected a plain nn.Linear "
                         f"(merge or drop adapters on lm_head; only the trunk may carry LoRA)")
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):          # FSDP2: a sharded DTensor; gathered, differentiably
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    if not weight.dtype.is_floating_point or weight.dim() != 2:
        raise TypeError(f"model: output layer weight: expected a floating [V, H] tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)} (a quantized lm_head cannot be used)")
    return weight, bias


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                  **kwargs) -> torch.Tensor:
    """Final hidden states [B, T, H] of the model's trunk (no logits computed), multiplied by the
    model's logit scale (`logit_scale`) and cast to the output layer's dtype, so that
    `hidden @ weightᵀ + bias` equals `model(input_ids, attention_mask, **kwargs).logits`.

    kwargs go to the trunk (e.g. position_ids); use_cache defaults to False. A DDP or FSDP2 model runs
    through its wrapper's forward (module docstring).
    """
    base = _unwrap(model)
    trunk = base.base_model
    if trunk is base:
        raise ValueError(f"model: {type(base).__name__} has no trunk attribute "
                         f"{base.base_model_prefix!r} (base_model_prefix)")
    weight, bias = output_layer(model)
    scale = logit_scale(model)
    if scale != 1.0 and bias is not None:
        raise ValueError(f"model: logit scale {scale} with an output bias cannot be folded into the hidden "
                         f"states")
    kwargs.setdefault("use_cache", False)
    if _wrapped(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                    logits_to_keep=1, **kwargs)
        hidden = out.hidden_states[-1]          # after the final norm (transformers' convention)
    else:
        out = trunk(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if scale != 1.0:
        hidden = hidden * scale
    return hidden.to(weight.dtype)


__all__ = ["hidden_states", "output_layer", "logit_scale"]
