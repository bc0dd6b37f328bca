"""How models are loaded, and where every byte goes.

`load(cfg, device) -> Bundle` loads any Hugging Face causal LM by name or path (or the built-in tiny
Llama when `model_name_or_path` is None) through one path: dtype, attention implementation, optional
bitsandbytes 4/8-bit base, optional LoRA (peft), the value head or a separate critic, and the reference
policy, with as few copies of the weights as the options allow:

    options                    policy                 reference                     critic
    use_peft                   base + LoRA adapter    same model, adapter disabled  value head on the trunk
    use_peft + load_in_4bit/8  quantized base + LoRA  same model, adapter disabled  value head on the trunk
    full fine-tuning           base                   frozen copy (8-bit with       value head on the trunk
                                                      ref_load_in_8bit)
    critic_model_name_or_path  (any of the above)     (as above)                    separate trunk (AutoModel,
                                                                                    no LM head) + value head,
                                                                                    LoRA/quantized like policy;
                                                                                    a one-label reward model's
                                                                                    score layer seeds the head

`validate(cfg)` rejects bad combinations before any weight is created (it reads only configs and
builds the architecture on the meta device to check LoRA target names).

Memory budget helpers (used by the trainer): `set_memory_cap`, `free_memory_bytes`, `plan_memory`
(micro-batch and loss chunk sizes from free memory and shapes), `out_of_memory_message`, and
`PhaseMemory` (peak memory per phase: generation, scoring, update).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Union

import torch
from torch import nn

from .tokenizer import CharTokenizer, load_tokenizer

log = logging.getLogger("fastrlhf")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")


@dataclass
class ModelConfig:
    """Model-loading options; each field is also a `fastrlhf train` flag `--<field>` (fastrlhf.config)."""

    # Hugging Face name or local path of a causal LM; None = the built-in tiny Llama (CharTokenizer, random
    # init from `tiny_seed`, saved to a temporary directory and loaded back through the same path).
    model_name_or_path: Optional[str] = None
    # "auto" = bfloat16 on CUDA, float32 on CPU; else float32 | bfloat16 | float16 (non-quantized weights).
    dtype: str = "auto"
    # "auto" = flash_attention_2 when flash_attn imports and the device is CUDA with a 16-bit dtype, else sdpa.
    attn_implementation: str = "auto"
    # LoRA through peft. Targets: "all-linear" (every linear layer but the output layer), or module names
    # (a list, or one comma-separated string), matched like peft does: the full name or its last
    # components (".q_proj"). Names that match no module are an error.
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: Union[str, list] = "all-linear"
    # Quantized base (bitsandbytes); trains only through LoRA (use_peft).
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"  # nf4 | fp4
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: str = "auto"  # "auto" = the resolved `dtype`
    # Without LoRA the reference policy is a frozen copy; load it in 8-bit to halve (bf16) its bytes. Its
    # KL to the policy is then not exactly 0 at the first step (quantization error).
    ref_load_in_8bit: bool = False
    # Separate critic trunk (name or path; the trainer may default it to the reward model for ppo-max).
    # None = the value head sits on the policy's own trunk (no second model).
    critic_model_name_or_path: Optional[str] = None
    # Whether the trainer needs values at all (False for algorithms without a critic: no head is built).
    value_head: bool = True
    gradient_checkpointing: bool = False
    # Cap this process's GPU memory at this many GiB (torch per-process memory fraction); None = no cap.
    max_memory_gb: Optional[float] = None
    # The built-in tiny Llama (model_name_or_path=None). Sized so the default training job runs in about a
    # minute on 2 CPU cores: 0.68M parameters (vocab 100 = CharTokenizer).
    tiny_hidden_size: int = 128
    tiny_num_layers: int = 4
    tiny_num_heads: int = 4
    tiny_intermediate_size: int = 256
    tiny_max_positions: int = 512
    tiny_seed: int = 0


@dataclass
class Bundle:
    """Everything the trainer needs from the models. `reference()` is a context manager yielding the
    reference policy (`with bundle.reference() as ref: ...`): the policy with its adapter disabled under
    LoRA, else a frozen copy. Under LoRA the reference's log-probs equal the policy's bit for bit before
    the first update when both are computed the same way: same train/eval mode and both under no_grad
    (bitsandbytes runs different kernels for each, ~1e-3 apart on CPU 4-bit). `value_head` is nn.Linear(H, 1) in fp32 (zero-initialized, so values start
    at 0) on the policy's trunk, or on `critic`'s when there is one; None when cfg.value_head is False."""

    policy: nn.Module
    tokenizer: object
    value_head: Optional[nn.Linear]
    critic: Optional[nn.Module]
    reference: Callable[[], ContextManager[nn.Module]]
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy's trainable parameters: its LoRA adapters, or all its weights."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head's parameters, then the critic's trainable weights (empty without either)."""
        params = list(self.value_head.parameters()) if self.value_head is not None else []
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        return params

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates: `policy_parameters()` then `critic_parameters()`. Frozen
        reference weights are never included."""
        return self.policy_parameters() + self.critic_parameters()


# --------------------------------------------------------------------------------------------------------
# Resolving "auto" options and validating
# --------------------------------------------------------------------------------------------------------

def resolve_dtype(cfg: ModelConfig, device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


def resolve_attn_implementation(cfg: ModelConfig, device, dtype: torch.dtype) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    cuda = torch.device(device).type == "cuda"
    if cuda and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_config(cfg: ModelConfig, tokenizer: CharTokenizer):
    """LlamaConfig of the built-in tiny model (vocab = the CharTokenizer's)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=cfg.tiny_hidden_size,
        intermediate_size=cfg.tiny_intermediate_size, num_hidden_layers=cfg.tiny_num_layers,
        num_attention_heads=cfg.tiny_num_heads, num_key_value_heads=cfg.tiny_num_heads,
        max_position_embeddings=cfg.tiny_max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def _hf_config(name_or_path: Optional[str], cfg: ModelConfig):
    """The architecture config (config.json only; no weights)."""
    if name_or_path is None:
        return tiny_config(cfg, CharTokenizer())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path)


