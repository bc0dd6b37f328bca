"""Sequence scores: programmed rewards, user callables, or a Hugging Face reward model.

Every reward is a callable `(prompts: list[str], responses: list[str]) -> list[float]` (or a 1-D
tensor); `make_reward` resolves the `--reward` / `--reward_model` flags to one.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .tasks import evaluate, solve

BUILTIN_REWARDS = ("arithmetic", "padula-arithmetic", "vader")

_LEADING_INT = re.compile(r"\s*(-?\d+)")


def arithmetic_reward(prompts: Sequence[str], responses: Sequence[str], *, partial_credit: bool = False):
    """1.0 when the response starts with the exact answer of `a<op>b=` (and nothing but digits
    follow it before a non-digit), else 0. With `partial_credit`, a wrong answer gets
    0.5 · (digits matching the answer at the same position) / max(len(answer), len(response number)),
    so partial credit is always < 0.5 < exact."""
    out = []
    for prompt, response in zip(prompts, responses):
        answer = str(solve(prompt))
        m = _LEADING_INT.match(response)
        got = m.group(1) if m else ""
        if got == answer:
            out.append(1.0)
        elif partial_credit and got:
            same = sum(a == b for a, b in zip(got, answer))
            out.append(0.5 * same / max(len(got), len(answer)))
        else:
            out.append(0.0)
    return out


CHAIN_ERROR_CAP = 500.0   # simple_operations.py:76, error = min(error, 500)
CHAIN_ERROR_SCALE = 10.0  # simple_operations.py:79, 2 / (1 + exp(error / 10))


def chain_error(text: str) -> float:
    """The error of a solved chain as simple_operations.py's reward_function measures it (:43-76).

    Spaces are removed and the text split at `=`; the first statement's value is the solution. The error is
    Σ over the other statements of |solution − value|, inf at the first empty or unparsable statement
    (`evaluate` raises), and inf if statement i (0-based) has not exactly (operators of the first) − i − 1
    `+`/`*` characters. It is capped at CHAIN_ERROR_CAP = 500, so an unparsable answer scores like an error
    of 500. On a chain prompt (its steps are right) and a one-number answer: |answer − solution|."""
    statements = text.replace(" ", "").split("=")
    first = statements.pop(0)
    try:
        solution = evaluate(first)
    except ValueError:
        raise ValueError(f"prompt: expected an arithmetic expression before the first '=', got {text!r}") from None
    error = 0.0
    for statement in statements:
        try:  # an empty statement does not parse either
            error += abs(solution - evaluate(statement))
        except ValueError:
            error = math.inf
            break
    n_ops = sum(first.count(c) for c in "+*")
    if any(sum(s.count(c) for c in "+*") != n_ops - i - 1 for i, s in enumerate(statements)):
        error = math.inf
    return min(error, CHAIN_ERROR_CAP)


def chain_arithmetic_reward(prompts: Sequence[str], responses: Sequence[str]):
    """Padula & Soemers' arithmetic reward of prompt + response (trl_math.py:177-178 scores
    `q + r`): 2 / (1 + exp(error / 10)) with `chain_error` (simple_operations.py:79). 1.0 for the exact
    answer, 2/(1+e) at an error of 10, 2/(1+e^50) ≈ 3.9e-22 (not 0) when the answer does not parse
    (an operator, `=`, an empty response)."""
    return [2.0 / (1.0 + math.exp(chain_error(p + r) / CHAIN_ERROR_SCALE)) for p, r in zip(prompts, responses)]


REWARD_INPUTS = ("response", "prompt_response")


def reward_texts(prompts: Sequence[str], responses: Sequence[str], reward_input: str = "prompt_response") -> List[str]:
    """The texts a sentiment scorer reads: `prompt + response` (no separator), as Padula & Soemers'
    sentiment/imdb_ppo.py passes them to its pipeline and to VADER (`texts = [q + r for q, r in
    zip(batch["query"], batch["response"])]`), or the response alone."""
    if reward_input not in REWARD_INPUTS:
        raise ValueError(f"reward_input: expected one of {REWARD_INPUTS}, got {reward_input!r}")
    return [p + r for p, r in zip(prompts, responses)] if reward_input == "prompt_response" else list(responses)


_VADER = None


def vader_reward(prompts: Sequence[str], responses: Sequence[str], *, reward_input: str = "prompt_response"):
    """VADER compound sentiment in [-1, 1] (Hutto & Gilbert 2014) of `reward_texts` (default prompt +
    response, as imdb_ppo.py's `sia.polarity_scores(text)["compound"]` over `q + r`; theirs is nltk's port of
    VADER, this the vaderSentiment package, which ships its lexicon)."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        _VADER = SentimentIntensityAnalyzer()
    return [_VADER.polarity_scores(t)["compound"] for t in reward_texts(prompts, responses, reward_input)]


