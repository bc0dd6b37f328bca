"""fastrlhf.memory: the memory cap (a logged no-op on CPU), the activation estimate against the bytes
autograd saves, the planner's batch choices, the out-of-memory message and per-phase peaks."""
import pytest
import torch

from fastrlhf import memory
from fastrlhf.models import ModelConfig, load


def test_memory_cap_is_a_logged_noop_on_cpu(caplog):
    with caplog.at_level("INFO", logger="fastrlhf"):
        assert memory.set_memory_cap(16, "cpu") is None
    assert "no effect on device cpu" in caplog.text
    assert memory.set_memory_cap(None, "cpu") is None
    with pytest.raises(ValueError, match="max_memory_gb"):
        memory.set_memory_cap(0, "cpu")
    assert memory.free_memory_bytes("cpu") > 0


@pytest.mark.parametrize("checkpointing,lora", [(False, False), (True, False), (False, True)])
def test_activation_estimate_matches_saved_tensors(checkpointing, lora):
    """The per-token activation estimate vs the bytes autograd actually saves for the tiny Llama's trunk
    (distinct storages seen by saved_tensors_hooks), within a factor 1.5 either way."""
    from fastrlhf.hf import hidden_states

    cfg = ModelConfig(use_peft=lora, lora_dropout=0.1, gradient_checkpointing=checkpointing)
    b = load(cfg, "cpu")
    b.policy.train()
    B, T = 2, 64
    ids = torch.randint(4, b.tokenizer.vocab_size, (B, T))
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = hidden_states(b.policy, ids, torch.ones_like(ids))
    weights = {p.untyped_storage().data_ptr() for p in b.policy.parameters()}
    measured = sum(n for ptr, n in storages.items() if ptr not in weights and n > 4 * T) / (B * T)
    est = memory.activation_bytes_per_token(b.policy.config, torch.float32, gradient_checkpointing=checkpointing,
                                            lora_dropout=lora)
    if checkpointing:  # the forward saves the layer inputs; one layer is recomputed in backward, not seen here
        no_ckpt = memory.activation_bytes_per_token(b.policy.config, torch.float32, gradient_checkpointing=False,
                                                    lora_dropout=lora)
        est -= (no_ckpt - 4 * 128) // b.policy.config.num_hidden_layers
    assert h.shape == (B, T, 128)
    assert est / 1.5 < measured < est * 1.5, (est, measured)


def test_plan_memory_picks_divisors_that_fit():
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2)
    kw = dict(batch_size=12, prompt_len=128, new_tokens=128, dtype=torch.bfloat16, device="cpu")
    per_seq = memory.activation_bytes_per_token(cfg, torch.bfloat16, gradient_checkpointing=False,
                                                lora_dropout=False) * 256
    reserve = memory.plan_memory(cfg, free_bytes=10**12, **kw).loss_chunk_size * 32000 * 4 * 6
    free_for = lambda n: int((n * per_seq + reserve) / 0.8) + 1  # noqa: E731  free memory that fits n
    for fits, want in [(1, 1), (3, 3), (5, 4), (11, 6), (12, 12), (1000, 12)]:
        plan = memory.plan_memory(cfg, free_bytes=free_for(fits), **kw)
        assert plan.micro_batch == want and kw["batch_size"] % plan.micro_batch == 0
        assert f"micro-batch {want} of 12" in plan.message
    tight = memory.plan_memory(cfg, free_bytes=free_for(0.5), **kw)
    assert tight.micro_batch == 1 and "WARNING" in tight.message
    ckpt = memory.plan_memory(cfg, free_bytes=free_for(1), gradient_checkpointing=True, **kw)
    assert ckpt.update_bytes_per_sequence < per_seq / 3 and ckpt.micro_batch >= 3
    assert ckpt.generation_bytes_per_sequence == memory.kv_cache_bytes_per_token(cfg, torch.bfloat16) * 256 + 4 * 32000
    with pytest.raises(ValueError, match="batch_size"):
        memory.plan_memory(cfg, free_bytes=1, **{**kw, "batch_size": 0})


def test_out_of_memory_message_names_numbers_and_what_to_lower():
    exc = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
    msg = memory.out_of_memory_message(exc, "update", {"micro_batch": 4, "seq_len": 512})
    assert "out of memory during update" in msg and "Tried to allocate 2.00 GiB" in msg
    assert "micro_batch=4" in msg and "seq_len=512" in msg and "--gradient_checkpointing" in msg
    assert "more details" not in msg
    assert "--max_new_tokens" in memory.out_of_memory_message(exc, "generation")


def test_phase_memory_cpu_rss_peaks():
    mem = memory.PhaseMemory("cpu")
    with mem("generation"):
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with mem("update"):
        pass
    assert set(mem.peaks) == {"generation", "update"}
    assert mem.peaks["generation"] >= mem.peaks["update"] + 60  # the 64 MiB tensor shows in its phase only
    assert mem.metrics()["memory/peak_mib_update"] == mem.peaks["update"] > 0