def _target_list(targets) -> Union[str, list]:
    if isinstance(targets, str):
        if targets == "all-linear":
            return targets
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"lora_target_modules: expected 'all-linear' or a non-empty list of module names, "
                         f"got {targets!r}")
    return list(targets)


def linear_module_names(hf_config, trunk_only: bool = False) -> list[str]:
    """Names of the linear layers (nn.Linear, and GPT-2's Conv1D) of the architecture, built on the meta
    device (no memory, no weights). The output layer is excluded (LoRA's "all-linear" excludes it too)."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    auto = AutoModel if trunk_only else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(hf_config)
    out_layer = model.get_output_embeddings() if not trunk_only else None
    return [name for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, Conv1D)) and mod is not out_layer]


def _check_lora_targets(targets, names: list[str], what: str) -> None:
    if targets == "all-linear":
        if not names:
            raise ValueError(f"lora_target_modules: 'all-linear' matches no linear layer of {what}")
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"lora_target_modules: {missing} match no module of {what}; "
                         f"its linear layers are named {leaves}")


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError for a bad combination of options, before any weight is loaded or created."""
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.bnb_4bit_compute_dtype != "auto" and cfg.bnb_4bit_compute_dtype not in DTYPES:
        raise ValueError(f"bnb_4bit_compute_dtype: expected 'auto' or one of {sorted(DTYPES)}, "
                         f"got {cfg.bnb_4bit_compute_dtype!r}")
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, "
                         f"got {cfg.attn_implementation!r}")
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attn_implementation: 'flash_attention_2' needs the flash-attn package, which is not "
                         "installed; use 'sdpa' or 'auto'")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit: expected at most one, got both")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and not cfg.use_peft:
        flag = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        raise ValueError(f"{flag}: a quantized base cannot be fully fine-tuned; expected use_peft=True "
                         f"(train LoRA adapters on it), got use_peft=False")
    if cfg.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type: expected 'nf4' or 'fp4', got {cfg.bnb_4bit_quant_type!r}")
    if cfg.ref_load_in_8bit and cfg.use_peft:
        raise ValueError("ref_load_in_8bit: with use_peft the reference is the policy with its adapter "
                         "disabled (no copy to quantize); expected ref_load_in_8bit=False")
    if (cfg.load_in_4bit or cfg.load_in_8bit or cfg.ref_load_in_8bit) and importlib.util.find_spec(
            "bitsandbytes") is None:
        raise ValueError("load_in_4bit/load_in_8bit/ref_load_in_8bit: need the bitsandbytes package "
                         "(pip install 'fastrlhf[quant]'), which is not installed")
    if cfg.critic_model_name_or_path is not None and not cfg.value_head:
        raise ValueError("critic_model_name_or_path: a critic needs a value head; expected value_head=True")
    if cfg.use_peft:
        if cfg.lora_r <= 0:
            raise ValueError(f"lora_r: expected > 0, got {cfg.lora_r}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected in [0, 1), got {cfg.lora_dropout}")
        targets = _target_list(cfg.lora_target_modules)
        name = cfg.model_name_or_path or "the built-in tiny model"
        _check_lora_targets(targets, linear_module_names(_hf_config(cfg.model_name_or_path, cfg)), name)
        if cfg.critic_model_name_or_path is not None:
            critic_cfg = _hf_config(cfg.critic_model_name_or_path, cfg)
            _check_lora_targets(targets, linear_module_names(critic_cfg, trunk_only=True),
                                f"the critic {cfg.critic_model_name_or_path}")
    if cfg.critic_model_name_or_path is not None:
        vp = _hf_config(cfg.model_name_or_path, cfg).vocab_size
        vc = _hf_config(cfg.critic_model_name_or_path, cfg).vocab_size
        if vp != vc:
            raise ValueError(f"critic_model_name_or_path: the critic reads the policy's token ids, expected "
                             f"vocab_size {vp} (the policy's), got {vc}")


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def _quantization_config(cfg: ModelConfig, dtype: torch.dtype, bits: Optional[int]):
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if cfg.bnb_4bit_compute_dtype == "auto" else DTYPES[cfg.bnb_4bit_compute_dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute)


