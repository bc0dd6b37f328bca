"""Padula & Soemers' arithmetic task: chain prompts, word tokenizer, reward, GPT-2 policy, SFT rows, recipe.

The expected values are written out by hand from the authors' simple_arithmatic/ code (@ 62d1b28): the
first prompts of a seed-0 stream were checked against their generate_expression + solve_expression.
"""
import json
import math
import random
from importlib import resources

import pytest
import torch

from fastrlhf import padula
from fastrlhf.rewards import chain_arithmetic_reward, chain_error, make_reward
from fastrlhf.tasks import ChainArithmeticTask, evaluate, make_task, solve_chain
from fastrlhf.tokenizer import TOKENIZER_FILE, CharTokenizer, WordTokenizer, load_tokenizer


def reward_of(err):
    return 2 / (1 + math.exp(err / 10))  # simple_operations.py:79


# ---------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------

def test_seed0_prompts_are_the_authors():
    # their random.seed(0) run's first three prompts (trl_math.py rl_dataset_generator): note the second
    # step of the first chain combines the last two terms, not the first two
    assert ChainArithmeticTask().sample(3, random.Random(0)) == [
        "6 + 0 + 8 + 6 + 7 = 6 + 8 + 6 + 7 = 6 + 8 + 13 = 14 + 13 =",
        "2 + 9 + 8 + 4 + 1 = 2 + 9 + 8 + 5 = 2 + 9 + 13 = 11 + 13 =",
        "6 + 9 + 8 + 7 + 0 = 15 + 8 + 7 + 0 = 15 + 8 + 7 = 15 + 15 =",
    ]
    r = random.Random(0)
    ChainArithmeticTask().solved(1, r)  # gpt_math.py draws one chain to print before its 256 examples
    assert padula.sft_examples(r, 1) == ["2 + 9 + 8 + 4 + 1 = 2 + 9 + 8 + 5 = 2 + 9 + 13 = 11 + 13 = 24"]


def test_prompt_structure_and_ranges():
    task = ChainArithmeticTask()
    prompts = task.sample(2000, random.Random(1))
    n_terms, ends_with_one = set(), 0
    for p in prompts:
        assert p.endswith(" =") and not p.endswith("= =") and len(p) <= 62
        steps = [[int(x) for x in s.split(" + ")] for s in p[:-2].split(" = ")]
        first = steps[0]
        n_terms.add(len(first))
        assert all(0 <= t <= 10 for t in first) and sum(first) < 100
        assert len("+".join(map(str, first))) <= 10  # the unspaced expression is cut at 10 characters
        ends_with_one += first[-1] == 1
        # each step replaces two adjacent numbers by their sum, down to two numbers before the answer
        for a, b in zip(steps, steps[1:]):
            assert any(b == a[:i] + [a[i] + a[i + 1]] + a[i + 2:] for i in range(len(a) - 1))
        assert len(steps[-1]) == 2
        assert solve_chain(p) == sum(first)
    assert n_terms == {4, 5}
    # a last `10` cut to `1` by the 10-character cut makes 1 the most frequent last term (~11% vs ~9%)
    assert ends_with_one / len(prompts) > 0.1


def test_long_prompts_are_dropped_from_the_stream():
    # trl_math.py:48 skips prompts over CONTEXT_SIZE - 2 = 62 characters: sample() keeps the chains of the
    # same stream whose prompt fits (0.64% do not; 63 characters is the longest)
    task = ChainArithmeticTask()
    cut = [s[:s.rindex("=") + 1] for s in task.solved(3000, random.Random(0))]
    kept = [c for c in cut if len(c) <= 62]
    assert 0 < len(cut) - len(kept) and max(map(len, cut)) == 63
    assert task.sample(len(kept), random.Random(0)) == kept


def test_solver_and_evaluate():
    assert solve_chain("3 + 10 + 7 = 13 + 7 =") == 20
    assert solve_chain("0 + 0 + 0 + 0 + 0 = 0 + 0 + 0 + 0 = 0 + 0 + 0 = 0 + 0 =") == 0
    assert evaluate("2*4+67*11+1*2") == 747 and evaluate("-4*-5*3") == 60 and evaluate("7/2") == 3.5
    for bad in ("", "+", "*", "5//2", "+5", "(", "abc", "007", "3/0", "9**9**9", "True"):
        with pytest.raises(ValueError, match="expr"):
            evaluate(bad)


