"""fastrlhf.generate against Hugging Face generate / forward on tiny random models (left-padded prompts)."""
import warnings

import pytest
import torch

from fastrlhf.generation import (check_inputs, decode_n_tokens, decode_one_token, draw_lengths, generate, prefill,
                                 stop_index, strip_stop)

transformers = pytest.importorskip("transformers")

VOCAB = 97


def _model(kind):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(cfg)
    return model.eval()


def _prompts(batch=3, length=7, pads=(3, 1, 0)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _hf_greedy(model, ids, mask, n, eos):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=0,
                          eos_token_id=eos)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_hf(kind):
    model = _model(kind)
    ids, mask = _prompts()
    out = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, pad_token_id=0)
    ref = _hf_greedy(model, ids, mask, 10, None)
    assert torch.equal(out.sequences, ref)
    assert out.response_mask.shape == (3, 10) and bool(out.response_mask.all())
    # top_k == 1 is greedy too
    out_k1 = generate(model, ids, mask, max_new_tokens=10, top_k=1, pad_token_id=0)
    assert torch.equal(out_k1.sequences, ref)


def test_eos_stops_rows_and_matches_hf():
    model = _model("llama")
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, pad_token_id=0)
    eos = int(free.sequences[0, 7 + 3])  # row 0 draws it at step 3 (and maybe other rows elsewhere)
    out = generate(model, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    ref = _hf_greedy(model, ids, mask, 10, eos)
    assert torch.equal(out.sequences, ref)
    resp = out.sequences[:, 7:]
    for row in range(3):
        hits = (resp[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else resp.shape[1]
        assert out.response_mask[row, :stop].all() and not out.response_mask[row, stop:].any()
        assert (resp[row, stop:] == 0).all()
        assert (out.logprobs[row, stop:] == 0).all() and (out.logprobs[row, :stop] < 0).all()


def test_early_exit_when_all_rows_done():
    model = _model("qwen2")
    ids, mask = _prompts()
    free = generate(model, ids, mask, max_new_tokens=4, temperature=0.0, pad_token_id=0)
    eos = free.sequences[:, 7:].flatten().tolist()  # every row hits one of these within 4 steps
    out = generate(model, ids, mask, max_new_tokens=40, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    n = out.response_mask.shape[1]
    assert n <= 4 and out.sequences.shape == (3, 7 + n) and out.logprobs.shape == (3, n)
    assert int(out.response_mask.sum(-1).max()) == n


def _full_forward_logprobs(model, seq, prompt_mask, response_mask, temperature):
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(seq, attention_mask=mask, position_ids=pos).logits.double()
    P = prompt_mask.shape[1]
    logp = torch.log_softmax(logits[:, P - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, seq[:, P:, None]).squeeze(-1) * response_mask


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampled_logprobs_match_model(kind):
    model = _model(kind)
    ids, mask = _prompts()
    g = torch.Generator().manual_seed(3)
    out = generate(model, ids, mask, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=5,
                   pad_token_id=0, generator=g)
    want = _full_forward_logprobs(model, out.sequences, mask, out.response_mask, 0.7)
    torch.testing.assert_close(out.logprobs.double(), want, atol=1e-4, rtol=1e-4)
    again = generate(model, ids, mask, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, eos_token_id=5,
                     pad_token_id=0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.sequences, again.sequences)


def test_peft_wrapped_greedy_matches_hf():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).eval()
    ids, mask = _prompts()
    out = generate(lora, ids, mask, max_new_tokens=6, temperature=0.0, pad_token_id=0)
    ref = lora.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_4bit_lora_model_greedy_matches_hf(tmp_path, arch):
    """A bitsandbytes nf4 base with a LoRA adapter, loaded as the trainer loads it (fastrlhf.models.load)."""
    pytest.importorskip("bitsandbytes")
    from fastrlhf.models import ModelConfig, load
    from test_models import save_tiny

    path, _ = save_tiny(tmp_path, arch)
    policy = load(ModelConfig(model_name_or_path=path, use_peft=True, lora_r=4, load_in_4bit=True), "cpu").policy
    assert any(type(m).__name__ == "Linear4bit" for m in policy.modules())
    policy.eval()
    ids, mask = _prompts()
    ids = ids % policy.config.vocab_size
    out = generate(policy, ids, mask, max_new_tokens=6, temperature=0.0, pad_token_id=0)
    want = policy.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(out.sequences, want)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fallback_without_static_cache_matches_hf(kind, monkeypatch):
    import fastrlhf.generation as generation

    def no_static_cache(*args, **kwargs):
        raise TypeError("StaticCache not supported here")

    monkeypatch.setattr(generation, "_static_cache", no_static_cache)
    model = _model(kind)
    ids, mask = _prompts()
    with pytest.warns(RuntimeWarning, match="static KV cache unavailable"):
        out = generate(model, ids, mask, max_new_tokens=8, temperature=0.0, pad_token_id=0)
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 8, None))


def test_bad_inputs():
    model = _model("llama")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, mask[:, :-1], max_new_tokens=2)
    right = mask.flip(-1)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, right, max_new_tokens=2)


