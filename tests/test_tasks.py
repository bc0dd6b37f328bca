import json
import random

import pytest

from fastrlhf.tasks import SENTIMENT_PROMPTS, ArithmeticTask, load_prompts, make_task, solve


def test_arithmetic_prompts_follow_digits_and_operators():
    task = ArithmeticTask(digits=2, operators="+-*")
    prompts = task.sample(300, random.Random(0))
    ops_seen = set()
    for p in prompts:
        assert p.endswith("=")
        body = p[:-1]
        op = next(c for c in body[1:] if c in "+-*")
        a, b = body.split(op, 1)
        assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        ops_seen.add(op)
    assert ops_seen == {"+", "-", "*"}
    assert task.sample(5, random.Random(3)) == task.sample(5, random.Random(3))


@pytest.mark.parametrize("prompt,answer", [("3+4=", 7), ("3-7=", -4), ("12*11=", 132), ("0+0=", 0)])
def test_solve(prompt, answer):
    assert solve(prompt) == answer


def test_solve_rejects_garbage():
    with pytest.raises(ValueError, match="prompt"):
        solve("hello=")


@pytest.mark.parametrize("kw,match", [({"digits": 0}, "digits"), ({"operators": "/"}, "operators"),
                                      ({"operators": ""}, "operators")])
def test_arithmetic_task_checks(kw, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kw)


def test_load_prompts_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond one\n")
    assert load_prompts(txt) == ["first prompt", "second one"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n" + json.dumps("c") + "\n")
    assert load_prompts(jl) == ["a", "b", "c"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="'prompt' or 'text'"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="existing file"):
        load_prompts(tmp_path / "missing.txt")


def test_make_task(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("only this\n")
    assert make_task("file", prompts_file=f).sample(3, random.Random(0)) == ["only this"] * 3
    assert make_task("sentiment", prompts_file=f).sample(1, random.Random(0)) == ["only this"]
    assert set(make_task("sentiment").sample(50, random.Random(0))) <= set(SENTIMENT_PROMPTS)
    with pytest.raises(ValueError, match="--prompts"):
        make_task("file")
    with pytest.raises(ValueError, match="task"):
        make_task("chess")


def test_prompt_files_name_the_bad_line(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    with pytest.raises(ValueError, match=r"p.txt:3: expected UTF-8 text, got byte 0xff at column 8"):
        load_prompts(bad)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:4: expected one JSON value per line"):
        load_prompts(jl)
