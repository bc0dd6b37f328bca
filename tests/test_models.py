"""fastrlhf.models: the tiny default model, LoRA / 4-bit / 8-bit loading, the disabled-adapter reference
(KL exactly 0 before the first update), value head on the policy trunk vs a separate critic, the critic's
position ids against generation's and the scoring pass's, bad option combinations failing before any
weight is loaded, other architectures loaded by path (no downloads)."""
import pytest
import torch
from torch import nn

from fastrlhf import config, models
from fastrlhf.models import ModelConfig, critic_hidden_states, load, values
from fastrlhf.optim import make_optimizer
from fastrlhf.tokenizer import CharTokenizer

PROMPTS = ["12+34=", "7*8=", "hello"]


def seq_logprobs(model, enc):
    """log p(token_t | tokens_<t) for t >= 1, [B, T-1], in float64."""
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.double()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None]).squeeze(-1)


def lora_names(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_tiny(tmp_path, arch, hidden=64, vocab=None):
    """A tiny random checkpoint of the given architecture + a CharTokenizer, saved to tmp_path."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    tok = CharTokenizer()
    vocab = vocab or tok.vocab_size
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=128))
    path = tmp_path / arch
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model


def test_default_model_full_finetune_has_frozen_reference():
    b = load(ModelConfig(), "cpu")
    assert isinstance(b.tokenizer, CharTokenizer) and b.dtype == torch.float32
    assert b.policy.config.vocab_size == b.tokenizer.vocab_size
    assert b.policy.config.hidden_size == 128 and b.policy.config.num_hidden_layers == 4
    enc = b.tokenizer(PROMPTS)
    with torch.no_grad(), b.reference() as ref:
        assert ref is not b.policy and not any(p.requires_grad for p in ref.parameters())
        assert torch.equal(seq_logprobs(ref, enc), seq_logprobs(b.policy, enc))
    n_policy = sum(1 for _ in b.policy.parameters())
    assert len(b.trainable_parameters()) == n_policy + 2  # + value head weight and bias
    # the tiny model is seeded: a second load has the same weights
    again = load(ModelConfig(), "cpu")
    for (n, p), (_, q) in zip(b.policy.named_parameters(), again.policy.named_parameters()):
        assert torch.equal(p, q), n


def test_builtin_padula_gpt2_has_the_word_tokenizer_vocab():
    """builtin_model padula-gpt2-cpu: Padula & Soemers' GPT-2 (fastrlhf.padula.gpt2_config, "cpu") with the
    WordTokenizer, vocab len(tokenizer) + 3, seeded by tiny_seed, dropout 0 (their PPO runs in eval mode)."""
    from transformers import GPT2LMHeadModel

    from fastrlhf.tokenizer import WordTokenizer

    b = load(ModelConfig(builtin_model="padula-gpt2-cpu"), "cpu")
    assert isinstance(b.tokenizer, WordTokenizer) and isinstance(b.policy, GPT2LMHeadModel)
    c = b.policy.config
    assert c.vocab_size == len(b.tokenizer) + 3 == 109 and (c.n_embd, c.n_layer, c.n_positions) == (128, 2, 64)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (103, 104, 105) and c.resid_pdrop == 0.0
    assert sum(p.numel() for p in b.policy.parameters()) == 418_944
    enc = b.tokenizer(["3 + 10 + 7 = 13 + 7 ="])
    with torch.no_grad(), b.reference() as ref:
        assert torch.equal(seq_logprobs(ref, enc), seq_logprobs(b.policy, enc))
    again = load(ModelConfig(builtin_model="padula-gpt2-cpu"), "cpu")
    assert all(torch.equal(p, q) for p, q in zip(b.policy.parameters(), again.policy.parameters()))
    other = load(ModelConfig(builtin_model="padula-gpt2-cpu", tiny_seed=1), "cpu")
    assert not torch.equal(b.policy.transformer.wte.weight, other.policy.transformer.wte.weight)
    with pytest.raises(ValueError, match="builtin_model: expected one of"):
        load(ModelConfig(builtin_model="gpt2"), "cpu")


@pytest.mark.parametrize("quant", [None, "4bit", "8bit"])
def test_lora_reference_kl_zero_then_moves(quant):
    cfg = ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, load_in_4bit=quant == "4bit",
                      load_in_8bit=quant == "8bit", tiny_num_layers=2)
    b = load(cfg, "cpu")
    base = b.policy.get_base_model()
    kinds = {type(base.model.layers[0].mlp.down_proj.base_layer).__name__}
    assert kinds == {{None: "Linear", "4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quant]}
    trainable = lora_names(b.policy)
    assert trainable and all("lora_" in n for n in trainable)
    # all-linear: every projection of every layer, not the output layer
    assert sum(".lora_A." in n for n in trainable) == 7 * cfg.tiny_num_layers
    assert not any("lm_head" in n for n in trainable)

    enc = b.tokenizer(PROMPTS)
    mask = enc["attention_mask"][:, 1:].bool()
    b.policy.eval()  # log-probs for rollouts are taken in eval mode (bitsandbytes' paths differ by mode)
    with torch.no_grad():
        pol0 = seq_logprobs(b.policy, enc)
        with b.reference() as ref:
            assert ref is b.policy
            ref0 = seq_logprobs(ref, enc)
    kl0 = (pol0 - ref0)[mask]
    assert torch.equal(kl0, torch.zeros_like(kl0))  # exactly 0 before the first update

    opt = make_optimizer(b.trainable_parameters(), "adamw_torch", lr=1e-2)
    b.policy.train()
    (-seq_logprobs(b.policy, enc)[mask].mean()).backward()
    assert all(p.grad is not None for n, p in b.policy.named_parameters() if "lora_B" in n)
    opt.step()
    b.policy.eval()
    with torch.no_grad():
        pol1 = seq_logprobs(b.policy, enc)
        with b.reference() as ref:
            ref1 = seq_logprobs(ref, enc)
    assert torch.equal(ref1, ref0)  # the reference (adapter disabled) did not move
    assert (pol1 - ref1)[mask].abs().max() > 1e-4  # the policy did


def test_adapter_checkpoint_resumes_exactly(tmp_path):
    """An adapter-only checkpoint (peft state dict + value head) restored into a fresh load of the same
    config (4-bit tiny base: seeded, so identical) gives the same policy and the same reference."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    cfg = ModelConfig(use_peft=True, lora_r=4, load_in_4bit=True, tiny_num_layers=2)
    a = load(cfg, "cpu")
    enc = a.tokenizer(PROMPTS)
    opt = make_optimizer(a.trainable_parameters(), "adamw_torch", lr=1e-2)
    a.policy.train()
    out = a.policy(**enc, output_hidden_states=True)
    (out.logits.logsumexp(-1).mean() + values(a, out.hidden_states[-1]).square().mean()).backward()
    opt.step()
    torch.save({"adapter": get_peft_model_state_dict(a.policy), "value_head": a.value_head.state_dict()},
               tmp_path / "state.pt")

    b = load(cfg, "cpu")
    state = torch.load(tmp_path / "state.pt")
    set_peft_model_state_dict(b.policy, state["adapter"])
    b.value_head.load_state_dict(state["value_head"])
    for bundle in (a, b):
        bundle.policy.eval()
    with torch.no_grad():
        assert torch.equal(seq_logprobs(a.policy, enc), seq_logprobs(b.policy, enc))
        with a.reference() as ra, b.reference() as rb:
            assert torch.equal(seq_logprobs(ra, enc), seq_logprobs(rb, enc))
    assert torch.equal(a.value_head.weight, b.value_head.weight)


def test_value_head_on_shared_trunk():
    b = load(ModelConfig(use_peft=True, lora_r=4, tiny_num_layers=2), "cpu")
    assert b.critic is None and b.value_head.in_features == b.policy.config.hidden_size
    enc = b.tokenizer(PROMPTS)
    out = b.policy(**enc, output_hidden_states=True)
    v = values(b, out.hidden_states[-1])
    assert v.shape == enc["input_ids"].shape and v.dtype == torch.float32
    assert torch.equal(v, torch.zeros_like(v))  # zero-initialized head
    b.value_head.weight.data.normal_()
    values(b, b.policy(**enc, output_hidden_states=True).hidden_states[-1]).square().mean().backward()
    # the value loss reaches the shared trunk's LoRA weights and the head
    assert b.value_head.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in b.policy.named_parameters() if "lora_B" in n)
    with pytest.raises(ValueError, match="hidden_states"):
        values(b, torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="critic"):
        critic_hidden_states(b, enc["input_ids"], enc["attention_mask"])


