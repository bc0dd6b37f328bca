"""KV-cached rollout generation for Hugging Face causal LMs (Llama, Qwen2, GPT-2 style; peft-wrapped too).

One static KV cache of P + max_new_tokens positions is allocated per call; the prompt batch (left
padded, `attention_mask`) is prefilled in one forward, then each decode step runs the model on one
token per row and draws with `fastrlhf.ops.sample_tokens`. On CUDA the decode forward is captured
once in a CUDA graph and replayed (falls back to eager, with one warning, when capture fails; a
model that cannot use transformers' StaticCache decodes over its own cache, also with a warning).
Finished rows keep running but emit `pad_token_id` with log-prob 0; the done flags stay on the
device and are read back every `_CHECK_EVERY` steps to stop early.

A row ends at the first of (README, "Sequence layout"):
- an EOS token (`eos_token_id`), kept in the response;
- its length limit: `response_lengths[b]` tokens (`draw_lengths` draws them uniformly per prompt,
  as TRL's LengthSampler in Padula & Soemers' sentiment/imdb_ppo.py), else `max_new_tokens`;
- a stop string (`stop`, with `tokenizer`): the token whose decoding completes the first occurrence
  of any stop string in the row's decoded response, kept in the response (like EOS). `strip_stop`
  removes the stop string and what follows from the response text, as trlx's `decode` does
  (`str_output[:stop_ix].rstrip()`, trlx/trainer/accelerate_base_trainer.py of microsoft/RLHF-APA,
  whose examples/apa_hh.py stops at "Human:", "human:", "Assistant:", "assistant:").
A token drawn after a row ended is `pad_token_id` with log-prob 0 and mask 0. Every row draws at every
step whatever its state, so how rows end never changes the random stream of the others.

The parts, as in gpt-fast's generate.py: `check_inputs`, `prefill` (prompt forward -> first logits
and a decoder, the object that runs one decode forward), `decode_one_token` (one draw per row),
`decode_n_tokens` (the loop), and `generate` composing them. Sequences and position ids follow
(README, "Sequence layout").
"""
from __future__ import annotations

import inspect
import random
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import ops
from .sequences import position_ids

# Steps between host reads of the done flags: one sync per 16 decode steps instead of one per step.
_CHECK_EVERY = 16


@dataclass
class Generation:
    """sequences [B, P + n]: the prompt (left padded, as given) then n generated tokens, `pad_token_id`
    after a row's EOS; n <= max_new_tokens (smaller when every row stopped early).
    response_mask [B, n] int64: 1 up to and including the token that ended the row (EOS, the last of
    its length limit, or the one completing a stop string), 0 after (right padded).
    logprobs [B, n] float32: log-prob of each drawn token under the tempered full softmax, 0 where masked.
    """
    sequences: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor


def _forward_params(model) -> set:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _cache_arg(model) -> str:
    """The forward's KV-cache argument: `cache` since transformers 5.2x (where `past_key_values` is
    deprecated and warns on every call), `past_key_values` before."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _returned_cache(out):
    """The cache a forward returned: `out.cache` on newer transformers, `out.past_key_values` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _static_cache(model, batch: int, max_len: int, device, dtype):
    """transformers' StaticCache across versions: 4.x takes (config, max_batch_size, max_cache_len,
    device, dtype) and allocates at once; 5.x takes (config, max_cache_len) and allocates on the
    first update."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kwargs = {"config": model.config, "max_cache_len": max_len}
    for name, value in (("max_batch_size", batch), ("device", device), ("dtype", dtype)):
        if name in params:
            kwargs[name] = value
    if "max_batch_size" not in params and "batch_size" in params:
        kwargs["batch_size"] = batch
    return StaticCache(**kwargs)


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


class _StaticDecoder:
    """One decode step `tokens [B] -> logits [B, V]` over the static cache; CUDA-graph replayed on GPU."""

    def __init__(self, model, cache, full_mask, pos0, prompt_len, use_cache_position, logits_kw):
        self.model, self.cache, self.full_mask = model, cache, full_mask
        self.cache_arg = _cache_arg(model)
        self.pos0, self.prompt_len = pos0, prompt_len        # pos0 [B, 1]: position of the first new token
        self.use_cache_position, self.logits_kw = use_cache_position, logits_kw
        device = full_mask.device
        self.tok = torch.zeros(full_mask.shape[0], 1, dtype=torch.long, device=device)
        self.pos = pos0.clone()
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logits = None, None
        self.try_graph = device.type == "cuda"

    def _run(self):
        kw = {"attention_mask": self.full_mask, "position_ids": self.pos, self.cache_arg: self.cache,
              "use_cache": True, **self.logits_kw}
        if self.use_cache_position:
            kw["cache_position"] = self.cache_pos
        return self.model(self.tok, **kw).logits[:, -1, :]

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """tokens [B]: the tokens drawn at `step` (0-based); returns the logits for step + 1."""
        self.tok.copy_(tokens[:, None])
        torch.add(self.pos0, step, out=self.pos)
        self.cache_pos.fill_(self.prompt_len + step)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.try_graph:
            return self._run()
        # First CUDA step: run eagerly on a side stream (the warm-up CUDA graphs need), then capture
        # the step; later steps replay it. Capture does not run kernels, so the cache is untouched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.try_graph = False
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._run()
            self.graph = graph
        except Exception as exc:  # a model or transformers version that cannot be captured
            # stacklevel 5: __call__ < decode_n_tokens < generate < torch.no_grad wrapper < generate's caller
            warnings.warn(f"fastrlhf.generate: CUDA graph capture failed ({type(exc).__name__}: {exc}); "
                          f"decoding eagerly", RuntimeWarning, stacklevel=5)
        return logits


class _GrowingDecoder:
    """Fallback decode step over the model's own (growing) cache: eager, the mask sliced to the length."""

    def __init__(self, model, past, full_mask, pos0, prompt_len, logits_kw):
        self.model, self.past, self.full_mask = model, past, full_mask
        self.pos0, self.prompt_len, self.logits_kw = pos0, prompt_len, logits_kw
        self.cache_arg = _cache_arg(model)

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        out = self.model(tokens[:, None], attention_mask=self.full_mask[:, : self.prompt_len + step + 1],
                         position_ids=self.pos0 + step, use_cache=True, **{self.cache_arg: self.past},
                         **self.logits_kw)
        self.past = _returned_cache(out)
        return out.logits[:, -1, :]


