"""fastrlhf.generate against Hugging Face generate / forward on tiny random models (left-padded prompts)."""
import warnings

import pytest
import torch

from fastrlhf.generation import generate

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
