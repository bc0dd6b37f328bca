"""The knobs that bring the presets to the papers' code (README, "Train: PPO, PPO-max, APA"): --whiten_scope,
--critic_warmup_steps, --critic copy and --num_layers_unfrozen each change the computation as documented.
Direct calls into fastrlhf.train (setup / rollout / micro_batch_loss / update) on tiny built-in models."""
import dataclasses
import random
import re

import pytest
import torch
from torch import nn

from fastrlhf import train
from fastrlhf.config import parse_args

TINY = ["--tiny_hidden_size", "32", "--tiny_num_layers", "2", "--tiny_num_heads", "2",
        "--tiny_intermediate_size", "64"]
B = 8   # rollout rows


def make_run(tmp_path, *flags):
    """A run whose reward varies with the response (so advantages are not all equal)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fn = tmp_path / "varied.py"
    fn.write_text("def score(prompts, responses):\n"
                  "    return [len(r) / 3 + sum(c.isdigit() for c in r) for r in responses]\n")
    cfg = parse_args(["--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_batch_size", "2",
                      "--gradient_accumulation_steps", "2", "--num_mini_batches", "2", "--sft_steps", "0",
                      "--eval_samples", "4", "--max_new_tokens", "4", "--reward", f"{fn}:score",
                      "--learning_rate", "1e-2", *TINY, *flags])
    return train.setup(cfg)


def rollout(run, seed=1):
    return train.rollout(run, run.job.task.sample(B, random.Random(seed)))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}


def whitened64(adv, mask, clip=None):
    """Masked whitening over every valid token of `adv` [b, n] together, float64: (A − mean)/√(var + 1e-8)
    with the unbiased variance (README, "Advantages and rewards" 4), then ±clip."""
    a, m = adv.double(), mask.bool()
    vals = a[m]
    out = torch.where(m, (a - vals.mean()) / torch.sqrt(vals.var(unbiased=True) + 1e-8), 0.0)
    return out.clamp(-clip, clip) if clip is not None else out


# ---------------------------------------------------------------------------------------------------------
# --whiten_scope

@pytest.mark.parametrize("clip", [None, 1.0])
def test_whiten_scope_minibatch_whitens_each_optimizer_steps_rows(tmp_path, monkeypatch, clip):
    """rollout: the rollout's advantages are whitened over all its tokens once; minibatch: the rollout keeps
    the raw GAE advantages and each optimizer step's loss sees its own rows whitened over those rows' tokens
    (then clipped), as APA's trlx code whitens in the loss of each training batch."""
    extra = ["--whiten_advantages", "true"] + (["--adv_clip", str(clip)] if clip else [])
    per_roll = make_run(tmp_path / "r", "--whiten_scope", "rollout", *extra)
    per_mini = make_run(tmp_path / "m", "--whiten_scope", "minibatch", *extra)
    raw_run = make_run(tmp_path / "x", "--whiten_advantages", "false")
    a, b, raw = rollout(per_roll), rollout(per_mini), rollout(raw_run)
    assert torch.equal(b.labels, raw.labels)            # same seeds: the same rollout
    torch.testing.assert_close(b.advantages, raw.advantages)   # minibatch: not whitened in the rollout
    torch.testing.assert_close(a.advantages.double(), whitened64(raw.advantages, raw.mask, clip), atol=1e-5,
                               rtol=1e-5)

    seen = []
    real = train.accumulate_gradients

    def spy(run_, roll_, mini, cfg):
        seen.append((mini.clone(), roll_.advantages.clone()))
        return real(run_, roll_, mini, cfg)

    monkeypatch.setattr(train, "accumulate_gradients", spy)
    train.update(per_mini, b)
    assert len(seen) == per_mini.cfg.ppo_epochs * 2
    for mini, adv in seen:
        want = whitened64(raw.advantages[mini], raw.mask[mini], clip)
        torch.testing.assert_close(adv[mini].double(), want, atol=1e-5, rtol=1e-5)
        whole = whitened64(raw.advantages, raw.mask)[mini]
        assert (whitened64(raw.advantages[mini], raw.mask[mini]) - whole).abs().max() > 1e-3   # not the rollout's
    assert torch.equal(b.advantages, raw.advantages)                # the rollout itself is left as it was

    # one mini-batch per epoch: the scopes coincide and the rollout is whitened once, as with "rollout"
    one = make_run(tmp_path / "one", "--whiten_scope", "minibatch", "--num_mini_batches", "1", *extra)
    r = rollout(one)
    if clip is None:
        torch.testing.assert_close(r.advantages.double(), whitened64(r.advantages, r.mask), atol=1e-5, rtol=1e-5)
    assert r.advantages.abs().max() > 0 and not train.per_minibatch_whitening(one.cfg)


