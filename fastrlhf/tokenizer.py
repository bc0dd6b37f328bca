"""The built-in character-level tokenizer, and `load_tokenizer` for any checkpoint.

`CharTokenizer` is the tokenizer of the built-in tiny default model (fastrlhf.models): one id per
character, no merges, so arithmetic and toy tasks train on two CPU cores. It implements the subset of the
Hugging Face tokenizer interface that fastrlhf's trainer uses, so the trainer treats it and an
`AutoTokenizer` the same way:

    tok.encode(text, add_special_tokens=True) -> list[int]        (BOS first when add_special_tokens)
    tok.decode(ids, skip_special_tokens=True) -> str
    tok.batch_decode(rows, skip_special_tokens=True) -> list[str]
    tok(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=True)
        -> {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]}  (also as attributes; `.to`)
    tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
    tok.pad_token, tok.bos_token, tok.eos_token, tok.padding_side, tok.vocab_size, len(tok)
    tok.save_pretrained(directory), CharTokenizer.from_pretrained(directory)

Ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk>, then one id per character of `DEFAULT_CHARS` (digits, letters,
ASCII punctuation including + - * / =, space, newline): vocab_size = 4 + 96 = 100. Characters outside
the alphabet encode to <unk>.

`WordTokenizer` has the same interface, one id per word: by default the vocabulary of Padula & Soemers'
arithmetic task (every number 0..99 one token, `+ * =`, then [BOS] [EOS] [PAD]; 106 ids). Both save to
fastrlhf_tokenizer.json, whose "type" ("char" | "word") `load_tokenizer` dispatches on.
"""
from __future__ import annotations

import json
import os
import re
import string
from typing import Iterable, Sequence

import torch

TOKENIZER_FILE = "fastrlhf_tokenizer.json"  # written by save_pretrained; its presence marks a CharTokenizer
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3
DEFAULT_CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation + " \n"