def _dtype_kwarg() -> str:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _from_pretrained(auto, path: str, device: torch.device, dtype: torch.dtype, attn: str, bits: Optional[int],
                     cfg: ModelConfig) -> nn.Module:
    """One model from a checkpoint directory or hub name, placed on `device` while loading."""
    kwargs = dict(attn_implementation=attn, device_map={"": device},
                  quantization_config=_quantization_config(cfg, dtype, bits))
    kwargs[_dtype_kwarg()] = dtype
    try:
        model = auto.from_pretrained(path, **kwargs)
    except ValueError as exc:  # architecture without SDPA support: fall back to eager attention
        if cfg.attn_implementation != "auto" or "sdpa" not in str(exc).lower():
            raise
        log.info("%s has no SDPA attention; using eager attention", path)
        model = auto.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})
    if bits == 4 and device.type == "cpu":
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a Linear4bit's weight for inference at its first
        # eval-mode no-grad forward, and keeps it packed: later training forwards then run a kernel with no
        # autograd (input gradients silently dropped, or an in-place error with a bias). Rollouts run in
        # eval mode and updates in train mode, so keep the trainable layout.
        for mod in model.modules():
            if hasattr(mod, "support_avx512bf16_for_cpu"):
                mod.support_avx512bf16_for_cpu = False
    return model


def _lora_config(cfg: ModelConfig, task_type: Optional[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=_target_list(cfg.lora_target_modules), task_type=task_type, bias="none")


def _prepare_trainable(model: nn.Module, cfg: ModelConfig, task_type: Optional[str]) -> nn.Module:
    """Gradient checkpointing, then the LoRA adapter (peft freezes the base)."""
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs (LoRA), no enable_input_require_grads needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(cfg, task_type))
    return model


