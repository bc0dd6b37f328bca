"""Where every byte goes: the memory budget of a training run.

`set_memory_cap` caps this process's CUDA memory (`--max_memory_gb`) and `free_memory_bytes` says what
is left; `activation_bytes_per_token` and `kv_cache_bytes_per_token` estimate the update's and
generation's bytes per token from the architecture config, and `plan_memory` turns them into the
update micro-batch, the generation batch and the fused-loss chunk (`MemoryPlan`).
`out_of_memory_message` replaces an out-of-memory traceback with the numbers and the flags to lower;
`PhaseMemory` records the peak memory of each phase of a step (generation, scoring, update).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

log = logging.getLogger("fastrlhf")

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