# ---------------------------------------------------------------------------------------------------------
# --critic_warmup_steps

@pytest.mark.parametrize("critic", ["shared", "copy"])
def test_critic_warmup_updates_only_the_value_model_then_ppo(tmp_path, critic):
    """During the first N RL steps only the value model changes (the policy's parameters, and with the
    shared critic the trunk under the head, stay bit for bit) and the loss is vf_coef × value loss; from
    step N + 1 on, PPO updates the policy too."""
    run = make_run(tmp_path, "--critic_warmup_steps", "1", "--critic", critic, "--vf_coef", "0.5")
    value_model = nn.ModuleList([run.bundle.value_head] + ([run.bundle.critic] if run.bundle.critic else []))
    policy0, value0 = snapshot(run.bundle.policy), snapshot(value_model)
    stats = train.update(run, rollout(run))                       # run.step = 0: a warm-up step
    assert changed(policy0, run.bundle.policy) == set()
    assert changed(value0, value_model) == set(value0)           # every value-model parameter moved
    assert stats["loss"] == pytest.approx(0.5 * stats["value_loss"], rel=1e-5)
    assert stats["policy_loss"] != 0.0                            # still measured, not applied

    run.step = 1                                                   # the warm-up is over
    policy1 = snapshot(run.bundle.policy)
    stats = train.update(run, rollout(run, seed=2))
    assert changed(policy1, run.bundle.policy) == set(policy1)
    assert stats["loss"] == pytest.approx(stats["policy_loss"] + 0.5 * stats["value_loss"], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# --critic copy

def mlp64(head, h):
    """trlx's make_head(H, 1) applied to h [B, n, H] in float64: Linear(H, 2H), ReLU, Linear(2H, 1)."""
    l1, l2 = head[0], head[2]
    z = torch.relu(h.double() @ l1.weight.double().T + l1.bias.double())
    return (z @ l2.weight.double().T + l2.bias.double()).squeeze(-1)


@pytest.mark.parametrize("peft", [False, True])
def test_critic_copy_is_a_separate_trunk_with_an_mlp_head(tmp_path, peft):
    """--critic copy: the critic is a copy of the policy's trunk (equal weights, other tensors; under LoRA its
    own adapter trains), the value is the MLP head on the copy's last hidden state, and the value loss
    reaches the copy and never the policy: the policy's gradients are the same with vf_coef 0 and 1 (with the
    shared trunk they are not)."""
    from fastrlhf.models import critic_hidden_states

    extra = ["--use_peft", "--lora_r", "4"] if peft else []
    run = make_run(tmp_path, "--critic", "copy", "--vf_coef", "1.0", *extra)
    b = run.bundle
    trunk = b.policy.get_base_model().model if peft else b.policy.model
    critic = dict(b.critic.named_parameters())
    for name, p in trunk.named_parameters():
        assert torch.equal(critic[name], p) and critic[name].data_ptr() != p.data_ptr()
        assert critic[name].requires_grad == p.requires_grad
    assert [type(m) for m in b.value_head] == [nn.Linear, nn.ReLU, nn.Linear]
    H = b.policy.config.hidden_size
    assert (b.value_head[0].in_features, b.value_head[0].out_features, b.value_head[2].out_features) == (H, 2 * H, 1)
    ids = {id(p) for p in b.critic_parameters()}
    assert all(id(p) in ids for p in b.critic.parameters() if p.requires_grad)
    assert not ids & {id(p) for p in b.policy_parameters()}

    roll = rollout(run)
    P, n = roll.P, roll.mask.shape[1]
    with torch.no_grad():
        want = mlp64(b.value_head, critic_hidden_states(b, roll.input_ids, roll.attn)[:, P - 1:P - 1 + n])
    torch.testing.assert_close(roll.old_values.double(), want, atol=1e-5, rtol=1e-5)

    def policy_grads(vf_coef, shared_run=None):
        r = shared_run or run
        r.cfg = dataclasses.replace(r.cfg, vf_coef=vf_coef)
        for p in r.bundle.trainable_parameters():
            p.grad = None
        loss, _ = train.micro_batch_loss(r, roll.rows(torch.arange(B)), train.loss_config(r))
        loss.backward()
        return [p.grad.clone() for p in r.bundle.policy_parameters()]

    g0, g1 = policy_grads(0.0), policy_grads(1.0)
    assert all(torch.equal(x, y) for x, y in zip(g0, g1))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.critic.parameters())
    shared = make_run(tmp_path / "shared", "--critic", "shared", *extra)
    with torch.no_grad():
        shared.bundle.value_head.weight.normal_()
    s0, s1 = policy_grads(0.0, shared), policy_grads(1.0, shared)
    assert not all(torch.equal(x, y) for x, y in zip(s0, s1))     # the shared trunk does get the value loss