def default_label(config) -> int:
    """The score logit of a sequence-classification model with `config` (num_labels, id2label): the label
    named POSITIVE (any case; lvwerra/distilbert-imdb's id2label {0: NEGATIVE, 1: POSITIVE}, which
    imdb_ppo.py reads as `output[1]["score"]`), else 0 for a one-logit model (a reward model), else a
    ValueError listing the labels."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    positive = [i for i, name in sorted(id2label.items()) if name.upper() == "POSITIVE"]
    if len(positive) == 1:
        return positive[0]
    if config.num_labels == 1:
        return 0
    raise ValueError(f"reward_label: the reward model has {config.num_labels} labels {id2label} and none is named "
                     f"POSITIVE; pass --reward_label with the index of the label to score")


def load_callable(spec: str) -> Callable:
    """`path/to/file.py:function` or `package.module:function` -> the function."""
    if ":" not in spec:
        raise ValueError(f"reward: expected one of {BUILTIN_REWARDS}, 'path/file.py:function' or "
                         f"'module:function', got {spec!r}")
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward: expected 'path/file.py:function' or 'module:function', got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward: expected an existing Python file, got {target!r}")
        mod_spec = importlib.util.spec_from_file_location(f"fastrlhf_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward: cannot import module {target!r} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward: expected a function {name!r} in {target!r}, got {type(fn).__name__}")
    return fn


class RewardModel:
    """A Hugging Face sequence-classification model as a reward: the score of `reward_texts(prompts,
    responses, reward_input)` (default prompt + response) is logit `label` (None: `default_label`) at the
    last non-pad token. Uses the model's own tokenizer when the directory has one, else
    `fallback_tokenizer` (the policy's)."""

    def __init__(self, path, *, label: Optional[int] = None, device="cpu", fallback_tokenizer=None, dtype=None,
                 batch_size: int = 16, reward_input: str = "prompt_response"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input: expected one of {REWARD_INPUTS}, got {reward_input!r}")
        self.reward_input = reward_input
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        n = self.model.config.num_labels
        if label is None:
            label = default_label(self.model.config)
        if not 0 <= label < n:
            raise ValueError(f"reward_label: expected an int in [0, {n}) for {path}, got {label}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            if fallback_tokenizer is None:
                raise ValueError(f"reward_model: {path} has no tokenizer and no fallback was given") from None
            self.tokenizer = fallback_tokenizer
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad)
        if self.model.config.pad_token_id is None:  # HF pools at the last token that is not a pad
            self.model.config.pad_token_id = self.pad_id
        self.label, self.device, self.batch_size = label, device, batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        scores = []
        texts = reward_texts(prompts, responses, self.reward_input)
        for s in range(0, len(texts), self.batch_size):
            ids = [list(self.tokenizer.encode(t)) or [self.pad_id] for t in texts[s:s + self.batch_size]]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(ids), width), dtype=torch.long)
            for i, row in enumerate(ids):
                input_ids[i, :len(row)] = torch.tensor(row)
                attn[i, :len(row)] = 1
            input_ids, attn = input_ids.to(self.device), attn.to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits  # [B, labels]
            scores.extend(logits[:, self.label].float().tolist())
        return scores


def make_reward(name, *, reward_model=None, reward_label=None, partial_credit=False, device="cpu",
                tokenizer=None, dtype=None, reward_input=None) -> Callable:
    """Resolve `--reward` / `--reward_model` to a `(prompts, responses) -> scores` callable. `reward_input`
    (vader and reward models; None: prompt_response) is what they score (`reward_texts`)."""
    reward_input = reward_input or "prompt_response"
    if reward_model:
        return RewardModel(reward_model, label=reward_label, device=device, fallback_tokenizer=tokenizer,
                           dtype=dtype, reward_input=reward_input)
    if name == "arithmetic":
        return lambda prompts, responses: arithmetic_reward(prompts, responses, partial_credit=partial_credit)
    if name == "padula-arithmetic":
        return chain_arithmetic_reward
    if name == "vader":
        if reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input: expected one of {REWARD_INPUTS}, got {reward_input!r}")
        return lambda prompts, responses: vader_reward(prompts, responses, reward_input=reward_input)
    return load_callable(name)


def scores_tensor(values, n: int, device, *, source: str = "reward") -> torch.Tensor:
    """A reward's output -> float32 [n] on `device`: a sequence (or 1-d tensor) of n finite real numbers,
    one per response; anything else is a ValueError naming `source` (the reward) and what it returned."""
    def refuse(what):
        shown = repr(values)
        raise ValueError(f"{source}: expected {n} finite scores (one float per response), got {what}: "
                         f"{shown[:200] + ('...' if len(shown) > 200 else '')}")
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex() or values.dim() != 1:
            refuse(f"a {values.dtype} tensor of shape {tuple(values.shape)}")
        t = values.detach().float().cpu()
    else:
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            refuse(f"a {type(values).__name__}")
        items = list(values)
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, (int, float)) and not (
            isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point)]
        if bad:
            refuse(f"{type(bad[0]).__name__} values")
        t = torch.tensor([float(v) for v in items], dtype=torch.float32)
    if t.shape != (n,):
        refuse(f"{t.numel()} scores")
    if not bool(torch.isfinite(t).all()):
        refuse("non-finite scores")
    return t.to(device)
