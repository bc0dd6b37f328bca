"""fastrlhf.integrations.trl.GRPOTrainer against trl.GRPOTrainer itself: a tiny Llama built from a config, a
tokenizer made here, in-memory prompts and a programmed reward; the same seed gives the same completions,
per-step losses within 1e-6 and gradients within 1e-5 (float32, SGD), for every supported loss_type, with
and without β, on- and off-policy (num_iterations = 2 makes TRL keep old log-probs)."""
import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from fastrlhf.integrations.trl import GRPOTrainer, check_supported  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama and a word-level tokenizer, saved so that TRL can build its reference model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                               unk_token="<unk>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, vocab_size=len(vocab),
                                   max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def reward_even(completions, **kwargs):
    """Programmed reward: the share of even-numbered words in the completion."""
    scores = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w.startswith("w")]
        scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return scores


class Record(transformers.TrainerCallback):
    """Gradients of every parameter at each optimizer step (before the update)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def run(cls, model_dir, tmp_path, peft_config=None, **overrides):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(0, 24, 3)]})
    knobs = dict(output_dir=str(tmp_path / cls.__module__), per_device_train_batch_size=4, num_generations=4,
                 max_completion_length=6, max_steps=2, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                 max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                 bf16=False, seed=7, dataloader_num_workers=0, loss_type="grpo", beta=0.0)
    knobs.update(overrides)
    args = trl.GRPOConfig(**knobs)
    record = Record()
    trainer = cls(model=model_dir, reward_funcs=reward_even, args=args, train_dataset=prompts,
                  processing_class=tok, callbacks=[record], peft_config=peft_config)
    losses, completions = [], []
    compute = trainer._compute_loss

    def spy(model, inputs):
        loss = compute(model, inputs)
        losses.append(loss.item())
        completions.append(inputs["completion_ids"].clone())
        return loss

    trainer._compute_loss = spy
    trainer.train()
    logs = [{k: v for k, v in h.items() if k.startswith(("kl", "entropy", "clip_ratio"))}
            for h in trainer.state.log_history if "loss" in h]
    return losses, completions, record.grads, logs


CASES = [(lt, beta, it) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.2) for it in (1, 2)]


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the integration called fastrlhf's fused loss and log-probs."""
    from fastrlhf.integrations import trl as integration
    calls = {"loss": 0, "logprobs": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(integration, "fused_linear_policy_loss", counted("loss", integration.fused_linear_policy_loss))
    monkeypatch.setattr(integration, "fused_linear_logprobs", counted("logprobs", integration.fused_linear_logprobs))
    return calls


@pytest.mark.parametrize("loss_type,beta,iterations", CASES)
def test_matches_trl(model_dir, tmp_path, fused_calls, loss_type, beta, iterations):
    extra = dict(loss_type=loss_type, beta=beta, num_iterations=iterations)
    if iterations == 2:
        extra.update(epsilon_high=0.28, delta=1.5)           # DAPO's clip-higher and two-sided clipping
    if loss_type == "dapo":
        extra.update(gradient_accumulation_steps=2)            # num_items_in_batch spans the accumulation
    native = run(trl.GRPOTrainer, model_dir, tmp_path, **extra)
    assert fused_calls == {"loss": 0, "logprobs": 0}
    fused = run(GRPOTrainer, model_dir, tmp_path, **extra)
    assert fused_calls["loss"] == len(fused[0]) >= 2
    assert (fused_calls["logprobs"] > 0) == (beta != 0.0 or iterations > 1)    # old / reference log-probs
    assert len(native[0]) == len(fused[0]) >= 2
    for a, b in zip(native[1], fused[1]):
        assert torch.equal(a, b)                                # same completions
    for a, b in zip(native[0], fused[0]):
        assert abs(a - b) <= 1e-6, (native[0], fused[0])
    assert len(native[2]) == len(fused[2]) >= 1
    for ga, gb in zip(native[2], fused[2]):
        assert ga.keys() == gb.keys()
        for name in ga:
            assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=0), (name, (ga[name] - gb[name]).abs().max())
    for la, lb in zip(native[3], fused[3]):                    # TRL's metric names and values
        assert la.keys() == lb.keys() and ("kl" in la) == (beta != 0.0)
        for key in la:
            assert abs(la[key] - lb[key]) <= 1e-5, (key, la[key], lb[key])


def test_unsupported_options_fail_at_construction(model_dir, tmp_path):
    def args(**kw):
        return trl.GRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)
    with pytest.raises(ValueError, match="loss_type: expected one of \\('grpo', 'bnpo', 'dr_grpo', 'dapo'\\), "
                                         "got 'cispo'"):
        check_supported(args(loss_type="cispo"))
    with pytest.raises(ValueError, match="importance_sampling_level: expected 'token', got 'sequence'"):
        check_supported(args(importance_sampling_level="sequence"))
    with pytest.raises(ValueError, match="delta: expected None or a number > 1 and >= 1 \\+ epsilon_high"):
        check_supported(args(delta=1.1))
    with pytest.raises(ValueError, match="delta: .* got 1.0"):
        check_supported(args(delta=1.0, epsilon=0.0))
    with pytest.raises(ValueError, match="entropy_coef: expected 0.0, got 0.01"):
        check_supported(args(entropy_coef=0.01))
    with pytest.raises(ValueError, match="top_entropy_quantile: expected 1.0, got 0.2"):
        check_supported(args(top_entropy_quantile=0.2))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4})
    with pytest.raises(ValueError, match="fastrlhf.integrations.trl.GRPOTrainer: loss_type"):
        GRPOTrainer(model=model_dir, reward_funcs=reward_even, train_dataset=prompts, processing_class=tok,
                    args=args(loss_type="sapo", per_device_train_batch_size=4, num_generations=4))


def test_lora(model_dir, tmp_path):
    """A peft LoRA adapter on the trunk (the reference is the model with the adapter off): same losses
    and adapter gradients as native TRL."""
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    native = run(trl.GRPOTrainer, model_dir, tmp_path, peft_config=lora(), beta=0.2)
    fused = run(GRPOTrainer, model_dir, tmp_path, peft_config=lora(), beta=0.2)
    for a, b in zip(native[1], fused[1]):
        assert torch.equal(a, b)
    for a, b in zip(native[0], fused[0]):
        assert abs(a - b) <= 1e-6
    for ga, gb in zip(native[2], fused[2]):
        assert ga.keys() == gb.keys() and ga and all("lora" in n for n in ga)
        for name in ga:
            assert torch.allclose(ga[name], gb[name], atol=1e-5, rtol=0), name