def _eos_tensor(eos_token_id, device) -> Optional[torch.Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"eos_token_id: expected None, an int or a list of ints, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _vocab_size(model) -> int:
    """Rows of the model's input embedding (resized embeddings included), else config.vocab_size."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise ValueError(f"model: expected a model with get_input_embeddings() (num_embeddings) or "
                         f"config.vocab_size, got {type(model).__name__}")
    return rows


def check_inputs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
                 eos_token_id: Union[int, Sequence[int], None], pad_token_id: Optional[int]
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """Validate `generate`'s arguments -> (mask [B, P] int64, 1 = no padding when `attention_mask` is None;
    eos ids [E] int64 or None; pad_token_id, default the first EOS id, else 0).

    input_ids [B, P]: integer token ids, B >= 1 and P >= 1, every id (padding included: the embedding
    reads every position) in [0, vocab) of `model`; attention_mask None or a 0/1 left-padding mask [B, P]
    on input_ids' device. Reads input_ids on the host."""
    ops._check_tensor("input_ids", input_ids)
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(f"input_ids: expected an integer dtype (token ids), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected 2 dims [B, P], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected B >= 1 prompts of P >= 1 tokens, got shape {tuple(input_ids.shape)}")
    if not (isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if attention_mask is not None:
        ops._check_mask("attention_mask", attention_mask, input_ids.shape, input_ids.device)
    vocab = _vocab_size(model)
    bad = (input_ids < 0) | (input_ids >= vocab)
    if bool(bad.any()):
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}) (the model's vocabulary), "
                         f"got {input_ids[bad][0].item()}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    if input_ids.shape[1] > 1 and bool((mask[:, :-1] > mask[:, 1:]).any()):
        raise ValueError("attention_mask: expected left padding (zeros then ones per row), got a 1 before a 0")
    eos = _eos_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    return mask, eos, pad_token_id


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
    """The prompt forward: input_ids, mask [B, P] (left padded, checked) -> (logits [B, V] for the first
    new token, decoder). `decoder(tokens [B], step) -> logits [B, V]` feeds the tokens drawn at `step`
    and returns the logits for step + 1.

    The decoder runs over a static cache of P + max_new_tokens positions (CUDA-graph replayed on GPU);
    a model or transformers version that cannot use it (an error while building the cache or in this
    forward) warns once and decodes over the model's own growing cache. Runs under torch.no_grad()
    (as `generate` calls it)."""
    device = input_ids.device
    B, P = input_ids.shape
    N = max_new_tokens
    params = _forward_params(model)
    use_cache_position = "cache_position" in params
    logits_kw = ({"logits_to_keep": 1} if "logits_to_keep" in params
                 else {"num_logits_to_keep": 1} if "num_logits_to_keep" in params else {})
    full_mask = torch.cat([mask, torch.ones(B, N, dtype=torch.long, device=device)], dim=1)
    positions = position_ids(mask)
    pos0 = mask.sum(-1, keepdim=True)     # [B, 1]: position_ids(full_mask) of the first new token
    try:
        cache = _static_cache(model, B, P + N, device, _model_dtype(model))
        kw = {"attention_mask": full_mask, "position_ids": positions, _cache_arg(model): cache, "use_cache": True,
              **logits_kw}
        if use_cache_position:
            kw["cache_position"] = torch.arange(P, device=device)
        logits = model(input_ids, **kw).logits[:, -1, :]
        return logits, _StaticDecoder(model, cache, full_mask, pos0, P, use_cache_position, logits_kw)
    except (TypeError, ValueError, AttributeError, NotImplementedError, ImportError) as exc:
        # A model / transformers version without StaticCache support (e.g. GPT-2 on older 4.x).
        # stacklevel 4: prefill < generate < torch.no_grad wrapper < generate's caller
        warnings.warn(f"fastrlhf.generate: static KV cache unavailable for {type(model).__name__} "
                      f"({type(exc).__name__}: {exc}); decoding with the model's own cache, no CUDA graph",
                      RuntimeWarning, stacklevel=4)
        out = model(input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **logits_kw)
        return out.logits[:, -1, :], _GrowingDecoder(model, _returned_cache(out), full_mask, pos0, P, logits_kw)


def decode_one_token(logits: torch.Tensor, done: torch.Tensor, *, eos: Optional[torch.Tensor],
                     pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: Optional[torch.Generator] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's draw: logits [B, V], done [B] bool (row stopped at an earlier step) ->
    (tokens [B] int64, logprobs [B] float32, done [B]). Rows already done emit `pad_token_id` with
    log-prob 0; a row that draws an id in `eos` [E] emits it with its log-prob and is done from the
    next step on (eos None: done is returned unchanged). `done` is not modified; the new flags are returned."""
    tok, lp = ops.sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    out_tok = torch.where(done, pad_token_id, tok)
    out_lp = torch.where(done, 0.0, lp.float())
    if eos is not None:
        done = done | torch.isin(tok, eos)
    return out_tok, out_lp, done


def decode_n_tokens(decoder, logits: torch.Tensor, max_new_tokens: int, *, eos: Optional[torch.Tensor],
                    pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    generator: Optional[torch.Generator] = None, lengths: Optional[torch.Tensor] = None,
                    stopped: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode loop from prefill's logits [B, V] and decoder -> (tokens [B, n] int64, logprobs [B, n]
    float32, live [B, n] bool), live[:, t] = the row had not ended before step t: no EOS drawn, fewer
    than lengths[b] tokens (lengths [B] int64 on the device, each in [1, max_new_tokens]; None: no
    per-row limit), and `stopped` had not flagged it.

    `stopped(tokens [B, t + 1], live [B, t + 1]) -> [B] bool` (rows whose response so far holds a stop
    string) is called only at the host-check steps, so a row it flags may have drawn a few tokens after
    its stop; `generate` cuts them (`stop_index`). n = max_new_tokens, or the first t + 1 with
    t % _CHECK_EVERY == _CHECK_EVERY - 1 (the only steps at which the done flags are read on the host)
    at which every row is done. Runs under torch.no_grad() (as `generate` calls it)."""
    B, device, N = logits.shape[0], logits.device, max_new_tokens
    tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, N, dtype=torch.float32, device=device)
    live = torch.ones(B, N, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    can_end = eos is not None or lengths is not None or stopped is not None
    for t in range(N):
        if t > 0:
            logits = decoder(tokens[:, t - 1], t - 1)
        live[:, t] = ~done
        tokens[:, t], logprobs[:, t], done = decode_one_token(
            logits, done, eos=eos, pad_token_id=pad_token_id, temperature=temperature, top_k=top_k,
            top_p=top_p, generator=generator)
        if lengths is not None:
            done = done | (lengths <= t + 1)
        if can_end and t % _CHECK_EVERY == _CHECK_EVERY - 1 and t + 1 < N:
            if stopped is not None:
                done = done | stopped(tokens[:, : t + 1], live[:, : t + 1])
            if bool(done.all()):
                return tokens[:, : t + 1], logprobs[:, : t + 1], live[:, : t + 1]
    return tokens, logprobs, live


def draw_lengths(n: int, min_new_tokens: int, max_new_tokens: int, rng: random.Random) -> List[int]:
    """`n` response-length limits drawn independently and uniformly from [min_new_tokens, max_new_tokens]
    (both included), one `rng.randint` each. TRL's LengthSampler(a, b), as Padula & Soemers'
    sentiment/imdb_ppo.py uses it (`LengthSampler(4, 16)`, one draw per prompt), draws from range(a, b):
    b excluded, so theirs is min 4, max 15 here."""
    if not (isinstance(min_new_tokens, int) and 1 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"min_new_tokens: expected an int in [1, max_new_tokens={max_new_tokens}], "
                         f"got {min_new_tokens!r}")
    return [rng.randint(min_new_tokens, max_new_tokens) for _ in range(n)]


def _check_stop(stop) -> tuple:
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop or ())
    if not all(isinstance(x, str) and x for x in stop):
        raise ValueError(f"stop: expected non-empty strings, got {stop!r}")
    return stop


def stop_index(tokenizer, ids: Sequence[int], stop: Sequence[str]) -> Optional[int]:
    """The index of the token of `ids` (a response) whose decoding completes the first stop string: the
    smallest t such that tokenizer.decode(ids[:t + 1], skip_special_tokens=True) contains one of `stop`;
    None when the whole response holds none. Binary search over prefixes (a prefix's text is a prefix of
    the longer one's), O(log n) decodes."""
    def hit(k):
        text = tokenizer.decode(list(ids[:k]), skip_special_tokens=True)
        return any(s in text for s in stop)
    if not stop or not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)           # hit(hi) holds; find the smallest k with hit(k)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo - 1


