"""Prompt sources: generated arithmetic problems, sentiment prompts, or a user file.

`ArithmeticTask` is fastrlhf's own `a<op>b=` task; `ChainArithmeticTask` is the arithmetic task of
Padula & Soemers (2024), "Reinforcement Learning from Explicitly Programmed Reward Signals"
(arXiv 2410.17126), as their released code builds it (`simple_arithmatic/` of
PadLex/Reinforcement-Learning-from-Explicitly-Programmed-Reward-Signals @ 62d1b28).

A task is a plain object with `sample(n, rng) -> list[str]`; `rng` is a `random.Random` owned by
the trainer (its state goes into checkpoints, so a resumed run draws the same prompts).
"""
from __future__ import annotations

import ast
import json
import math
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


# Characters of the unspaced expression (simple_operations.py, generate_expression: max_length=10).
CHAIN_MAX_LENGTH = 10
# Longest kept text: CONTEXT_SIZE - 2 = 62 characters, for [BOS] and [EOS] (trl_math.py:48 on the
# spaced prompt, gpt_math.py:125 on the unspaced solved chain).
CHAIN_MAX_CHARS = 62


@dataclass(frozen=True)
class ChainArithmeticTask:
    """Padula & Soemers' arithmetic prompts: a sum of terms 0..10 and its step-by-step solution, cut
    after the last `=`, e.g. `3 + 10 + 7 = 13 + 7 =` (answer 20). The answer is one token of the word
    tokenizer (`fastrlhf.tokenizer.WordTokenizer`).

    Expression, as simple_operations.py's generate_expression builds it: append `randint(0, 10)` and
    `+` until the string has at least `max_length` characters, cut it to `max_length` characters (a
    last `10` can become `1`), drop a trailing `+`, redraw unless its value is below 100. With the
    released max_length 10: 4 or 5 terms (5 in 95.7% of 2^17 draws), sums 0..46, mean 24.6; the
    redraw never fires.
    Chain, as simple_operations.py's solve_expression writes it: replace one `+`, drawn uniformly
    among all of them (not the leftmost), and its two operands by their sum, until one number is left.
    Prompt, as trl_math.py's rl_dataset_generator cuts it: spaces around `+` and `=`, everything after
    the last `=` removed, prompts over `max_chars` characters dropped (0.64% of draws; 63 is the
    longest), i.e. redrawn here.

    `rng` is drawn in the authors' order (randint and `choice("+")` per term, one choice per step),
    so `random.Random(0)` yields the prompts of their `random.seed(0)` run in order (trl_math.py
    draws its 2^17 RL prompts first after the seed; `sample` and `solved` share the stream).
    """

    max_length: int = CHAIN_MAX_LENGTH
    max_chars: int = CHAIN_MAX_CHARS

    def __post_init__(self):
        for name in ("max_length", "max_chars"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")

    def _expression(self, rng: random.Random) -> List[int]:
        while True:
            text = ""
            while len(text) < self.max_length:
                text += str(rng.randint(0, 10))
                text += rng.choice("+")  # one draw, as their random.choice("+"), keeps the stream aligned
            text = text[:self.max_length].removesuffix("+")
            terms = [int(t) for t in text.split("+")]
            if sum(terms) < 100:
                return terms

    def _chain(self, rng: random.Random) -> List[List[int]]:
        """[terms, terms after one step, ..., [answer]] of one fresh expression."""
        steps = [self._expression(rng)]
        while len(steps[-1]) > 1:
            t = steps[-1]
            i = rng.randrange(len(t) - 1)  # their random.choice over the `+` positions: one _randbelow
            steps.append(t[:i] + [t[i] + t[i + 1]] + t[i + 2:])
        return steps

    @staticmethod
    def _text(steps: Sequence[Sequence[int]]) -> str:
        return " = ".join(" + ".join(map(str, t)) for t in steps)

    def sample(self, n: int, rng: random.Random) -> List[str]:
        """`n` prompts: the chain up to and including its last ` =` (the final number removed)."""
        out = []
        while len(out) < n:
            steps = self._chain(rng)
            prompt = self._text(steps[:-1]) + " ="
            if len(prompt) <= self.max_chars:
                out.append(prompt)
        return out

    def answer_metrics(self, prompts: Sequence[str], responses: Sequence[str]) -> dict:
        """Per-rollout statistics of the answers (logged by `fastrlhf train` for this task), over the B
        responses, each stripped of surrounding spaces (an answer is one token, e.g. `20`; anything else is
        counted as given):
            exact_rate        fraction of responses that are the exact answer (an integer equal to solve_chain)
            distinct_answers  number of different answers given
            answer_entropy    -sum_a f_a log f_a (nats), f_a = the fraction of responses giving answer a:
                              0 when every prompt gets the same answer, log B when all differ
            answer_mode_frac  max_a f_a, the share of the most common answer (1: the policy gives one
                              answer to every prompt, the collapse Padula & Soemers' batch entropy targets)
        """
        answers = [r.strip() for r in responses]
        if not answers:
            raise ValueError("responses: expected at least one response, got none")
        exact = sum(a.isdigit() and int(a) == solve_chain(p) for p, a in zip(prompts, answers))
        counts = {}
        for a in answers:
            counts[a] = counts.get(a, 0) + 1
        n = len(answers)
        return {"exact_rate": exact / n, "distinct_answers": len(counts),
                "answer_entropy": -sum(c / n * math.log(c / n) for c in counts.values()),
                "answer_mode_frac": max(counts.values()) / n}

    def solved(self, n: int, rng: random.Random) -> List[str]:
        """`n` solved chains, e.g. `3 + 10 + 7 = 13 + 7 = 20`: the supervised examples of gpt_math.py's
        dataset_generator (its length check is on the unspaced chain, which never exceeds 62
        characters at max_length 10)."""
        out = []
        while len(out) < n:
            steps = self._chain(rng)
            if len(self._text(steps).replace(" ", "")) <= self.max_chars:
                out.append(self._text(steps))
        return out


_EVAL_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                ast.Pow: operator.pow}
MAX_EXPONENT = 1000  # larger exponents are refused (a `9**9**9` would take hours); see evaluate


