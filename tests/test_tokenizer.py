"""CharTokenizer: round trip, special tokens, padding sides, save/load, load_tokenizer dispatch."""
import pytest
import torch

from fastrlhf.tokenizer import DEFAULT_CHARS, TOKENIZER_FILE, CharTokenizer, load_tokenizer


def test_vocab_covers_arithmetic_letters_punctuation():
    tok = CharTokenizer()
    for c in "0123456789+-*/= abcXYZ.,!?()'\"\n":
        assert c in DEFAULT_CHARS
    assert tok.vocab_size == len(tok) == 4 + len(DEFAULT_CHARS)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def test_round_trip_and_special_tokens():
    tok = CharTokenizer()
    text = "12+34=46. Hello, World!\n(x*y)/z - q"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.decode(ids[:3] + [tok.eos_token_id], skip_special_tokens=False) == "<bos>12<eos>"
    assert tok.decode(torch.tensor(ids)) == text
    # characters outside the alphabet become <unk>, dropped when skipping special tokens
    assert tok.encode("a€b", add_special_tokens=False)[1] == tok.unk_token_id
    assert tok.decode(tok.encode("a€b")) == "ab"
    with pytest.raises(ValueError, match="ids"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="text"):
        tok.encode(3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding(side):
    tok = CharTokenizer()
    texts = ["1+2=", "12+345=", ""]
    enc = tok(texts, padding_side=side, return_tensors="pt")
    ids, mask = enc.input_ids, enc["attention_mask"]
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == torch.long
    for b, t in enumerate(texts):
        row = tok.encode(t)
        n = len(row)
        real = slice(8 - n, 8) if side == "left" else slice(0, n)
        pad = slice(0, 8 - n) if side == "left" else slice(n, 8)
        assert ids[b, real].tolist() == row and mask[b, real].tolist() == [1] * n
        assert (ids[b, pad] == tok.pad_token_id).all() and (mask[b, pad] == 0).all()
    assert tok.batch_decode(ids) == texts
    assert enc.to("cpu")["input_ids"].equal(ids)


def test_call_default_left_and_lists():
    tok = CharTokenizer()
    enc = tok(["ab", "a"])
    assert enc.input_ids[1].tolist() == [tok.pad_token_id, tok.bos_token_id, tok.encode("a")[1]]
    lists = tok(["ab", "a"], return_tensors=None, padding=False)
    assert lists["input_ids"] == [tok.encode("ab"), tok.encode("a")]
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="padding"):
        tok(["ab", "a"], padding=False)


def test_save_and_load(tmp_path):
    tok = CharTokenizer(chars="0123456789+=", padding_side="right")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / TOKENIZER_FILE).is_file()
    back = load_tokenizer(str(tmp_path))
    assert isinstance(back, CharTokenizer)
    assert back.chars == tok.chars and back.padding_side == "right" and back.vocab_size == 16
    assert back.encode("12+3=15") == tok.encode("12+3=15")
    assert isinstance(load_tokenizer(None), CharTokenizer)