def strip_stop(text: str, stop: Sequence[str]) -> str:
    """`text` cut before the first occurrence of any stop string, trailing whitespace removed (trlx's
    decode: `str_output[:stop_ix].rstrip()` for each stop in turn, the same as cutting at the earliest);
    unchanged when it holds none."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
    return text if cut is None else text[:cut].rstrip()


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, response_lengths: Optional[Sequence[int]] = None,
             stop: Union[str, Sequence[str], None] = None, tokenizer=None) -> Generation:
    """Sample up to `max_new_tokens` tokens per row from `model` after the left-padded prompts
    `input_ids` [B, P] (`attention_mask` [B, P]: 0 on the left padding; None = no padding).

    temperature / top_k / top_p as in `fastrlhf.sample_tokens` (temperature 0 or top_k 1 is greedy).
    A row ends (module docstring) after it draws a token in `eos_token_id`, after `response_lengths[b]`
    tokens (B ints in [1, max_new_tokens]; None: max_new_tokens), or at the token completing a string of
    `stop` (a string or several; needs `tokenizer`, anything with `decode(ids, skip_special_tokens=True)`);
    `pad_token_id` (default: the first EOS id, else 0) fills the positions after. Returns a `Generation`.
    """
    mask, eos, pad_token_id = check_inputs(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    stop = _check_stop(stop)
    if stop and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer: stop strings {stop!r} need a tokenizer with decode(), got {tokenizer!r}")
    lengths = None
    if response_lengths is not None:
        lengths = torch.as_tensor(list(response_lengths), dtype=torch.long)
        if lengths.shape != (input_ids.shape[0],) or bool(((lengths < 1) | (lengths > max_new_tokens)).any()):
            raise ValueError(f"response_lengths: expected {input_ids.shape[0]} ints in [1, max_new_tokens="
                             f"{max_new_tokens}], got {list(response_lengths)!r}")
        lengths = lengths.to(input_ids.device)

    def stopped(tokens, live):   # [B, t] on the device -> [B] bool: the rows whose response holds a stop string
        rows = [[i for i, keep in zip(r, k) if keep] for r, k in zip(tokens.tolist(), live.tolist())]
        return torch.tensor([stop_index(tokenizer, r, stop) is not None for r in rows], device=tokens.device)

    logits, decoder = prefill(model, input_ids, mask, max_new_tokens)
    tokens, logprobs, live = decode_n_tokens(decoder, logits, max_new_tokens, eos=eos, pad_token_id=pad_token_id,
                                             temperature=temperature, top_k=top_k, top_p=top_p,
                                             generator=generator, lengths=lengths,
                                             stopped=stopped if stop else None)
    if stop:   # end each row at the token completing its first stop string; pads after it
        n_live = live.sum(-1).tolist()
        for b, row in enumerate(tokens.tolist()):
            t = stop_index(tokenizer, row[:n_live[b]], stop)
            if t is not None:
                live[b, t + 1:] = False
        tokens = tokens.masked_fill(~live, pad_token_id)
        logprobs = logprobs.masked_fill(~live, 0.0)
    # drop the columns after every row's end: n = the longest response (>= 1: step 0 is always live)
    response_mask = live.long()
    n = int(response_mask.sum(-1).max())
    return Generation(sequences=torch.cat([input_ids, tokens[:, :n]], dim=1),
                      response_mask=response_mask[:, :n].contiguous(),
                      logprobs=logprobs[:, :n].contiguous())


__all__ = ["Generation", "generate", "check_inputs", "prefill", "decode_one_token", "decode_n_tokens", "draw_lengths",
           "stop_index", "strip_stop"]
