"""How models are loaded.

`load(cfg, device) -> Bundle` loads any Hugging Face causal LM by name or path (or the built-in model
`builtin_model` when `model_name_or_path` is None) through one path: dtype, attention implementation, optional
bitsandbytes 4/8-bit base, optional LoRA (peft), the value head (on the policy's trunk or on a separate
critic), and the reference policy, with as few copies of the weights as the options allow:

    options                    policy                 reference                     critic
    use_peft                   base + LoRA adapter    same model, adapter disabled  value head on the trunk
                                                      (after a warm start: a frozen
                                                      copy of the adapter, active)
    use_peft + load_in_4bit/8  quantized base + LoRA  (as use_peft)                 value head on the trunk
    full fine-tuning           base                   frozen copy (8-bit with       value head on the trunk
                                                      ref_load_in_8bit)
    critic_model_name_or_path  (any of the above)     (as above)                    separate trunk (AutoModel,
                                                                                    no LM head) + value head,
                                                                                    LoRA/quantized like policy;
                                                                                    a one-label reward model's
                                                                                    score layer seeds the head
    copy_critic(bundle)        (any of the above)     (as above)                    a copy of the policy's
    (fastrlhf train --critic                                                        trunk + MLP value head
    copy)

`validate(cfg)` rejects bad combinations before any weight is created (it reads only configs and
builds the architecture on the meta device to check LoRA target names). `values` and
`critic_hidden_states` are the value head's passes. The memory budget is `fastrlhf.memory`, the
optimizer `fastrlhf.optim`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Union

import torch
from torch import nn

from .memory import set_memory_cap
from .sequences import position_ids
from .tokenizer import CharTokenizer, WordTokenizer, load_tokenizer

log = logging.getLogger("fastrlhf")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
# The built-in models (model_name_or_path=None): fastrlhf's tiny Llama with the CharTokenizer, or Padula &
# Soemers' GPT-2 with the WordTokenizer (fastrlhf.padula.gpt2_config) at fastrlhf's CPU size or the paper's.
BUILTIN_MODELS = ("tiny-llama", "padula-gpt2-cpu", "padula-gpt2")
PADULA_SIZES = {"padula-gpt2-cpu": "cpu", "padula-gpt2": "paper"}  # builtin_model -> padula.GPT2_SIZES key
# The frozen second LoRA adapter that holds the policy at the start of RL after a warm start (`reset_reference`).
REFERENCE_ADAPTER = "reference"


def _f(default, help):
    """A ModelConfig field whose `help` is its `fastrlhf train --<name>` help (fastrlhf.config.build_parser)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Model-loading options; each field is also a `fastrlhf train` flag `--<field>` (fastrlhf.config),
    documented by its help."""

    # None: the built-in model `builtin_model` is built from `tiny_seed`, saved to a temporary directory and
    # loaded back through the same path as any checkpoint.
    model_name_or_path: Optional[str] = _f(None, "Hugging Face name or local path of a causal LM (None: the "
                                                 "built-in model, --builtin_model)")
    builtin_model: str = _f("tiny-llama", "the model when --model_name_or_path is not given: tiny-llama "
                                          "(character tokenizer, --tiny_* sizes) | padula-gpt2-cpu (Padula & "
                                          "Soemers' GPT-2 at 0.42M parameters) | padula-gpt2 (their GPT-2 "
                                          "small, 86M), both with their word tokenizer")
    # Applies to the non-quantized weights.
    dtype: str = _f("auto", "weights dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16")
    # auto: flash_attention_2 when flash_attn imports and the device is CUDA with a 16-bit dtype, else sdpa.
    attn_implementation: str = _f("auto", "auto | flash_attention_2 | sdpa | eager")
    use_peft: bool = _f(False, "train LoRA adapters (peft) instead of all weights; the reference is the "
                               "adapter-free base, or after a warm start a frozen copy of the warm-started adapter")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    # "all-linear": every linear layer but the output layer. Names (a list, or one comma-separated string)
    # match like peft matches them: the full name or its last components (".q_proj"); a name that matches
    # no module is an error.
    lora_target_modules: Union[str, list] = _f("all-linear", "'all-linear' or comma-separated module names")
    load_in_4bit: bool = _f(False, "4-bit (bitsandbytes) base; needs --use_peft")
    load_in_8bit: bool = _f(False, "8-bit (bitsandbytes) base; needs --use_peft")
    bnb_4bit_quant_type: str = _f("nf4", "nf4 | fp4")
    bnb_4bit_use_double_quant: bool = _f(False, "nested 4-bit quantization")
    bnb_4bit_compute_dtype: str = _f("auto", "auto (= dtype) | float32 | bfloat16 | float16")
    # 8-bit halves a bf16 reference's bytes; its KL to the policy is then not exactly 0 at the first step
    # (quantization error).
    ref_load_in_8bit: bool = _f(False, "load the frozen reference copy in 8-bit (without --use_peft)")
    critic_model_name_or_path: Optional[str] = _f(None, "separate critic trunk (None: value head on the policy "
                                                        "trunk; ppo-max uses --reward_model when given)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    # A torch per-process memory fraction (fastrlhf.memory.set_memory_cap).
    max_memory_gb: Optional[float] = _f(None, "cap this process's GPU memory (GiB)")
    # The built-in tiny Llama (builtin_model tiny-llama), sized so the default training job runs in about a
    # minute on 2 CPU cores: 0.68M parameters (vocab 100 = CharTokenizer). tiny_seed seeds every built-in model.
    tiny_hidden_size: int = _f(128, "built-in model: hidden size")
    tiny_num_layers: int = _f(4, "built-in model: layers")
    tiny_num_heads: int = _f(4, "built-in model: attention heads")
    tiny_intermediate_size: int = _f(256, "built-in model: MLP size")
    tiny_max_positions: int = _f(512, "built-in model: max positions")
    tiny_seed: int = _f(0, "built-in model (any --builtin_model): init seed")


@dataclass
class Bundle:
    """Everything the trainer needs from the models. `reference()` is a context manager yielding the
    reference policy (`with bundle.reference() as ref: ...`): the policy with its adapter disabled under
    LoRA (after a warm start: with the frozen adapter `reference` active instead, `reset_reference`), else a
    frozen copy. Under LoRA the reference's log-probs equal the policy's bit for bit before
    the first update when both are computed the same way: same train/eval mode and both under no_grad
    (bitsandbytes runs different kernels for each, ~1e-3 apart on CPU 4-bit). `value_head` is
    nn.Linear(H, 1) in fp32 (zero-initialized, so values start at 0) on the policy's trunk, or on
    `critic`'s when there is one (`mlp_value_head` on a `copy_critic` copy)."""

    policy: nn.Module
    tokenizer: object
    value_head: nn.Module
    critic: Optional[nn.Module]
    reference: Callable[[], ContextManager[nn.Module]]
    config: ModelConfig
    device: torch.device
    dtype: torch.dtype

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy's trainable parameters: its LoRA adapters, or all its weights."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The value head's parameters, then the separate critic's trainable weights when there is one."""
        params = list(self.value_head.parameters())
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


