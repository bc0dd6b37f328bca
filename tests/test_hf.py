"""fastrlhf.hf on tiny random Hugging Face models: the fused loss from (hidden_states, output_layer)
equals the one computed from model(...).logits, in value and in every parameter's gradient."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastrlhf import ops  # noqa: E402
from fastrlhf.fused_linear import fused_linear_logprobs, fused_linear_policy_loss  # noqa: E402
from fastrlhf.hf import hidden_states, logit_scale, output_layer  # noqa: E402

VOCAB, B, T = 61, 2, 9
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)


def llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def qwen2_tied():
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True))


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def cohere():
    return CohereForCausalLM(CohereConfig(**SMALL, logit_scale=0.37))


def batch():
    ids = torch.randint(0, VOCAB, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0                                                     # right padding
    labels, mask = ids[:, 1:], attn[:, 1:].float()
    adv = torch.randn(B, T - 1)
    old = -torch.rand(B, T - 1) * 3 - 2
    rf = -torch.rand(B, T - 1) * 3 - 2
    return ids, attn, labels, mask, adv, old, rf


KNOBS = dict(algo="ppo", entropy_coef=0.01, kl_coef=0.05, batch_entropy_coef=0.1, temperature=0.9)


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def compare(model):
    model.eval()
    ids, attn, labels, mask, adv, old, rf = batch()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    loss_ref, out_ref = ops.policy_loss_from_logits(logits, labels, mask, adv, old, rf, **KNOBS)
    g_ref = grads(model, loss_ref)

    hidden = hidden_states(model, ids, attn)[:, :-1]
    weight, bias = output_layer(model)
    assert torch.allclose(hidden @ weight.T + (0 if bias is None else bias), logits, atol=1e-5)
    loss, out = fused_linear_policy_loss(hidden, weight, labels, mask, adv, old, rf, bias=bias, chunk_size=5,
                                         **KNOBS)
    g = grads(model, loss)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * max(1.0, abs(loss_ref.item()))
    assert torch.allclose(out["logprobs"], out_ref["logprobs"], atol=1e-5)
    assert len(g) == len(g_ref) > 0
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-4), (a - r).abs().max()

    with torch.no_grad():                                                # old/ref log-probs: one pass
        lp = fused_linear_logprobs(hidden_states(model, ids, attn)[:, :-1], weight, labels, bias=bias,
                                   temperature=KNOBS["temperature"])
    assert torch.allclose(lp * mask, out_ref["logprobs"] * mask, atol=1e-5)


@pytest.mark.parametrize("make", [llama, qwen2_tied, gpt2, cohere], ids=["llama", "qwen2-tied", "gpt2", "cohere"])
def test_fused_loss_equals_logits_loss(make):
    compare(make())


def test_tied_models_return_the_embedding():
    for make in (qwen2_tied, gpt2):
        model = make()
        assert output_layer(model)[0] is model.get_input_embeddings().weight


def test_peft_lora_wrapper():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    for name, p in model.named_parameters():                           # LoRA B starts at 0: make it count
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert output_layer(model)[0] is model.get_base_model().lm_head.weight
    compare(model)


def test_logit_transforms():
    assert logit_scale(llama()) == 1.0
    assert logit_scale(cohere()) == pytest.approx(0.37)
    gemma = Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hidden_states(gemma, torch.zeros(1, 3, dtype=torch.long))
    model = llama()
    model.config.logits_scaling = 2.0                                  # a field we do not know for llama
    with pytest.raises(ValueError, match="config.logits_scaling"):
        logit_scale(model)


def test_lora_on_lm_head_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="output layer"):
        output_layer(model)


def test_not_a_model():
    with pytest.raises(TypeError, match="model: expected a transformers causal LM"):
        output_layer(torch.nn.Linear(3, 4))
