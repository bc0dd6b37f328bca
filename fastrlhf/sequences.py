"""Token-id rows to padded batches, and the position ids every pass uses (README, "Sequence layout").

A rollout sequence is `[B, P + n]`: the prompt left-padded to P, then the response right-padded to n.
Generation, the scoring passes, the update and the critic all give a token the same position id:
its index among the row's valid tokens (`position_ids`), as Hugging Face `generate` counts them.
"""
from __future__ import annotations

from typing import Sequence

import torch

SIDES = ("left", "right")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, side: str, width: int | None = None,
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids [B, W] int64, mask [B, W] int64), padded with `pad_id` on `side`
    ("left": prompts for generation; "right": responses and training text). W = `width` or the longest
    row; a row longer than W is an error (truncate before padding)."""
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    rows = [list(r) for r in rows]
    longest = max(map(len, rows), default=0)
    W = longest if width is None else width
    if longest > W:
        raise ValueError(f"width: expected >= the longest row ({longest}), got {W}")
    ids = torch.full((len(rows), W), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), W), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            cols = slice(W - len(r), W) if side == "left" else slice(0, len(r))
            ids[b, cols] = torch.tensor(r, dtype=torch.long)
            mask[b, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, T] -> position ids [B, T] int64: 0, 1, ... over each row's valid tokens, and 1
    on padding (what Hugging Face `generate` uses; padded positions are masked out of attention, so
    their value only has to be a valid index)."""
    m = attention_mask.long()
    return (m.cumsum(-1) - 1).masked_fill(m == 0, 1)


def encode_prompts(tokenizer, prompts: Sequence[str], max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt texts -> (ids [B, P], mask [B, P]) for generation: each prompt's last `max_len` tokens
    (left truncation keeps the end, where the question is), left padded to the longest."""
    rows = [list(tokenizer.encode(p))[-max_len:] for p in prompts]
    return pad_rows(rows, tokenizer.pad_token_id, side="left", device=device)


__all__ = ["encode_prompts", "pad_rows", "position_ids"]