def builtin_tokenizer(cfg: ModelConfig):
    """The tokenizer of the built-in model `cfg.builtin_model`: the WordTokenizer for Padula & Soemers'
    GPT-2, else the CharTokenizer."""
    return WordTokenizer() if cfg.builtin_model in PADULA_SIZES else CharTokenizer()


def builtin_config(cfg: ModelConfig, tokenizer):
    """The transformers config of the built-in model `cfg.builtin_model` (vocab from `tokenizer`). Padula &
    Soemers' GPT-2 has dropout 0.0: their PPO runs every forward in eval mode (fastrlhf.padula.gpt2_config)."""
    if cfg.builtin_model in PADULA_SIZES:
        from .padula import gpt2_config

        return gpt2_config(tokenizer, PADULA_SIZES[cfg.builtin_model], dropout=0.0)
    return tiny_config(cfg, tokenizer)


def _hf_config(name_or_path: Optional[str], cfg: ModelConfig):
    """The architecture config (config.json only; no weights)."""
    if name_or_path is None:
        return builtin_config(cfg, builtin_tokenizer(cfg))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:   # hub-name validation errors are ValueErrors
        path = str(name_or_path)
        if (os.path.isabs(path) or path.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(path)):
            raise ValueError(f"{path!r}: no such directory") from None
        what = "a directory without a usable config.json" if os.path.isdir(path) else \
            "neither a local directory nor a Hugging Face model name that could be loaded"
        raise ValueError(f"{path!r}: {what} ({str(exc).strip().splitlines()[0][:160]})") from None


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
    if cfg.builtin_model not in BUILTIN_MODELS:
        raise ValueError(f"builtin_model: expected one of {BUILTIN_MODELS}, got {cfg.builtin_model!r}")
    for name in ("model_name_or_path", "critic_model_name_or_path"):
        if getattr(cfg, name) is not None:
            try:
                _hf_config(getattr(cfg, name), cfg)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
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
    if cfg.use_peft:
        if cfg.lora_r <= 0:
            raise ValueError(f"lora_r: expected > 0, got {cfg.lora_r}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected in [0, 1), got {cfg.lora_dropout}")
        targets = _target_list(cfg.lora_target_modules)
        name = cfg.model_name_or_path or f"the built-in model {cfg.builtin_model}"
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
    """The checkpoint to load from: the given name/path, or the built-in model `builtin_model` saved to a
    temporary directory (built with `tiny_seed`, so every load of a built-in model has the same weights)."""
    if cfg.model_name_or_path is not None:
        yield cfg.model_name_or_path
        return
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    from safetensors.torch import save_model

    arch = GPT2LMHeadModel if cfg.builtin_model in PADULA_SIZES else LlamaForCausalLM
    with tempfile.TemporaryDirectory(prefix="fastrlhf-tiny-") as tmp:
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.tiny_seed)
        try:
            model = arch(builtin_config(cfg, tokenizer))
        finally:
            torch.random.set_rng_state(rng_state)
        # The files save_pretrained writes (config.json, generation_config.json, model.safetensors), written
        # by every process: under an initialized torch.distributed group save_pretrained writes on rank 0
        # only (transformers.distributed.mixin.should_save_on_this_rank), and each rank has its own tmp.
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
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
    tokenizer = builtin_tokenizer(cfg) if cfg.model_name_or_path is None else load_tokenizer(cfg.model_name_or_path)
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
            if REFERENCE_ADAPTER not in policy.peft_config:   # no warm start: the base without the adapter
                with policy.disable_adapter():
                    yield policy
                return
            with _active_adapter(policy, REFERENCE_ADAPTER):   # after a warm start (`reset_reference`)
                yield policy
    else:
        @contextlib.contextmanager
        def reference():
            yield frozen

    return Bundle(policy=policy, tokenizer=tokenizer, value_head=value_head, critic=critic,
                  reference=reference, config=cfg, device=device, dtype=dtype)