def test_check_inputs_defaults_and_eos_ids():
    model = _model("llama")
    ids, mask = _prompts()
    got, eos, pad = check_inputs(model, ids, mask.bool(), 4, [7, 9], None)
    assert got.dtype == torch.long and torch.equal(got, mask)
    assert eos.tolist() == [7, 9] and pad == 7                        # pad defaults to the first EOS id
    got, eos, pad = check_inputs(model, ids, None, 4, None, None)
    assert torch.equal(got, torch.ones_like(ids)) and eos is None and pad == 0
    assert check_inputs(model, ids, mask, 4, 7, 3)[2] == 3                  # an explicit pad_token_id wins
    with pytest.raises(ValueError, match="input_ids"):
        check_inputs(model, ids[0], None, 4, None, None)
    for bad in ([], [1.5], "2"):
        with pytest.raises(ValueError, match="eos_token_id"):
            check_inputs(model, ids, mask, 4, bad, None)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_prefill_static_cache_logits_match_full_forward(kind):
    """prefill takes the static cache (no silent fallback, which generate's outputs would not show) and its
    logits and the decoder's first step equal a full forward (position ids: index among valid tokens)."""
    import fastrlhf.generation as generation

    model = _model(kind)
    ids, mask = _prompts()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        logits, decoder = prefill(model, ids, mask, 3)
        nxt = logits.argmax(-1)
        step1 = decoder(nxt, 0)
        seq, full = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = (full.cumsum(-1) - 1).clamp_min(0)
        want = model(seq, attention_mask=full, position_ids=pos).logits
    assert isinstance(decoder, generation._StaticDecoder)
    torch.testing.assert_close(logits, want[:, -2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step1, want[:, -1], atol=1e-5, rtol=1e-5)


def test_fallback_warning_names_the_caller(monkeypatch):
    import fastrlhf.generation as generation

    def no_static_cache(*args, **kwargs):
        raise TypeError("StaticCache not supported here")

    monkeypatch.setattr(generation, "_static_cache", no_static_cache)
    ids, mask = _prompts()
    with pytest.warns(RuntimeWarning, match="static KV cache unavailable") as records:
        generate(_model("llama"), ids, mask, max_new_tokens=2, temperature=0.0)
    assert [r.filename for r in records if "static KV cache" in str(r.message)] == [__file__]


def _peaked(ids, vocab=16):
    """ids [B] -> logits [B, vocab] whose greedy draw is ids, log-prob 5 - log(e^5 + vocab - 1)."""
    return torch.nn.functional.one_hot(ids, vocab).float() * 5.0


PEAK_LOGPROB = 5.0 - torch.log(torch.tensor(5.0).exp() + 15).item()


def test_decode_one_token_pads_done_rows_and_flags_any_eos_id():
    logits = _peaked(torch.tensor([5, 6, 6, 9]))
    done = torch.tensor([False, True, False, False])
    tok, lp, new_done = decode_one_token(logits, done, eos=torch.tensor([5, 6]), pad_token_id=0, temperature=0.0)
    assert tok.tolist() == [5, 0, 6, 9]                              # the EOS itself is emitted, with its log-prob
    torch.testing.assert_close(lp, torch.tensor([PEAK_LOGPROB, 0.0, PEAK_LOGPROB, PEAK_LOGPROB]))
    assert new_done.tolist() == [True, True, True, False]
    assert done.tolist() == [False, True, False, False]              # the caller's flags are not modified
    tok, _, same = decode_one_token(logits, torch.zeros(4, dtype=torch.bool), eos=None, pad_token_id=0,
                                    temperature=0.0)
    assert tok.tolist() == [5, 6, 6, 9] and not same.any()


class _Scripted:
    """A decoder whose greedy draw at step t is script[:, t]; records (step, tokens fed) per call."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, tokens, step):
        self.calls.append((step, tokens.tolist()))
        return _peaked(self.script[:, step + 1])


@pytest.mark.parametrize("eos_steps,max_new,n", [
    ((0, 2, 5), 40, 16),     # all done at step 5: stops at the first check (step 15), not at 5
    ((0, 2, 20), 40, 32),    # all done at step 20: the next check is step 31
    ((0, 2, 5), 10, 10),     # no check before max_new_tokens: runs to the end
    ((0, 2, 5), 16, 16),     # the check at the last step does not cut anything
    ((0, 2, 50), 40, 40),    # row 2 never stops
])
def test_decode_n_tokens_stops_at_check_boundary_and_pads_after_eos(eos_steps, max_new, n):
    EOS, PAD = 2, 0
    script = torch.full((3, max_new + 1), 7)
    for row, s in enumerate(eos_steps):
        if s < max_new:
            script[row, s] = EOS
    decoder = _Scripted(script)
    tokens, logprobs, live = decode_n_tokens(decoder, _peaked(script[:, 0]), max_new, eos=torch.tensor([EOS]),
                                             pad_token_id=PAD, temperature=0.0)
    assert tokens.shape == logprobs.shape == live.shape == (3, n)
    t = torch.arange(n)
    want_live = torch.stack([t <= s for s in eos_steps])
    assert torch.equal(live, want_live)
    assert torch.equal(tokens, torch.where(want_live, script[:, :n], PAD))
    torch.testing.assert_close(logprobs, torch.where(want_live, PEAK_LOGPROB, 0.0))
    # the decoder saw steps 0 .. n-2, each with the tokens emitted at that step (pad for finished rows)
    assert decoder.calls == [(step, tokens[:, step].tolist()) for step in range(n - 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cuda_graph_greedy_matches_hf(kind):
    model = _model(kind).cuda()
    ids, mask = (t.cuda() for t in _prompts())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        out = generate(model, ids, mask, max_new_tokens=20, temperature=0.0, pad_token_id=0)
    ref = _hf_greedy(model, ids, mask, 20, None)
    assert not [str(r.message) for r in records if "CUDA graph" in str(r.message)]
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("static", [True, False])
def test_no_deprecated_cache_argument(static, monkeypatch):
    """transformers 5.2x renamed the forward's `past_key_values` to `cache` and warns on the old name at
    every call (three FutureWarnings per `fastrlhf train`): generate passes whichever name the model takes."""
    import fastrlhf.generation as generation

    if not static:
        monkeypatch.setattr(generation, "_static_cache", lambda *a, **k: (_ for _ in ()).throw(TypeError("no")))
    model = _model("llama")
    ids, mask = _prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, pad_token_id=0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert torch.equal(out.sequences, _hf_greedy(model, ids, mask, 6, None))


# ---------------------------------------------------------------------------------------------------
# response endings: stop strings, per-row length limits (fastrlhf.generation module docstring)
# ---------------------------------------------------------------------------------------------------

class _TwoCharTokenizer:
    """Token id i decodes to two characters, so a stop string can straddle two tokens; id 0 (the pad) is
    special and skipped."""

    @staticmethod
    def piece(i):
        return chr(65 + i % 26) + chr(97 + (i // 26) % 26)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.piece(i) for i in ids if not (skip_special_tokens and i == 0))


def _first_stop_token(text_of_row, stop):
    """The token index that completes the earliest stop string, from the character offsets (2 per token)."""
    hits = [text_of_row.find(s) + len(s) - 1 for s in stop if s in text_of_row]
    return min(hits) // 2 if hits else None


@pytest.mark.parametrize("max_new", [10, 40])  # 40: the rows end before the host check at step 16 (early exit)
def test_stop_string_ends_the_mask_and_keeps_the_stream(max_new):
    model, tok = _model("llama"), _TwoCharTokenizer()
    ids, mask = _prompts()
    g = lambda: torch.Generator().manual_seed(5)   # noqa: E731
    free = generate(model, ids, mask, max_new_tokens=max_new, pad_token_id=0, generator=g())
    resp = free.sequences[:, 7:].tolist()
    texts = [tok.decode(r) for r in resp]
    # row 0: a stop made of the 2nd character of token 2 and the 1st of token 3 (straddles); row 1: token 1's
    # text; row 2: token 4's (with max_new 10 row 2 gets none of its own, and may still hold one of these)
    stop = [texts[0][5:7], texts[1][2:4]] + ([texts[2][8:10]] if max_new == 40 else [])
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    out = generate(model, ids, mask, max_new_tokens=max_new, pad_token_id=0, generator=g(), stop=stop, tokenizer=tok)
    hook.remove()
    ends = [_first_stop_token(t, stop) for t in texts]
    assert ends[0] <= 3 and ends[1] <= 1
    n = max(max_new if e is None else e + 1 for e in ends)
    assert out.response_mask.shape == (3, n)
    if max_new == 40:   # every row stopped by step 4: the loop ends at the first host check (step 15), not at 40
        assert len(forwards) == 16   # the prompt forward + 15 decode steps
    for b, e in enumerate(ends):
        k = max_new if e is None else e + 1
        assert out.response_mask[b, :k].all() and not out.response_mask[b, k:].any()
        # the same tokens and log-probs as without stop strings up to the stop, pads and 0 after
        assert out.sequences[b, 7:7 + k].tolist() == resp[b][:k] and (out.sequences[b, 7 + k:] == 0).all()
        assert torch.equal(out.logprobs[b, :k], free.logprobs[b, :k]) and (out.logprobs[b, k:] == 0).all()


def test_stop_index_and_strip_stop():
    tok = _TwoCharTokenizer()
    ids = [1, 2, 3, 4]   # "BaCaDaEa"
    assert stop_index(tok, ids, ["aC"]) == 1 and stop_index(tok, ids, ["Ea"]) == 3
    assert stop_index(tok, ids, ["Ea", "Ca"]) == 1 and stop_index(tok, ids, ["x"]) is None
    assert stop_index(tok, [], ["a"]) is None
    assert strip_stop("Sure. Human: hi", ["Human:"]) == "Sure."
    assert strip_stop("a Assistant: b Human: c", ["Human:", "Assistant:"]) == "a"   # the earliest one
    assert strip_stop("no stop here ", ["Human:"]) == "no stop here "
    with pytest.raises(ValueError, match="tokenizer"):
        generate(_model("llama"), *_prompts(), max_new_tokens=2, stop="x")
    with pytest.raises(ValueError, match="stop"):
        generate(_model("llama"), *_prompts(), max_new_tokens=2, stop=[""], tokenizer=tok)


def test_draw_lengths_uniform_in_range():
    import random
    lengths = draw_lengths(2000, 4, 16, random.Random(0))
    assert min(lengths) == 4 and max(lengths) == 16     # both ends included
    counts = [lengths.count(k) for k in range(4, 17)]
    assert all(abs(c - 2000 / 13) < 60 for c in counts)  # ~154 each; 60 is > 4 sd of a binomial count
    assert draw_lengths(5, 3, 3, random.Random(1)) == [3] * 5
    for bad in (0, 17):
        with pytest.raises(ValueError, match="min_new_tokens"):
            draw_lengths(1, bad, 16, random.Random(0))


def test_response_lengths_end_rows_and_eos_still_ends():
    model = _model("llama")
    ids, mask = _prompts()
    g = lambda: torch.Generator().manual_seed(7)   # noqa: E731
    free = generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, generator=g())
    out = generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, generator=g(), response_lengths=[3, 12, 6])
    assert out.response_mask.sum(1).tolist() == [3, 12, 6] and out.response_mask.shape == (3, 12)
    for b, k in enumerate([3, 12, 6]):
        assert out.sequences[b, 7:7 + k].tolist() == free.sequences[b, 7:7 + k].tolist()
        assert (out.sequences[b, 7 + k:] == 0).all() and (out.logprobs[b, k:] == 0).all()
    short = generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, generator=g(), response_lengths=[2, 5, 3])
    assert short.response_mask.shape == (3, 5)     # n = the longest limit drawn
    # EOS before the limit still ends the row: row 0's 3rd token as EOS, limit 8
    eos = int(free.sequences[0, 7 + 2])
    out = generate(model, ids, mask, max_new_tokens=12, pad_token_id=0, generator=g(), eos_token_id=eos,
                   response_lengths=[8, 8, 8])
    first_eos = (free.sequences[0, 7:] == eos).nonzero()[0].item()
    assert first_eos <= 2 and out.response_mask[0].sum().item() == first_eos + 1
    with pytest.raises(ValueError, match="response_lengths"):
        generate(model, ids, mask, max_new_tokens=12, response_lengths=[3, 13, 1])
    with pytest.raises(ValueError, match="response_lengths"):
        generate(model, ids, mask, max_new_tokens=12, response_lengths=[3, 4])


def test_trainer_draws_a_length_per_prompt_and_cuts_stop_strings(tmp_path):
    import random

    from fastrlhf import config, train
    tiny = ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_num_heads", "2",
            "--tiny_intermediate_size", "64", "--sft_steps", "0", "--output_dir", str(tmp_path)]
    run = train.setup(config.parse_args([*tiny, "--per_device_batch_size", "16", "--min_new_tokens", "2",
                                         "--max_new_tokens", "9"]))
    prompts = run.job.task.sample(16, run.streams.data)
    copy = random.Random()
    copy.setstate(run.streams.data.getstate())
    roll = train.rollout(run, prompts)
    want = draw_lengths(16, 2, 9, copy)           # the rollout's draw: the data stream, after the prompts
    assert len(set(want)) > 1
    eos = run.bundle.tokenizer.eos_token_id
    for b, k in enumerate(roll.mask.sum(1).tolist()):
        row = roll.labels[b].tolist()
        ended = eos in row[:k]
        assert k == want[b] or (ended and row.index(eos) == k - 1 and k < want[b])
        assert roll.mask[b, :k].all() and not roll.mask[b, k:].any()   # right padded
    # --stop: the text the reward sees ends before the stop string
    run = train.setup(config.parse_args([*tiny, "--per_device_batch_size", "8", "--max_new_tokens", "6"]))
    free = train.sample(run, prompts[:8], generator=torch.Generator().manual_seed(0))[4]
    stop = next(t[1:3] for t in free if len(t) >= 3)
    run = train.setup(config.parse_args([*tiny, "--per_device_batch_size", "8", "--max_new_tokens", "6",
                                         "--stop", stop]))
    cut = train.sample(run, prompts[:8], generator=torch.Generator().manual_seed(0))[4]
    assert cut == [strip_stop(t, [stop]) for t in free] and cut != free
