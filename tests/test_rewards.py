import pytest
import torch

from fastrlhf.rewards import (RewardModel, arithmetic_reward, load_callable, make_reward, scores_tensor,
                              vader_reward)
from fastrlhf.tokenizer import CharTokenizer


def test_arithmetic_exact_and_partial_credit():
    prompts = ["3+4=", "9+9=", "9+9=", "5-8=", "2*3=", "1+1="]
    responses = ["7", "18\n", "17", "-3", "x6", ""]
    assert arithmetic_reward(prompts, responses) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    partial = arithmetic_reward(prompts, responses, partial_credit=True)
    assert partial[:2] == [1.0, 1.0]
    assert partial[2] == pytest.approx(0.5 * 1 / 2)        # "17" vs "18": one digit of two at its place
    assert partial[4] == 0.0 and partial[5] == 0.0
    assert arithmetic_reward(["9+9="], ["81"], partial_credit=True) == [0.0]
    assert all(p < 0.5 for p, e in zip(partial, arithmetic_reward(prompts, responses)) if e == 0)


def test_vader_orders_sentiment():
    pos, neg, neutral = vader_reward(["x"] * 3, ["I love it, wonderful and great!", "awful, I hate it",
                                                 "the table"])
    assert pos > 0.5 and neg < -0.5 and neutral == 0.0


def test_user_callable_from_file_and_module(tmp_path, monkeypatch):
    f = tmp_path / "my_reward.py"
    f.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    fn = load_callable(f"{f}:length")
    assert fn(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_reward("my_reward:length")(["a"], ["abc"]) == [3.0]


@pytest.mark.parametrize("spec,match", [("nope", "expected one of"), ("missing_file.py:f", "existing Python file"),
                                        ("fastrlhf_no_such_module:f", "cannot import"),
                                        ("fastrlhf.tasks:no_such_fn", "expected a function")])
def test_bad_reward_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        load_callable(spec)


def _tiny_reward_model(path, num_labels=2, id2label=None):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    labels = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=num_labels,
                      max_position_embeddings=64, **labels)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    return model


def test_reward_model_scores_last_token_logit(tmp_path):
    model = _tiny_reward_model(tmp_path / "rm")
    tok = CharTokenizer()
    rm = make_reward(None, reward_model=str(tmp_path / "rm"), reward_label=1, tokenizer=tok)
    assert isinstance(rm, RewardModel)
    prompts, responses = ["1+2=", "hello "], ["3", "world, long answer"]
    got = rm(prompts, responses)
    for p, r, g in zip(prompts, responses, got):   # one row at a time: no padding involved
        ids = torch.tensor([tok.encode(p + r)])
        with torch.no_grad():
            want = model(input_ids=ids).logits[0, 1].item()
        assert g == pytest.approx(want, abs=1e-4)


def test_reward_model_label_out_of_range(tmp_path):
    _tiny_reward_model(tmp_path / "rm")
    with pytest.raises(ValueError, match="reward_label"):
        RewardModel(tmp_path / "rm", label=2, fallback_tokenizer=CharTokenizer())


def test_scores_tensor_checks():
    assert scores_tensor([1, 2], 2, "cpu").dtype == torch.float32
    assert scores_tensor(torch.tensor([0.5, 1.5]), 2, "cpu").tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match="expected 3 finite scores .*got 1 scores"):
        scores_tensor([1.0], 3, "cpu")
    with pytest.raises(ValueError, match="finite"):
        scores_tensor([float("nan")], 1, "cpu")
    # what a broken reward function returns: each named, with the function's name
    for returned, what in ((["1.0", "2.0"], "str values"), ([None, 1.0], "NoneType values"), (0.5, "a float"),
                           ("12", "a str"), ([True, False], "bool values"), ([1.0, 2.0, 3.0], "3 scores"),
                           (torch.ones(2, 1), "shape")):
        with pytest.raises(ValueError, match=f"reward my.py:fn: expected 2 finite scores .*got .*{what}"):
            scores_tensor(returned, 2, "cpu", source="reward my.py:fn")


def _logit(model, tok, text, label):
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok.encode(text)])).logits[0, label].item()


@pytest.mark.parametrize("id2label,want", [({0: "NEGATIVE", 1: "POSITIVE"}, 1), ({0: "positive", 1: "negative"}, 0),
                                           ({0: "LABEL_0"}, 0)])
def test_reward_label_default(tmp_path, id2label, want):
    # distilbert-imdb's labels {0: NEGATIVE, 1: POSITIVE} (imdb_ppo.py scores output[1]); a one-logit RM: 0
    model = _tiny_reward_model(tmp_path / "rm", num_labels=len(id2label), id2label=id2label)
    tok = CharTokenizer()
    rm = make_reward(None, reward_model=str(tmp_path / "rm"), tokenizer=tok)
    assert rm.label == want
    assert rm(["good "], ["film"]) == [pytest.approx(_logit(model, tok, "good film", want), abs=1e-4)]


def test_reward_label_default_fails_naming_the_labels(tmp_path):
    _tiny_reward_model(tmp_path / "rm", num_labels=3, id2label={0: "anger", 1: "joy", 2: "fear"})
    with pytest.raises(ValueError, match=r"reward_label: .*3 labels .*'anger'.*'joy'.*'fear'.*POSITIVE"):
        make_reward(None, reward_model=str(tmp_path / "rm"), tokenizer=CharTokenizer())
    rm = make_reward(None, reward_model=str(tmp_path / "rm"), reward_label=1, tokenizer=CharTokenizer())
    assert rm.label == 1


def test_reward_input_for_reward_models_and_vader(tmp_path):
    model = _tiny_reward_model(tmp_path / "rm", id2label={0: "NEGATIVE", 1: "POSITIVE"})
    tok = CharTokenizer()
    prompts, responses = ["what a ", "I hated "], ["film", "it"]
    both = make_reward(None, reward_model=str(tmp_path / "rm"), tokenizer=tok)   # default: prompt + response
    alone = make_reward(None, reward_model=str(tmp_path / "rm"), tokenizer=tok, reward_input="response")
    for p, r, b, a in zip(prompts, responses, both(prompts, responses), alone(prompts, responses)):
        assert b == pytest.approx(_logit(model, tok, p + r, 1), abs=1e-4)
        assert a == pytest.approx(_logit(model, tok, r, 1), abs=1e-4)
    # VADER: a positive prompt with a neutral response scores > 0 only when the prompt is read
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    sia = SentimentIntensityAnalyzer()
    prompts, responses = ["I loved this wonderful movie, and"], [" the table is brown"]
    assert make_reward("vader")(prompts, responses) == [sia.polarity_scores(prompts[0] + responses[0])["compound"]]
    assert make_reward("vader", reward_input="response")(prompts, responses) == [0.0]
    assert make_reward("vader")(prompts, responses)[0] > 0.5
    with pytest.raises(ValueError, match="reward_input"):
        make_reward("vader", reward_input="prompt")