@contextlib.contextmanager
def _checkpoint_path(cfg: ModelConfig, tokenizer):
    """The checkpoint to load from: the given name/path, or the tiny model saved to a temporary directory
    (built with `tiny_seed`, so every load of the default model has the same weights)."""
    if cfg.model_name_or_path is not None:
        yield cfg.model_name_or_path
        return
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="fastrlhf-tiny-") as tmp:
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.tiny_seed)
        try:
            LlamaForCausalLM(tiny_config(cfg, tokenizer)).save_pretrained(tmp)
        finally:
            torch.random.set_rng_state(rng_state)
        tokenizer.save_pretrained(tmp)
        yield tmp


def reward_head(name_or_path: str, hidden: int):
    """(weight [1, H], bias [1] or None) of the one-output classification layer ("score" in transformers'
    *ForSequenceClassification decoders, "classifier" in encoders) of a reward-model checkpoint (local
    directory or hub name, safetensors), or None when the checkpoint has no such [1, H] layer."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    opt = dict(_raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
    index = cached_file(name_or_path, "model.safetensors.index.json", **opt)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = {None: "model.safetensors"}
    for key, filename in weight_map.items():
        if key is not None and not key.endswith(("score.weight", "classifier.weight")):
            continue
        path = cached_file(name_or_path, filename, **opt)
        if path is None:
            return None
        with safe_open(path, "pt") as f:
            keys = [k for k in f.keys() if k.split(".")[-2:] in (["score", "weight"], ["classifier", "weight"])]
            for k in keys:
                w = f.get_tensor(k)
                if tuple(w.shape) == (1, hidden):
                    b = k[:-len("weight")] + "bias"
                    return w.float(), (f.get_tensor(b).float() if b in f.keys() else None)
    return None


def load(cfg: ModelConfig, device: Union[str, torch.device] = "cpu") -> Bundle:
    """Validate `cfg`, apply the memory cap, and load policy, tokenizer, value head, critic and reference."""
    validate(cfg)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    set_memory_cap(cfg.max_memory_gb, device)
    dtype = resolve_dtype(cfg, device)
    attn = resolve_attn_implementation(cfg, device, dtype)
    bits = 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    from transformers import AutoModel, AutoModelForCausalLM

    with _checkpoint_path(cfg, tokenizer) as path:
        policy = _prepare_trainable(_from_pretrained(AutoModelForCausalLM, path, device, dtype, attn, bits, cfg),
                                    cfg, "CAUSAL_LM")
        frozen = None
        if not cfg.use_peft:
            frozen = _from_pretrained(AutoModelForCausalLM, path, device, dtype, attn,
                                      8 if cfg.ref_load_in_8bit else None, cfg)
            frozen.eval().requires_grad_(False)
    critic = None
    if cfg.critic_model_name_or_path is not None:
        critic = _prepare_trainable(
            _from_pretrained(AutoModel, cfg.critic_model_name_or_path, device, dtype, attn, bits, cfg),
            cfg, "FEATURE_EXTRACTION")
    value_head = None
    if cfg.value_head:
        hidden = (critic if critic is not None else policy).config.hidden_size
        value_head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        head = reward_head(cfg.critic_model_name_or_path, hidden) if critic is not None else None
        if head is not None:  # a reward model as critic: start the values at its per-token scores
            with torch.no_grad():
                value_head.weight.copy_(head[0])
                if head[1] is not None:
                    value_head.bias.copy_(head[1])
            log.info("value head initialized from the score head of %s", cfg.critic_model_name_or_path)

    if cfg.use_peft:
        @contextlib.contextmanager
        def reference():
            with policy.disable_adapter():
                yield policy
    else:
        @contextlib.contextmanager
        def reference():
            yield frozen

    return Bundle(policy=policy, tokenizer=tokenizer, value_head=value_head, critic=critic,
                  reference=reference, config=cfg, device=device, dtype=dtype)


def values(bundle: Bundle, hidden_states: torch.Tensor) -> torch.Tensor:
    """Values [B, T] (fp32) from final hidden states [B, T, H] of the value head's trunk: the policy's
    (e.g. `fastrlhf.hf.hidden_states(policy, ...)`) or, with a critic, `critic_hidden_states(...)`."""
    if bundle.value_head is None:
        raise ValueError("bundle.value_head: expected a value head, got None (loaded with value_head=False)")
    head = bundle.value_head
    if hidden_states.shape[-1] != head.in_features:
        raise ValueError(f"hidden_states: expected last dim {head.in_features}, got {tuple(hidden_states.shape)}")
    return head(hidden_states.to(head.weight.dtype)).squeeze(-1)


def critic_hidden_states(bundle: Bundle, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, H] of the separate critic trunk (positions counted over the attention mask,
    as in generation with left padding)."""
    if bundle.critic is None:
        raise ValueError("bundle.critic: expected a separate critic, got None (value head on the policy trunk)")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = bundle.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return out.last_hidden_state