@contextlib.contextmanager
def _active_adapter(policy, name: str):
    """Run the peft model `policy` with its adapter `name` active instead of "default". peft's set_adapter
    also sets requires_grad (the active adapter trainable, the others frozen): every parameter's flag is put
    back afterwards, so that what trains is unchanged."""
    flags = [(p, p.requires_grad) for p in policy.parameters()]
    policy.set_adapter(name)
    try:
        yield
    finally:
        policy.set_adapter("default")
        for p, flag in flags:
            p.requires_grad_(flag)


def reset_reference(bundle: Bundle) -> dict:
    """Make the reference policy the policy as it is now: the policy at the start of RL, after a warm start
    (fastrlhf.warm_start), so that the KL to it is exactly 0 at the first step. Returns the reference's
    weights for a checkpoint (`load_reference`).

    Full fine-tuning: the frozen copy gets the policy's weights (its whole state dict is returned). LoRA: the
    warm-started adapter is copied into a second, frozen adapter `reference` on the same base, which
    `bundle.reference()` then activates in place of the trained one; the base (quantized or not) is shared, so
    the reference's log-probs equal the policy's bit for bit until the first update. Returned: that adapter's
    peft state dict (no adapter name in its keys, small)."""
    if not bundle.config.use_peft:
        with bundle.reference() as ref_model:
            ref_model.load_state_dict(bundle.policy.state_dict())
            return {k: v.detach().cpu().clone() for k, v in ref_model.state_dict().items()}
    from peft import get_peft_model_state_dict

    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(bundle.policy, save_embedding_layers=False).items()}
    load_reference(bundle, state)
    return state