def test_critic_copy_starts_from_the_warm_started_policy(tmp_path):
    """After the built-in warm start the copy is the warm-started trunk, not the loaded one."""
    run = make_run(tmp_path, "--critic", "copy", "--sft_steps", "2", "--sft_batch_size", "8")
    loaded = snapshot(run.bundle.critic)
    train.warm_start(run)
    trunk = dict(run.bundle.policy.model.named_parameters())
    assert all(torch.equal(p, trunk[n]) for n, p in run.bundle.critic.named_parameters())
    assert changed(loaded, run.bundle.critic)


# ---------------------------------------------------------------------------------------------------------
# --num_layers_unfrozen

@pytest.mark.parametrize("peft", [False, True])
def test_num_layers_unfrozen_trains_only_the_top_blocks(tmp_path, peft):
    """--num_layers_unfrozen 1 of 3 blocks: an update changes the top block's parameters (its LoRA adapters
    under --use_peft) and, without LoRA, the embeddings, final norm and output layer, and leaves the bottom
    two blocks bit for bit; -1 trains every block. A copied critic trains whole (trlx freezes the policy)."""
    extra = (["--use_peft", "--lora_r", "4"] if peft else []) + ["--tiny_num_layers", "3", "--critic", "copy"]
    run = make_run(tmp_path, "--num_layers_unfrozen", "1", *extra)
    policy = run.bundle.policy
    before, critic0 = snapshot(policy), snapshot(run.bundle.critic)
    train.update(run, rollout(run))
    moved = changed(before, policy)

    def layer(name):   # the block index in a parameter's name, None outside the blocks
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    assert moved and {layer(n) for n in moved} <= {2, None}
    assert any(layer(n) == 2 for n in moved)
    if not peft:
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= moved
    assert {layer(n) for n in changed(critic0, run.bundle.critic)} >= {0, 1, 2}

    every = make_run(tmp_path / "all", "--num_layers_unfrozen", "-1", *extra)
    before = snapshot(every.bundle.policy)
    train.update(every, rollout(every))
    assert {layer(n) for n in changed(before, every.bundle.policy)} >= {0, 1, 2}


@pytest.mark.parametrize("argv,match", [
    (["--num_layers_unfrozen", "-2"], "num_layers_unfrozen: expected -1"),
    (["--whiten_scope", "batch"], "whiten_scope"),
    (["--critic", "separate"], "critic"),
    (["--critic_warmup_steps", "-1"], "critic_warmup_steps"),
])
def test_paper_knobs_refuse_bad_values(argv, match):
    with pytest.raises((ValueError, SystemExit)):
        parse_args(argv)
    if argv[0] in ("--num_layers_unfrozen", "--critic_warmup_steps"):
        with pytest.raises(ValueError, match=match):
            parse_args(argv)


def test_critic_copy_refuses_a_critic_path_and_too_many_unfrozen_layers(tmp_path):
    rm = tmp_path / "rm"
    rm.mkdir()
    with pytest.raises(ValueError, match="critic: 'copy' copies the policy's trunk"):
        parse_args(["--critic", "copy", "--critic_model_name_or_path", str(rm)])
    # ppo-max takes its critic from --reward_model unless the critic is the policy's copy
    from transformers import LlamaConfig

    from fastrlhf.tokenizer import CharTokenizer
    LlamaConfig(vocab_size=CharTokenizer().vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, num_labels=1).save_pretrained(rm)
    pm = ["--algo", "ppo-max", "--task", "sentiment", "--reward_model", str(rm)]
    assert parse_args(pm).model.critic_model_name_or_path == str(rm)
    assert parse_args(pm + ["--critic", "copy"]).model.critic_model_name_or_path is None
    cfg = parse_args(["--output_dir", str(tmp_path / "run"), "--num_layers_unfrozen", "5", *TINY])
    with pytest.raises(ValueError, match=r"num_layers_unfrozen: expected -1 or 0\.\.2"):
        train.setup(cfg)