def make_optimizer(params, name: str = "adamw_torch", lr: float = 1e-5, weight_decay: float = 0.0,
                   betas: tuple = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """`--optim`: adamw_torch (torch.optim.AdamW; fused kernel on CUDA), adamw_8bit (bitsandbytes 8-bit
    states: 2 bytes/param of state instead of 8), paged_adamw_8bit (same, states in paged unified memory
    that spill to the host under pressure). bitsandbytes >= 0.45 also runs both on the CPU (paged
    falls back to non-paged there)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params: expected at least one trainable parameter, got none")
    if name == "adamw_torch":
        fused = all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError(f"optim: {name!r} needs the bitsandbytes package (pip install 'fastrlhf[quant]'); "
                             f"use 'adamw_torch' without it") from exc
        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
    raise ValueError(f"optim: expected one of {OPTIMIZERS}, got {name!r}")


# --------------------------------------------------------------------------------------------------------
# Memory budget
# --------------------------------------------------------------------------------------------------------

_CAP_BYTES: dict = {}  # CUDA device index -> cap in bytes set by set_memory_cap (torch has no getter in 2.11)


def set_memory_cap(max_memory_gb: Optional[float], device: Union[str, torch.device] = "cuda") -> Optional[float]:
    """Cap this process's memory on a CUDA device at `max_memory_gb` GiB (per-process memory fraction: the
    caching allocator raises OutOfMemoryError past it, so a 24 GB card can be emulated on a larger one).
    Returns the fraction set, or None (no cap given, or a non-CUDA device: a no-op, logged)."""
    if max_memory_gb is None:
        return None
    if max_memory_gb <= 0:
        raise ValueError(f"max_memory_gb: expected > 0, got {max_memory_gb}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        log.info("max_memory_gb=%s: no effect on device %s (the cap applies to CUDA memory only)",
                 max_memory_gb, device)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = max_memory_gb * 2**30 / total
    if fraction > 1.0:
        log.info("max_memory_gb=%s exceeds the device's %.1f GiB; no cap set", max_memory_gb, total / 2**30)
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    _CAP_BYTES[device.index] = int(max_memory_gb * 2**30)
    log.info("GPU memory capped at %.2f GiB (%.1f%% of %.1f GiB)", max_memory_gb, 100 * fraction, total / 2**30)
    return fraction


def free_memory_bytes(device: Union[str, torch.device]) -> int:
    """Bytes this process can still allocate. CUDA: free device memory (cudaMemGetInfo) plus what the
    caching allocator holds unused, limited by the cap of `set_memory_cap`. CPU: MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        reserved, allocated = torch.cuda.memory_reserved(index), torch.cuda.memory_allocated(index)
        free += reserved - allocated
        if index in _CAP_BYTES:
            free = min(free, _CAP_BYTES[index] - allocated)
        return max(int(free), 0)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def activation_bytes_per_token(hf_config, dtype: torch.dtype, *, gradient_checkpointing: bool,
                               lora_dropout: bool) -> int:
    """Bytes autograd keeps per token for the backward of a decoder-only transformer (the logits are
    never held: the loss is fused). Per layer, in elements, for a Llama-style block with SDPA/flash
    attention (no T² term): norm inputs 2H, normed inputs 2H, q, k, v H + 2·H_kv, attention output H,
    MLP gate/up/act/product 4I = 6H + 2·H_kv + 4I; LoRA dropout copies of the projection inputs add
    6H + I (q, k, v, o, gate, up see H-wide inputs, down an I-wide one). Compare Korthikanti et al.
    2022 (34·H bytes/token/layer for a GPT block in fp16 incl. dropout masks). With gradient
    checkpointing: the L layer inputs (H each) plus one layer recomputed at a time."""
    H = hf_config.hidden_size
    L = hf_config.num_hidden_layers
    I = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * H
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    h_kv = H // heads * kv_heads
    per_layer = 6 * H + 2 * h_kv + 4 * I + (6 * H + I if lora_dropout else 0)
    elements = L * H + per_layer if gradient_checkpointing else L * per_layer
    return elements * torch.finfo(dtype).bits // 8 + H * 4  # + the fp32 grad of the final hidden states