class Encoding(dict):
    """What the tokenizers' `__call__` returns: a dict of tensors with attribute access and `.to(device)`,
    like transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def to(self, device) -> "Encoding":
        return Encoding({k: v.to(device) for k, v in self.items()})


class _ListTokenizer:
    """The batch half of the interface, on top of a subclass's `encode`, `decode`, `vocab_size`,
    `pad_token_id` and `padding_side`."""

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def __call__(self, texts: str | Sequence[str], padding: bool | str = True, padding_side: str | None = None,
                 return_tensors: str | None = "pt", add_special_tokens: bool = True) -> Encoding:
        """Tokenize a batch. Rows are padded with the pad token to the longest row on `padding_side`
        (default: the tokenizer's, "left", the side prompts for generation need); attention_mask is 1 on
        real tokens."""
        single = isinstance(texts, str)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([texts] if single else texts)]
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors: expected 'pt' or None, got {return_tensors!r}")
        if return_tensors is None:
            masks = [[1] * len(r) for r in rows]
            if single:
                return Encoding(input_ids=rows[0], attention_mask=masks[0])
            if not padding:
                return Encoding(input_ids=rows, attention_mask=masks)
        elif not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("padding: rows have different lengths; pass padding=True to return tensors")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[b, cols] = torch.tensor(r, dtype=torch.long)
            mask[b, cols] = 1
        if return_tensors is None:
            return Encoding(input_ids=ids.tolist(), attention_mask=mask.tolist())
        return Encoding(input_ids=ids, attention_mask=mask)


class CharTokenizer(_ListTokenizer):
    """One token per character; special tokens <pad>=0, <bos>=1, <eos>=2, <unk>=3."""

    def __init__(self, chars: str = DEFAULT_CHARS, padding_side: str = "left"):
        if len(set(chars)) != len(chars):
            raise ValueError(f"chars: expected distinct characters, got duplicates in {chars!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self.chars = chars
        self.padding_side = padding_side
        self._id = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)
        self.pad_token, self.bos_token, self.eos_token, self.unk_token = SPECIAL_TOKENS
        self.model_max_length = 1 << 20  # no limit of its own; the model's max_position_embeddings applies

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.chars)

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(len(SPECIAL_TOKENS)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = [self._id.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        n_special = len(SPECIAL_TOKENS)
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: expected token ids in [0, {self.vocab_size}), got {i}")
            if i < n_special:
                if not skip_special_tokens:
                    out.append(SPECIAL_TOKENS[i])
            else:
                out.append(self.chars[i - n_special])
        return "".join(out)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump({"type": "char", "chars": self.chars, "special_tokens": list(SPECIAL_TOKENS),
                       "padding_side": self.padding_side}, f, indent=1)
        return [path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "CharTokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path) as f:
            data = json.load(f)
        if data.get("type") != "char" or data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: expected a fastrlhf char tokenizer file, got type={data.get('type')!r}")
        return cls(data["chars"], padding_side=data.get("padding_side", "left"))


# The vocabulary of the authors' complete_math_tokenizer.json (ids 0..102; gpt_math.py's
# CompleteMathTokenizer at the same commit lists only 0..99 and "=", which cannot encode its own prompts:
# the shipped JSON, with "+" 100 and "*" 101, is the one their 109-row checkpoint was trained with).
ARITHMETIC_WORDS = tuple(str(i) for i in range(100)) + ("+", "*", "=")
WORD_SPECIAL_TOKENS = ("[BOS]", "[EOS]", "[PAD]")  # ids len(words) + 0, 1, 2: 103, 104, 105 by default
# The `tokenizers` Whitespace pre-tokenizer (runs of word characters, runs of other non-space
# characters), after the special tokens, which match first as added tokens do.
_WORDS_RE = re.compile("|".join(re.escape(t) for t in WORD_SPECIAL_TOKENS) + r"|\w+|[^\w\s]+")


class WordTokenizer(_ListTokenizer):
    """One token per word of `words`, then [BOS], [EOS], [PAD]; no unknown token.

    As the authors' WordLevel tokenizer (gpt_math.py, CompleteMathTokenizer; Whitespace pre-tokenizer):
    `3 + 10 + 7 =` is 7 tokens, `13+7` is 3; a word outside the vocabulary (`100`, `==`) is an error,
    because their vocabulary has no [UNK] either. `decode` joins the tokens with single spaces, as their
    tokenizer decodes (`13+7` -> `13 + 7`), and drops ids >= vocab_size (their model has 3 more output
    rows than tokens, gpt_math.py:169 vocab_size=len(tokenizer) + 3; `tokenizers` decodes those to
    nothing)."""

    def __init__(self, words: Sequence[str] = ARITHMETIC_WORDS, padding_side: str = "left"):
        words = tuple(words)
        if len(set(words)) != len(words):
            raise ValueError("words: expected distinct words, got duplicates")
        bad = [w for w in words if w in WORD_SPECIAL_TOKENS or _WORDS_RE.fullmatch(w) is None]
        if bad:
            raise ValueError(f"words: expected words that pre-tokenize to themselves and are not special "
                             f"tokens, got {bad[:5]}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        self.words = words
        self.padding_side = padding_side
        self._tokens = words + WORD_SPECIAL_TOKENS
        self._id = {w: i for i, w in enumerate(self._tokens)}
        n = len(words)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = n, n + 1, n + 2
        self.bos_token, self.eos_token, self.pad_token = WORD_SPECIAL_TOKENS
        self.unk_token_id = self.unk_token = None
        self.model_max_length = 1 << 20  # no limit of its own; the model's max_position_embeddings applies

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.bos_token_id, self.eos_token_id, self.pad_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = []
        for w in _WORDS_RE.findall(text):
            i = self._id.get(w)
            if i is None:
                raise ValueError(f"text: expected words of the vocabulary, got {w!r} in {text!r}")
            ids.append(i)
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i < 0:
                raise ValueError(f"ids: expected token ids >= 0, got {i}")
            if i >= self.vocab_size or (skip_special_tokens and i >= len(self.words)):
                continue
            out.append(self._tokens[i])
        return " ".join(out)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path, "w") as f:
            json.dump({"type": "word", "words": list(self.words), "special_tokens": list(WORD_SPECIAL_TOKENS),
                       "padding_side": self.padding_side}, f, indent=1)
        return [path]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "WordTokenizer":
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path) as f:
            data = json.load(f)
        if data.get("type") != "word" or data.get("special_tokens") != list(WORD_SPECIAL_TOKENS):
            raise ValueError(f"{path}: expected a fastrlhf word tokenizer file, got type={data.get('type')!r}")
        return cls(data["words"], padding_side=data.get("padding_side", "left"))


FILE_TYPES = {"char": CharTokenizer, "word": WordTokenizer}  # "type" in fastrlhf_tokenizer.json


def load_tokenizer(name_or_path: str | None):
    """The tokenizer of a checkpoint: a CharTokenizer when `name_or_path` is None (the built-in model), the
    CharTokenizer or WordTokenizer its fastrlhf_tokenizer.json describes, else
    `AutoTokenizer.from_pretrained`, set up for generation: left padding, and the EOS token as pad token
    when the checkpoint has none."""
    if name_or_path is None:
        return CharTokenizer()
    path = os.path.join(name_or_path, TOKENIZER_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            kind = json.load(f).get("type")
        if kind not in FILE_TYPES:
            raise ValueError(f"{path}: expected type one of {tuple(FILE_TYPES)}, got {kind!r}")
        return FILE_TYPES[kind].from_pretrained(name_or_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r}: expected a pad or EOS token, found neither")
        tok.pad_token = tok.eos_token
    return tok