def test_reward_model_as_critic_starts_at_its_scores(tmp_path):
    """A one-label sequence classifier as critic: its trunk, and the value head initialized from its score
    layer, so the value at the last token equals the reward model's score."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=1,
                                                    pad_token_id=0)).eval()
    rm.save_pretrained(tmp_path / "rm")
    b = load(ModelConfig(tiny_num_layers=2, critic_model_name_or_path=str(tmp_path / "rm")), "cpu")
    assert torch.equal(b.value_head.weight, rm.score.weight)
    enc = b.tokenizer(["12+34=46", "7*8=56!!"])  # same length: no padding
    with torch.no_grad():
        v = values(b, critic_hidden_states(b, enc["input_ids"], enc["attention_mask"]))
        want = rm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(v[:, -1], want, rtol=1e-5, atol=1e-5)
    assert models.reward_head(str(tmp_path / "rm"), 32) is None  # wrong width: no head


def test_separate_critic(tmp_path):
    critic_path, _ = save_tiny(tmp_path, "llama", hidden=64)
    b = load(ModelConfig(use_peft=True, lora_r=4, tiny_num_layers=2, critic_model_name_or_path=critic_path), "cpu")
    assert b.critic is not None and b.critic.get_base_model().get_output_embeddings() is None  # trunk only
    assert b.value_head.in_features == 64
    assert torch.equal(b.value_head.weight, torch.zeros_like(b.value_head.weight))  # a causal LM: no score head
    enc = b.tokenizer(PROMPTS)
    b.value_head.weight.data.normal_()
    v = values(b, critic_hidden_states(b, enc["input_ids"], enc["attention_mask"]))
    assert v.shape == enc["input_ids"].shape
    v.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in b.critic.named_parameters())
    assert all(p.grad is None for p in b.policy.parameters())  # the policy is not the critic
    ids = {id(p) for p in b.trainable_parameters()}
    assert all(id(p) in ids for p in b.critic.parameters() if p.requires_grad)



def test_critic_scoring_and_generation_give_a_token_the_same_position_id(tmp_path):
    """On a left-padded batch, generation, the policy's scoring pass (passes.sequence_hidden_states) and the critic
    pass each valid token its index among its row's valid tokens (README, "Sequence layout"), and the
    critic's ids are fastrlhf.sequences.position_ids exactly (1 on padding, as generation has it). Hidden
    states alone cannot show this: fully masked padded positions come out the same whatever their id."""
    from fastrlhf import passes, sequences
    from fastrlhf.generation import generate

    critic_path, _ = save_tiny(tmp_path, "llama", hidden=64)
    b = load(ModelConfig(tiny_num_layers=2, critic_model_name_or_path=critic_path), "cpu")
    prompt, prompt_mask = sequences.pad_rows([b.tokenizer.encode(p) for p in PROMPTS], b.tokenizer.pad_token_id,
                                             side="left")
    assert not prompt_mask.all()  # some rows are padded
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())  # the decoder updates its position buffer in place

    with torch.no_grad():
        with b.policy.model.register_forward_pre_hook(record, with_kwargs=True):
            gen = generate(b.policy, prompt, prompt_mask, max_new_tokens=3)
            generation = torch.cat(seen, dim=1)  # [B, P] prefill, then [B, 1] per fed token
            seen.clear()
            mask = torch.cat([prompt_mask, gen.response_mask], dim=1)
            passes.sequence_hidden_states(b.policy, gen.sequences, mask)
            scoring = seen.pop()
        with b.critic.register_forward_pre_hook(record, with_kwargs=True):
            critic_hidden_states(b, gen.sequences, mask)
            critic = seen.pop()
    want = sequences.position_ids(mask)
    assert torch.equal(critic, want)
    valid = mask.bool()
    fed = generation.shape[1]  # the last sampled token is never fed back
    assert torch.equal(generation[valid[:, :fed]], want[:, :fed][valid[:, :fed]])
    assert torch.equal(scoring[valid], want[valid])

@pytest.mark.parametrize("arch,targets", [("qwen2", "q_proj,v_proj"), ("gpt2", "all-linear"), ("gpt2", ["c_attn"])])
def test_other_architectures_by_path_4bit_lora(tmp_path, arch, targets):
    path, original = save_tiny(tmp_path, arch)
    cfg = ModelConfig(model_name_or_path=path, use_peft=True, lora_r=4, lora_target_modules=targets,
                      load_in_4bit=True, gradient_checkpointing=True)
    b = load(cfg, "cpu")
    assert isinstance(b.tokenizer, CharTokenizer)
    assert b.policy.get_base_model().is_gradient_checkpointing
    names = lora_names(b.policy)
    want = {"q_proj,v_proj": ("q_proj", "v_proj"), "all-linear": ("c_attn", "c_proj", "c_fc"),
            }.get(targets if isinstance(targets, str) else "", tuple(targets))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == set(want)
    enc = b.tokenizer(PROMPTS)
    # an eval-mode no-grad forward first (a rollout), then training: bitsandbytes must not keep an
    # inference-only weight layout (regression: in-place error on biased layers, dropped input gradients)
    b.policy.eval()  # no dropout (GPT-2 has 0.1) while comparing
    with torch.no_grad():
        quantized = seq_logprobs(b.policy, enc)
        full = seq_logprobs(original.eval(), enc)
    mask = enc["attention_mask"][:, 1:].bool()
    # 4-bit weights (~7% relative error each): log-probs near the fp32 original's, ~log(100) = 4.6 in size
    assert (quantized - full)[mask].abs().max() < 0.25
    b.policy.train()
    seq_logprobs(b.policy, enc)[mask].mean().backward()
    assert all(p.grad is not None for n, p in b.policy.named_parameters() if "lora_B" in n)


def test_ref_load_in_8bit_without_lora(tmp_path):
    path, _ = save_tiny(tmp_path, "qwen2")
    b = load(ModelConfig(model_name_or_path=path, ref_load_in_8bit=True), "cpu")
    with b.reference() as ref:
        assert type(ref.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
        enc = b.tokenizer(PROMPTS)
        with torch.no_grad():
            diff = (seq_logprobs(ref, enc) - seq_logprobs(b.policy, enc))[enc["attention_mask"][:, 1:].bool()]
    assert 0 < diff.abs().max() < 0.1  # close, but not exactly 0: quantization error (documented)
    assert type(b.policy.model.layers[0].mlp.up_proj) is nn.Linear


BAD = [
    (dict(load_in_4bit=True), "load_in_4bit: a quantized base cannot be fully fine-tuned"),
    (dict(load_in_8bit=True), "load_in_8bit: a quantized base cannot be fully fine-tuned"),
    (dict(use_peft=True, load_in_4bit=True, load_in_8bit=True), "load_in_4bit and load_in_8bit"),
    (dict(use_peft=True, lora_target_modules=["q_proj", "query_key_value"]), r"\['query_key_value'\] match no"),
    (dict(use_peft=True, lora_target_modules="lm_head"), "match no module"),
    (dict(use_peft=True, lora_target_modules=[]), "lora_target_modules: expected"),
    (dict(use_peft=True, load_in_4bit=True, bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type"),
    (dict(use_peft=True, ref_load_in_8bit=True), "ref_load_in_8bit"),
    (dict(dtype="float64"), "dtype: expected"),
    (dict(attn_implementation="flash"), "attn_implementation"),
    (dict(use_peft=True, lora_r=0), "lora_r"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_combinations_fail_before_loading(monkeypatch, kwargs, match):
    def no_loading(*args, **kw):
        raise AssertionError("weights were loaded or created before validation failed")

    monkeypatch.setattr(models, "_from_pretrained", no_loading)
    monkeypatch.setattr(models, "_checkpoint_path", no_loading)
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: no_loading() if self.weight.device.type != "meta"
                        else None)
    with pytest.raises(ValueError, match=match):
        load(ModelConfig(**kwargs), "cpu")


def test_critic_vocab_mismatch_fails_before_loading(tmp_path, monkeypatch):
    path, _ = save_tiny(tmp_path, "llama", vocab=50)
    monkeypatch.setattr(models, "_from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match="expected vocab_size 100"):
        load(ModelConfig(critic_model_name_or_path=path), "cpu")


@pytest.mark.parametrize("quant", ["plain", "lora", "4bit", "8bit"])
def test_reference_is_the_warm_started_policy(tmp_path, quant):
    """After the built-in warm start the reference is the policy at the start of RL, for a full fine-tune and
    for LoRA on a float, 4-bit and 8-bit base: the KL of the first step is exactly 0, the reference's
    log-probs equal the warm-started policy's (and not the bare base's), the frozen reference adapter does not
    train, and a resumed run gets the same reference back from its checkpoint."""
    from fastrlhf import checkpoint, metrics, train

    flags = {"plain": [], "lora": ["--use_peft"], "4bit": ["--use_peft", "--load_in_4bit"],
             "8bit": ["--use_peft", "--load_in_8bit"]}[quant]
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "1", "--per_device_batch_size", "4", "--sft_steps", "3",
            "--sft_batch_size", "8", "--eval_samples", "2", "--max_new_tokens", "2", "--tiny_hidden_size", "32",
            "--tiny_num_layers", "1", "--tiny_num_heads", "2", "--tiny_intermediate_size", "64", "--lora_r", "4",
            *flags]
    assert train.main(argv) == 0
    assert metrics.read_metrics(out / "metrics.jsonl")[0]["kl"] == 0.0

    cfg = config.parse_args(argv[:1] + [str(tmp_path / "again")] + argv[2:])
    run = train.setup(cfg)
    enc = run.bundle.tokenizer(PROMPTS)
    policy = run.bundle.policy.eval()
    with torch.no_grad(), run.bundle.reference() as ref:
        bare = seq_logprobs(ref, enc)
    train.warm_start(run)
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    with torch.no_grad():
        warm = seq_logprobs(policy.eval(), enc)
        with run.bundle.reference() as ref:
            assert torch.equal(seq_logprobs(ref, enc), warm)
        assert [n for n, p in policy.named_parameters() if p.requires_grad] == trained  # unchanged by the switch
    assert not torch.equal(warm, bare)      # the warm start moved the policy away from the base
    if quant != "plain":
        assert trained and all(".default." in n for n in trained)   # the reference adapter is frozen
        assert [n for n, _ in policy.named_parameters() if ".reference." in n]

    resumed = train.setup(cfg)
    checkpoint.load_weights(resumed, checkpoint.load(checkpoint.latest(out))[0])
    with torch.no_grad(), resumed.bundle.reference() as ref:
        assert torch.equal(seq_logprobs(ref.eval(), enc), warm)