def kv_cache_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """Bytes of KV cache per generated/prompt token: 2 (K and V) · L · H_kv · bytes."""
    H, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    return 2 * hf_config.num_hidden_layers * (H // heads * kv_heads) * torch.finfo(dtype).bits // 8


@dataclass
class MemoryPlan:
    """What `plan_memory` picked, and from which numbers (bytes)."""

    micro_batch: int            # sequences per forward/backward in the update (gradient accumulation over the rest)
    generation_batch: int       # sequences generated at once
    loss_chunk_size: int        # tokens per chunk of the fused linear loss
    free_bytes: int             # what was free when planning
    update_bytes_per_sequence: int
    generation_bytes_per_sequence: int
    message: str                # one line saying what was picked and why


def plan_memory(hf_config, *, batch_size: int, prompt_len: int, new_tokens: int, dtype: torch.dtype,
                device: Union[str, torch.device], gradient_checkpointing: bool = False, lora_dropout: bool = False,
                free_bytes: Optional[int] = None, safety: float = 0.8) -> MemoryPlan:
    """Micro-batch for the update, batch for generation, and chunk for the fused loss that fit in
    `safety` × free memory, given the weights are already loaded (they are not in `free`). Each batch is
    the largest divisor of `batch_size` that fits (at least 1; if even 1 does not fit, the message says
    so and the run will likely hit out_of_memory_message). The loss chunk comes from
    fastrlhf.fused_linear.choose_chunk_size; its fp32 [chunk, V] buffers (~6 live) are reserved first."""
    from .fused_linear import choose_chunk_size

    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety: expected in (0, 1], got {safety}")
    device = torch.device(device)
    free = free_memory_bytes(device) if free_bytes is None else int(free_bytes)
    T = prompt_len + new_tokens
    chunk = choose_chunk_size(batch_size * new_tokens, hf_config.vocab_size, device)
    budget = int(free * safety) - 6 * chunk * hf_config.vocab_size * 4
    per_token = activation_bytes_per_token(hf_config, dtype, gradient_checkpointing=gradient_checkpointing,
                                           lora_dropout=lora_dropout)
    update_seq = per_token * T
    # generation: the KV cache of the whole sequence + fp32 logits of the last position (V) per sequence
    gen_seq = kv_cache_bytes_per_token(hf_config, dtype) * T + 4 * hf_config.vocab_size

    def largest_fitting(per_seq: int) -> int:
        fit = max(budget, 0) // max(per_seq, 1)
        return max([d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fit] or [1])

    micro, gen = largest_fitting(update_seq), largest_fitting(gen_seq)
    mib = 2**20
    msg = (f"memory plan: {free / mib:.0f} MiB free (x{safety} safety); update ~{update_seq / mib:.1f} MiB/sequence "
           f"of {T} tokens -> micro-batch {micro} of {batch_size}; generation ~{gen_seq / mib:.1f} MiB/sequence "
           f"-> {gen} at once; fused-loss chunk {chunk} tokens")
    if update_seq > budget:
        msg += (" (WARNING: even one sequence may not fit the update: enable --gradient_checkpointing, "
                "shorten --max_new_tokens, or raise --max_memory_gb)")
    return MemoryPlan(micro_batch=micro, generation_batch=gen, loss_chunk_size=chunk, free_bytes=free,
                      update_bytes_per_sequence=update_seq, generation_bytes_per_sequence=gen_seq, message=msg)


_LOWER = {  # phase -> the `fastrlhf train` flags to lower, in the order most likely to help
    "generation": "--per_device_batch_size x --gradient_accumulation_steps x --num_mini_batches (sequences "
                  "generated per step) or --max_new_tokens (KV cache)",
    "scoring": "--per_device_batch_size or the sequence length (--max_prompt_length/--max_new_tokens); a "
               "separate critic or reward model on the GPU also counts here",
    "update": "--per_device_batch_size (or let --max_memory_gb pick it), --max_new_tokens; enable "
              "--gradient_checkpointing; --optim adamw_8bit/paged_adamw_8bit; --use_peft with --load_in_4bit",
    "loading": "the model size: --load_in_4bit/--load_in_8bit with --use_peft, --ref_load_in_8bit, or no "
               "separate --critic_model_name_or_path",
}


def out_of_memory_message(exc: BaseException, phase: str, numbers: Optional[dict] = None) -> str:
    """A clear message for an out-of-memory error in `phase` (generation, scoring, update, loading): the
    allocator's numbers (allocated / reserved / cap / total on CUDA), the caller's `numbers` (batch sizes,
    lengths...) and what to lower. The trainer raises SystemExit/RuntimeError with it instead of the raw
    CUDA traceback."""
    mib = 2**20
    parts = [f"out of memory during {phase}"]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts.append(f"({first[:200]})")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        cap = _CAP_BYTES.get(index)
        parts.append(f"allocated {torch.cuda.memory_allocated(index) / mib:.0f} MiB, reserved "
                     f"{torch.cuda.memory_reserved(index) / mib:.0f} MiB, peak "
                     f"{torch.cuda.max_memory_allocated(index) / mib:.0f} MiB, cap "
                     f"{'none' if cap is None else f'{cap / mib:.0f} MiB'}, device total {total / mib:.0f} MiB")
    if numbers:
        parts.append("settings: " + ", ".join(f"{k}={v}" for k, v in numbers.items()))
    parts.append("lower " + _LOWER.get(phase, "the batch sizes or sequence lengths"))
    return "; ".join(parts)


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class PhaseMemory:
    """Peak memory per phase, in MiB: `with mem("generation"): ...`; `mem.peaks` = {phase: MiB} (the max
    over the phase's entries). CUDA: torch.cuda.max_memory_allocated over the phase (reset at entry),
    i.e. the absolute peak of live tensors, weights included. CPU: the process's peak resident set size
    (VmHWM, reset at entry through /proc/self/clear_refs), weights and the Python heap included; 0 where
    Linux does not allow the reset (then only the process-lifetime peak would be available)."""

    device: torch.device
    peaks: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        cuda = torch.device(self.device).type == "cuda"
        resettable = True
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                resettable = False
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                peak = _rss_kib("VmHWM") / 1024 if resettable else 0.0
            self.peaks[phase] = max(self.peaks.get(phase, 0.0), peak)

    def metrics(self, prefix: str = "memory/peak_mib_") -> dict:
        return {prefix + k: v for k, v in self.peaks.items()}