def load_reference(bundle: Bundle, state: dict) -> None:
    """Set the reference's weights from `state`, as `reset_reference` returned it (also from a checkpoint)."""
    if not bundle.config.use_peft:
        with bundle.reference() as ref_model:
            ref_model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    policy = bundle.policy
    if REFERENCE_ADAPTER not in policy.peft_config:
        flags = [(p, p.requires_grad) for p in policy.parameters()]
        policy.add_adapter(REFERENCE_ADAPTER, policy.peft_config["default"])
        for p, flag in flags:            # add_adapter may re-mark what trains: put every flag back
            p.requires_grad_(flag)
        for name, p in policy.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                p.requires_grad_(False)
    result = set_peft_model_state_dict(policy, state, adapter_name=REFERENCE_ADAPTER)
    if result.unexpected_keys:
        raise ValueError(f"reference: adapter weights do not match the model: unexpected "
                         f"{result.unexpected_keys[:3]}")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _trunk(model: nn.Module) -> nn.Module:
    """The decoder trunk (no LM head) of a causal LM, peft-wrapped or not: LlamaModel, GPT2Model, ..."""
    lm = _causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (peft-wrapped or not), bottom first: the ModuleList of
    config.num_hidden_layers modules in its trunk (`layers` in Llama / Qwen2 / GPT-NeoX, `h` in GPT-2)."""
    lm = _causal_lm(model)
    n = lm.config.num_hidden_layers
    for mod in _trunk(model).modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ValueError(f"model: no list of {n} transformer blocks found in {type(lm).__name__}")


def freeze_bottom_blocks(model: nn.Module, num_layers_unfrozen: int) -> None:
    """Train only the top `num_layers_unfrozen` transformer blocks (-1: all; 0: none): every parameter of
    the blocks below stops training (the block's LoRA adapters under peft). Embeddings, the final norm and
    the output layer are left as they are. As trlx's freeze_bottom_causal_layers (trlx/utils/modeling.py),
    which APA's trainer applies to the policy only (accelerate_base_trainer.py setup_model)."""
    if num_layers_unfrozen < 0:
        return
    blocks = decoder_blocks(model)
    if num_layers_unfrozen > len(blocks):
        raise ValueError(f"num_layers_unfrozen: expected -1 or 0..{len(blocks)} (the model's blocks), "
                         f"got {num_layers_unfrozen}")
    for block in list(blocks)[:len(blocks) - num_layers_unfrozen]:
        block.requires_grad_(False)


def mlp_value_head(hidden: int, device) -> nn.Sequential:
    """trlx's make_head(hidden, 1) (trlx/utils/modeling.py), the value head of APA's critic
    (modeling_sppo.py AutoModelForCausalLMWithValueHead: v_head = make_head(hidden_size, 1)): Linear(H, 2H),
    ReLU, Linear(2H, 1), fp32, torch's default initialization (as there; seeded by the run's seed)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden, device=device, dtype=torch.float32), nn.ReLU(),
                         nn.Linear(2 * hidden, 1, device=device, dtype=torch.float32))


def copy_critic(bundle: Bundle) -> None:
    """`--critic copy`: the critic becomes a separate copy of the policy's trunk (its LoRA adapters and
    quantized base too, under peft; what trains in it is what trains in the policy) with `mlp_value_head`,
    as APA's modeling_sppo.py (v_net = deepcopy(base_model), values from its last hidden state). The value
    loss then trains the copy and never the policy. After a warm start, `sync_critic_copy` makes the copy
    the warm-started policy's trunk again."""
    trunk = _trunk(bundle.policy)
    bundle.critic = copy.deepcopy(trunk)
    bundle.value_head = mlp_value_head(_causal_lm(bundle.policy).config.hidden_size, bundle.device)


def sync_critic_copy(bundle: Bundle) -> None:
    """Copy the policy's trunk into the `copy_critic` critic again (its trainable parameters, the only ones
    a warm start can have changed), so the critic starts RL from the policy at the start of RL."""
    source = dict(_trunk(bundle.policy).named_parameters())
    with torch.no_grad():
        for name, p in bundle.critic.named_parameters():
            if p.requires_grad:
                p.copy_(source[name])


def values(bundle: Bundle, hidden_states: torch.Tensor) -> torch.Tensor:
    """Values [B, T] (fp32) from final hidden states [B, T, H] of the value head's trunk: the policy's
    (e.g. `fastrlhf.hf.hidden_states(policy, ...)`) or, with a critic, `critic_hidden_states(...)`. The head
    is nn.Linear(H, 1), or `mlp_value_head` with `--critic copy`."""
    head = bundle.value_head
    first = head[0] if isinstance(head, nn.Sequential) else head
    if hidden_states.shape[-1] != first.in_features:
        raise ValueError(f"hidden_states: expected last dim {first.in_features}, got {tuple(hidden_states.shape)}")
    return head(hidden_states.to(first.weight.dtype)).squeeze(-1)


def critic_hidden_states(bundle: Bundle, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, H] of the separate critic trunk, with the position ids of every other pass
    (`fastrlhf.sequences.position_ids`; README, "Sequence layout")."""
    if bundle.critic is None:
        raise ValueError("bundle.critic: expected a separate critic, got None (value head on the policy trunk)")
    out = bundle.critic(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids(attention_mask))
    return out.last_hidden_state