def test_make_task():
    assert isinstance(make_task("padula-arithmetic"), ChainArithmeticTask)
    with pytest.raises(ValueError, match="operators"):
        make_task("padula-arithmetic", operators="+*")
    with pytest.raises(ValueError, match="max_length"):
        ChainArithmeticTask(max_length=0)


# ---------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------

def test_word_tokenizer_ids_are_the_authors():
    tok = WordTokenizer()  # complete_math_tokenizer.json: 0..99 -> 0..99, + 100, * 101, = 102, specials 103-105
    assert tok.vocab_size == len(tok) == 106
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (103, 104, 105)
    assert tok.all_special_ids == [103, 104, 105] and tok.unk_token_id is None
    for n in range(100):
        assert tok.encode(str(n), add_special_tokens=False) == [n]
    assert tok.encode("3 + 10 + 7 = 13 + 7 =") == [103, 3, 100, 10, 100, 7, 102, 13, 100, 7, 102]
    assert tok.encode("13+7=20*2", add_special_tokens=False) == [13, 100, 7, 102, 20, 101, 2]


def test_word_tokenizer_round_trip_and_errors():
    tok = WordTokenizer()
    p = "6 + 9 + 8 + 7 + 0 = 15 + 8 + 7 + 0 = 15 + 8 + 7 = 15 + 15 ="
    ids = tok.encode(p)
    assert tok.decode(ids) == p and tok.decode(torch.tensor(ids)) == p
    assert tok.decode(ids + [104, 105]) == p
    assert tok.decode([103, 20, 104], skip_special_tokens=False) == "[BOS] 20 [EOS]"
    assert tok.encode("[BOS] 20 [EOS]", add_special_tokens=False) == [103, 20, 104]
    # ids 106..108: the model's 3 extra rows, decoded to nothing as `tokenizers` does
    assert tok.decode([106]) == "" and tok.decode([20, 108, 5]) == "20 5"
    assert tok.batch_decode(torch.tensor([[20, 104], [101, 105]])) == ["20", "*"]
    for bad in ("100", "==", "3 - 1", "x"):
        with pytest.raises(ValueError, match="text"):
            tok.encode(bad)
    with pytest.raises(ValueError, match="ids"):
        tok.decode([-1])


def test_word_tokenizer_batch_save_and_load(tmp_path):
    tok = WordTokenizer()
    enc = tok(["3 + 4 =", "1 + 2 + 3 = 3 + 3 ="])
    assert enc.input_ids.tolist() == [[105] * 6 + [103, 3, 100, 4, 102],
                                      [103, 1, 100, 2, 100, 3, 102, 3, 100, 3, 102]]
    assert enc.attention_mask[0].tolist() == [0] * 6 + [1] * 5
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text())["type"] == "word"
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, WordTokenizer) and back.words == tok.words
    assert back.encode("12 = 12") == tok.encode("12 = 12")
    CharTokenizer().save_pretrained(tmp_path / "char")
    assert isinstance(load_tokenizer(str(tmp_path / "char")), CharTokenizer)
    with pytest.raises(ValueError, match="word tokenizer"):
        WordTokenizer.from_pretrained(tmp_path / "char")


# ---------------------------------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------------------------------

def test_reward_values():
    p = "3 + 10 + 7 = 13 + 7 ="
    got = chain_arithmetic_reward([p] * 8, ["20", "30", "10", "25", "+", "=", "", "20 = 20"])
    worst = reward_of(500)  # unparsable -> inf error, capped at 500 (simple_operations.py:76)
    assert got[0] == 1.0
    assert got[1] == pytest.approx(2 / (1 + math.e), rel=1e-12) and got[2] == got[1]
    assert got[3] == pytest.approx(reward_of(5), rel=1e-12)
    assert got[4:] == [pytest.approx(worst, rel=1e-12)] * 4  # an extra statement breaks the operator count
    assert 0 < worst < 1e-21
    # every step of the prompt counts: a wrong intermediate step adds its error
    assert chain_error("3 + 10 + 7 = 15 + 7 = 20") == 2  # |20 - 22| + |20 - 20|
    assert chain_error("3 + 10 + 7 = 20 = 20") == 500  # a step with the wrong number of operators
    assert chain_error("3+10+7=13+7=2 0") == 0  # spaces are removed before parsing: "20"
    with pytest.raises(ValueError, match="prompt"):
        chain_error("x = 3")


def test_make_reward_name():
    fn = make_reward("padula-arithmetic")
    assert fn(["1 + 2 + 3 = 3 + 3 ="], ["6"]) == [1.0]