def evaluate(expr: str):
    """The value of a Python arithmetic expression made of number literals, + - * / ** and unary
    minus, the language of the authors' safe_eval.py (safe_eval); anything else raises ValueError,
    as does a division by zero or an exponent above MAX_EXPONENT in absolute value (safe_eval has no
    such bound; with one-token answers no exponent can occur)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, complex)) \
                and not isinstance(node.value, bool):  # what isinstance(node, ast.Num) accepts
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _EVAL_BINOPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"expr: exponent {right!r} is beyond ±{MAX_EXPONENT} in {expr!r}")
            try:
                return _EVAL_BINOPS[type(node.op)](left, right)
            except ArithmeticError as exc:  # x/0, 0**-1, float overflow
                raise ValueError(f"expr: {exc} in {expr!r}") from None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"expr: expected numbers, + - * / ** and unary -, got {type(node).__name__} in {expr!r}")

    try:
        return value(ast.parse(expr, mode="eval").body)
    except (SyntaxError, RecursionError) as exc:  # ast.parse also raises ValueError (a NUL byte): passed on
        raise ValueError(f"expr: not an expression ({exc.__class__.__name__}): {expr!r}") from None


def solve_chain(prompt: str):
    """The answer of a chain prompt: the value of its first statement (`3 + 10 + 7 = 13 + 7 =` -> 20)."""
    return evaluate(prompt.split("=", 1)[0].replace(" ", ""))


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
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompts: {path}:{lineno}: expected UTF-8 text, got byte {raw[exc.start]:#04x} at "
                             f"column {exc.start + 1}") from None
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"prompts: {path}:{lineno}: expected one JSON value per line ({exc})") from None
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
    """`arithmetic`, `padula-arithmetic` (ChainArithmeticTask: `+` only, terms 0..10), `sentiment`
    (built-in list, or `prompts_file` if given) or `file`."""
    if name == "arithmetic":
        return ArithmeticTask(digits=digits, operators=operators)
    if name == "padula-arithmetic":
        if digits != 1 or operators != "+":
            raise ValueError(f"digits, operators: task 'padula-arithmetic' has terms 0..10 and '+' only, got "
                             f"digits={digits!r}, operators={operators!r}")
        return ChainArithmeticTask()
    if name == "sentiment":
        return PromptListTask(tuple(load_prompts(prompts_file)) if prompts_file else SENTIMENT_PROMPTS)
    if name == "file":
        if not prompts_file:
            raise ValueError("prompts: task 'file' needs --prompts FILE, got none")
        return PromptListTask(tuple(load_prompts(prompts_file)))
    raise ValueError(f"task: expected one of ('arithmetic', 'padula-arithmetic', 'sentiment', 'file'), got {name!r}")
