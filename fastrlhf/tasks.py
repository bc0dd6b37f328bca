"""Prompt sources: generated arithmetic problems, sentiment prompts, or a user file.

A task is a plain object with `sample(n, rng) -> list[str]`; `rng` is a `random.Random` owned by
the trainer (its state goes into checkpoints, so a resumed run draws the same prompts).
"""
from __future__ import annotations

import json
import operator
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# Openings in the style of the IMDB-continuation prompts used for sentiment RL (Ziegler et al. 2019);
# the policy is rewarded for continuing them positively.
SENTIMENT_PROMPTS = (
    "This movie was", "I watched this film and", "The plot of the story", "Honestly, the acting",
    "My friends told me that this show", "The ending of the book", "After ten minutes I felt",
    "The soundtrack", "I have to say the director", "The restaurant we tried last night",
    "Our trip to the coast", "The new phone I bought", "This song makes me", "The weather today",
    "My first day at the new job", "The customer service was", "The hotel room", "This game is",
    "The lecture this morning", "Reading this review, I think", "The characters in this series",
    "Dinner at my parents' house", "The concert last weekend", "The second season",
)


@dataclass(frozen=True)
class ArithmeticTask:
    """Problems `a<op>b=` with operands of 1..`digits` digits; operators from `operators`."""

    digits: int = 1
    operators: str = "+"

    def __post_init__(self):
        if not (isinstance(self.digits, int) and 1 <= self.digits <= 9):
            raise ValueError(f"digits: expected an int in [1, 9], got {self.digits!r}")
        bad = [c for c in self.operators if c not in OPERATORS]
        if not self.operators or bad:
            raise ValueError(f"operators: expected a non-empty string of {''.join(OPERATORS)}, "
                             f"got {self.operators!r}")

    def sample(self, n: int, rng: random.Random) -> List[str]:
        hi = 10 ** self.digits - 1
        return [f"{rng.randint(0, hi)}{rng.choice(self.operators)}{rng.randint(0, hi)}="
                for _ in range(n)]


def solve(prompt: str) -> int:
    """The exact answer of an arithmetic prompt `a<op>b=`."""
    body = prompt.strip().rstrip("=")
    for i, c in enumerate(body[1:], start=1):  # start at 1: an operand never starts with an operator
        if c in OPERATORS:
            return OPERATORS[c](int(body[:i]), int(body[i + 1:]))
    raise ValueError(f"prompt: expected 'a<op>b=' with op in {''.join(OPERATORS)}, got {prompt!r}")


@dataclass(frozen=True)
class PromptListTask:
    """Prompts drawn uniformly (with replacement) from a fixed list."""

    prompts: Sequence[str]

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")

    def sample(self, n: int, rng: random.Random) -> List[str]:
        return [self.prompts[rng.randrange(len(self.prompts))] for _ in range(n)]


def load_prompts(path) -> List[str]:
    """One prompt per line of a text file, or per record of a JSONL file (`.jsonl`: key "prompt",
    else "text", else a bare JSON string). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: expected an existing file, got {str(path)!r}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            rec = json.loads(line)
            if isinstance(rec, dict):
                key = "prompt" if "prompt" in rec else "text" if "text" in rec else None
                if key is None:
                    raise ValueError(f"prompts: {path}:{lineno}: expected a 'prompt' or 'text' key, "
                                     f"got keys {sorted(rec)}")
                rec = rec[key]
            if not isinstance(rec, str):
                raise ValueError(f"prompts: {path}:{lineno}: expected a string, got {type(rec).__name__}")
            out.append(rec)
        else:
            out.append(line)
    if not out:
        raise ValueError(f"prompts: expected at least one prompt in {str(path)!r}, got none")
    return out


def make_task(name: str, *, digits: int = 1, operators: str = "+", prompts_file=None):
    """`arithmetic`, `sentiment` (built-in list, or `prompts_file` if given) or `file`."""
    if name == "arithmetic":
        return ArithmeticTask(digits=digits, operators=operators)
    if name == "sentiment":
        return PromptListTask(tuple(load_prompts(prompts_file)) if prompts_file else SENTIMENT_PROMPTS)
    if name == "file":
        if not prompts_file:
            raise ValueError("prompts: task 'file' needs --prompts FILE, got none")
        return PromptListTask(tuple(load_prompts(prompts_file)))
    raise ValueError(f"task: expected one of ('arithmetic', 'sentiment', 'file'), got {name!r}")