# ---------------------------------------------------------------------------------------------------
# policy and SFT rows
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,n_params", [("paper", None), ("cpu", 418_944)])
def test_gpt2_config_builds_a_model(size, n_params):
    from transformers import GPT2LMHeadModel

    tok = WordTokenizer()
    cfg = padula.gpt2_config(tok, size)
    assert cfg.vocab_size == 109 and (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (103, 104, 105)
    if size == "paper":  # 85,926,144 parameters: counted from the shapes, no 86M model built in the test
        h, L, V, P = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_positions
        assert (h, L, cfg.n_head, P, cfg.activation_function, cfg.resid_pdrop) == (768, 12, 12, 1024, "gelu_new", 0.1)
        assert V * h + P * h + L * (12 * h * h + 13 * h) + 2 * h == 85_926_144
        return
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == n_params
    enc = tok(["3 + 10 + 7 = 13 + 7 =", "1 + 1 + 1 + 1 = 2 + 1 + 1 = 3 + 1 ="])
    logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    assert logits.shape == (2, enc.input_ids.shape[1], 109) and torch.isfinite(logits).all()
    assert padula.gpt2_config(tok, "cpu", dropout=0.0).attn_pdrop == 0.0
    with pytest.raises(ValueError, match="size"):
        padula.gpt2_config(tok, "large")


def test_sft_batch_layout():
    tok = WordTokenizer()
    text = "3 + 10 + 7 = 13 + 7 = 20"
    b = padula.sft_batch(tok, [text])
    ids = b["input_ids"][0].tolist()
    chain = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 64 and ids == [105] * (62 - len(chain)) + [103] + chain + [104]
    assert b["attention_mask"][0].tolist() == [0] * (62 - len(chain)) + [1] * (len(chain) + 2)
    assert b["labels"][0].tolist() == [-100] * (62 - len(chain)) + [103] + chain + [104]
    with pytest.raises(ValueError, match="length"):
        padula.sft_batch(tok, [text], length=len(chain) + 1)


# ---------------------------------------------------------------------------------------------------
# recipe
# ---------------------------------------------------------------------------------------------------

def test_recipe_uses_existing_flags_with_the_sourced_values():
    import yaml

    from fastrlhf import config

    text = resources.files("fastrlhf").joinpath("recipes/padula-arithmetic.yaml").read_text()
    values = yaml.safe_load(text)
    config._split(values, "recipe")        # every key is a `fastrlhf train` flag
    config._check_types(values, "recipe")
    assert {k: values[k] for k in ("per_device_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                                   "ppo_epochs", "learning_rate", "kl_coef", "entropy_coef", "batch_entropy_coef",
                                   "max_new_tokens", "max_grad_norm", "vf_coef", "cliprange", "cliprange_value")} \
        == dict(per_device_batch_size=128, gradient_accumulation_steps=1, num_mini_batches=1, ppo_epochs=4,
                learning_rate=1.41e-5, kl_coef=0.0, entropy_coef=0.3, batch_entropy_coef=0.0, max_new_tokens=1,
                max_grad_norm=None, vf_coef=0.1, cliprange=0.2, cliprange_value=0.2)
    assert values["task"] == values["reward"] == "padula-arithmetic"


# ---------------------------------------------------------------------------------------------------
# the pieces through today's trainer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_recipe_trains_the_gpt2_policy_through_fastrlhf_train(tmp_path):
    """The recipe's flags, a saved "cpu" GPT-2 + WordTokenizer checkpoint and the reward, run by
    `fastrlhf train` through `--task file` and `--reward module:fn`: one token per answer, rewards in (0, 1]."""
    from transformers import GPT2LMHeadModel

    from fastrlhf import metrics, train

    tok = WordTokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(padula.gpt2_config(tok, "cpu", dropout=0.0)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("\n".join(ChainArithmeticTask().sample(64, random.Random(0))))
    recipe = resources.files("fastrlhf").joinpath("recipes/padula-arithmetic.yaml")
    argv = ["--config", str(recipe), "--task", "file", "--prompts", str(tmp_path / "prompts.txt"),
            "--reward", "fastrlhf.rewards:chain_arithmetic_reward", "--model_name_or_path", str(tmp_path / "model"),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_batch_size", "8",
            "--ppo_epochs", "1", "--eval_samples", "8", "--batch_entropy_coef", "0.3", "--sft_steps", "0"]
    assert train.main(argv) == 0
    recs = metrics.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["response_len"] == 1.0 and 0.0 < r["reward_mean"] <= 1.0 for r in recs)


def test_recipe_by_name_trains_the_builtin_gpt2(tmp_path):
    """`fastrlhf train --recipe padula-arithmetic`: the built-in padula-gpt2-cpu model and WordTokenizer, the
    chain task and its reward, their warm start; one token per answer, rewards in (0, 1]."""
    from fastrlhf import metrics, train

    out = tmp_path / "run"
    argv = ["--recipe", "padula-arithmetic", "--max_steps", "2", "--per_device_batch_size", "8",
            "--eval_samples", "4", "--output_dir", str(out), "--log_samples", "8"]
    assert train.main(argv) == 0
    recs = metrics.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(r["response_len"] == 1.0 and 0.0 < r["reward_mean"] <= 1.0 for r in recs)
    # the answer statistics of each step, recomputed from its logged samples (--log_samples 8 = the whole batch)
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    for r in recs:
        rows = [x for x in samples if x["step"] == r["step"]]
        assert len(rows) == 8
        exact = [x["reward"] == 1.0 for x in rows]   # reward 1 <=> error 0 <=> the exact answer
        assert r["exact_rate"] == sum(exact) / 8
        assert r["distinct_answers"] == len({x["response"].strip() for x in rows})


def test_answer_metrics_against_hand_counts():
    task = ChainArithmeticTask()
    prompts = ["1 + 2 =", "3 + 4 =", "5 + 5 =", "1 + 1 =", "2 + 2 =", "9 + 9 ="]
    responses = [" 3", "7", " 24", "24", "24 ", "+"]   # 2 exact; answers 3, 7, 24 x3, +
    m = task.answer_metrics(prompts, responses)
    assert m["exact_rate"] == 2 / 6 and m["distinct_answers"] == 4 and m["answer_mode_frac"] == 3 / 6
    # entropy of the answer frequencies (1, 1, 3, 1) / 6, in nats
    assert m["answer_entropy"] == pytest.approx(-(3 * (1 / 6) * math.log(1 / 6) + 0.5 * math.log(0.5)), abs=1e-12)
    one = task.answer_metrics(prompts[:3], ["24"] * 3)     # a collapsed policy: one answer for all
    assert one == {"exact_rate": 0.0, "distinct_answers": 1, "answer_entropy": 0.0, "answer_mode_frac": 1.0}
    assert task.answer_metrics(prompts[:2], ["3", "7"])["answer_entropy"] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="responses"):
        task.answer_metrics([], [])


def test_warm_start_trains_on_whole_chains(monkeypatch):
    """The padula warm start is their SFT: the loss covers every token of a solved chain after the first
    ([BOS] and [EOS] included, pads excluded), not only the answer, and it lowers that loss; the reference
    is the warm-started policy afterwards."""
    from fastrlhf import passes, warm_start
    from fastrlhf.config import parse_args
    from fastrlhf.train import setup

    cfg = parse_args(["--recipe", "padula-arithmetic", "--sft_steps", "6", "--sft_batch_size", "16",
                      "--sft_learning_rate", "3e-3", "--eval_samples", "4"])
    run = setup(cfg)
    seen = []
    real_nll = passes.nll

    def recording_nll(model, ids, attn, start, target):
        seen.append((ids.clone(), attn.clone(), start, target.clone()))
        return real_nll(model, ids, attn, start, target)

    monkeypatch.setattr(warm_start, "nll", recording_nll)
    chains = padula.sft_batch(run.bundle.tokenizer, padula.sft_examples(random.Random(7), 32))
    ids, attn = chains["input_ids"], chains["attention_mask"]
    with torch.no_grad():
        before = real_nll(run.bundle.policy, ids, attn, 1, attn[:, 1:]).item()
    warm_start.warm_start(run)
    with torch.no_grad():
        after = real_nll(run.bundle.policy, ids, attn, 1, attn[:, 1:]).item()
    assert len(seen) == 6 and after < before - 0.5
    tok = run.bundle.tokenizer
    for ids_b, attn_b, start, target in seen:
        assert start == 1 and torch.equal(target, attn_b[:, 1:])
        for row, m in zip(ids_b.tolist(), attn_b.tolist()):
            kept = [t for t, k in zip(row, m) if k]
            assert kept[0] == tok.bos_token_id and kept[-1] == tok.eos_token_id
            text = tok.decode(kept[1:-1])
            assert solve_chain(text[:text.rindex("=") + 1]) == int(text.split()[-1])   # a solved chain
    with run.bundle.reference() as ref_model:
        for (k, p), q in zip(run.bundle.policy.state_dict().items(), ref_model.state_dict().values()):
            assert torch.equal(p, q), k
