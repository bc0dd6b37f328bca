"""`TrainConfig`: every knob of `fastrlhf train`, its flag, its default, its preset, its checks.

Sources, later wins: dataclass defaults < the `--algo` preset (fields left unset) < `--recipe NAME`
(fastrlhf/recipes/NAME.yaml, shipped in the package) < `--config FILE.yaml` < command-line flags. The model's knobs are `fastrlhf.models.ModelConfig`, composed as `cfg.model`;
its fields are flags too (flat names in YAML and on the command line). Every flag's help is its
field's `metadata["help"]`, here and in ModelConfig. `parse_args` checks everything before any model
is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .models import PADULA_SIZES, ModelConfig
from .models import validate as validate_model
from .optim import OPTIMIZERS
from .ref import BATCH_ENTROPY_POSITIONS, KL_ESTIMATORS
from .rewards import BUILTIN_REWARDS
from .tasks import make_task

ALGOS = ("ppo", "ppo-max", "apa")
TASKS = ("arithmetic", "padula-arithmetic", "sentiment", "file")

# Per-algorithm defaults for the fields that are None in TrainConfig, each from its method's own code (the
# commits papers-vs-code.md reads: TRL, OpenLMLab/MOSS-RLHF @ 4865d82, microsoft/RLHF-APA @ cfe7da2). Every
# one is overridable by a --recipe, the YAML file or a flag. Fields no preset can set (learning rate, Adam
# betas, batch size) are in the recipes (fastrlhf/recipes/ppo-max-paper.yaml, apa-paper.yaml).
PRESETS = {
    # TRL-style PPO: Hugging Face TRL's PPOConfig (trl/trainer/ppo_config.py; "0.x" marks the PPOConfig of
    # TRL <= 0.11, the one Padula & Soemers' fork extends) and its PPOTrainer (trl/trainer/ppo_trainer.py).
    "ppo": dict(
        kl_coef=0.05,              # PPOConfig kl_coef=0.05, fixed (0.x: adaptive, init_kl_coef=0.2 target 6)
        kl_in="reward",            # ppo_trainer.py: rewards = -kl_coef * kl per token, + score on the last
        kl_estimator="k1",         # PPOConfig kl_estimator="k1" (0.x: kl_penalty="kl", logprob - ref_logprob)
        gamma=1.0, lam=0.95,       # PPOConfig gamma=1.0, lam=0.95
        cliprange=0.2,             # PPOConfig cliprange=0.2
        cliprange_value=0.2,       # PPOConfig cliprange_value=0.2
        vf_coef=0.1,               # PPOConfig vf_coef=0.1
        whiten_advantages=True,    # ppo_trainer.py masked_whiten(advantages, ~padding_mask): the whole batch
        whiten_scope="rollout",    # (the batch of the rollout, before its mini-batches)
        adv_clip=None,             # TRL clips no advantage
        score_scaling="none",      # 0.x PPOConfig use_score_scaling=False (the current PPOConfig has none)
        score_clip=None,           # 0.x PPOConfig score_clip=None
        max_grad_norm=None,        # 0.x PPOConfig max_grad_norm=None
        num_mini_batches=1,        # OnPolicyConfig num_mini_batches=1 (trl/trainer/utils.py)
        # Differs from TRL (num_ppo_epochs=4; 0.x ppo_epochs=4): 2 keeps `fastrlhf train` with no flags, the
        # documented quickstart (README, "Quickstart"), at its measured result.
        ppo_epochs=2,
        adv_coeff=10.0,            # APA's 1/λ (as in "apa"); PPO does not read it
    ),
    # PPO-max (Secrets of RLHF I) as the released MOSS-RLHF English run: train_ppo_en.sh (read here as
    # run_en.sh @ d906d64, the same flags) + config_ppo.py defaults + accelerate_config.yaml, as
    # ppo/ppo_trainer.py and ppo/ppo_datahelper.py use them. Paper App.
    # B.1 recommends not mixing reward scaling + value clip with reward/advantage normalize-and-clip: this
    # is the scaling + value-clip configuration, nothing clipped or normalized besides.
    "ppo-max": dict(
        kl_coef=0.01,              # train_ppo_en.sh --kl_penalty_weight 0.01 (config_ppo.py default 0.02; §5.3.2: 0.05)
        kl_in="reward",            # ppo_trainer.py make_experiences: kl_penalty on every token, + score on the last
        kl_estimator="k1",         # -kl_penalty_weight * (logprobs - ref_logprobs)
        gamma=1.0, lam=0.95,       # train_ppo_en.sh --gamma 1. --lam 0.95
        cliprange=0.2,             # --pg_clip 0.2 --use_policy_loss_clip
        cliprange_value=0.2,       # --value_clip 0.2 --use_critic_loss_clip
        vf_coef=1.0,               # config_ppo.py --vf_loss_weight default 1. (not set by the script)
        # No --use_advantage_norm in train_ppo_en.sh: advantages are not whitened (with it, ppo_trainer.py
        # whitens each training batch, masked; fastrlhf's --whiten_advantages whitens the rollout).
        whiten_advantages=False,
        whiten_scope="minibatch",  # what --use_advantage_norm would whiten: each training batch (inert while off)
        adv_clip=None,             # no --use_advantage_clip (config_ppo.py advantage_clip=0.5 is then unused)
        score_scaling="std",       # --use_reward_scaling without --use_reward_norm: rewards /= running.std
        score_clip=None,           # no --use_reward_clip (and --reward_clip 0.)
        max_grad_norm=1.0,         # accelerate_config.yaml deepspeed gradient_clipping: 1.0, over policy + critic
        num_mini_batches=1,        # --num_rollouts 2 = --batch_size 2: one optimizer step per rollout
        ppo_epochs=1,              # PPOTrainer.train iterates the replay buffer once, then clears it
        adv_coeff=10.0,            # APA's 1/λ (as in "apa"); PPO does not read it
        # Not preset fields: the critic pre-training of paper §5.4 is not in the released code
        # (--critic_warmup_steps N, default 0); the critic is --reward_model's trunk when one is given.
    ),
    # APA as the official code: microsoft/RLHF-APA examples/apa_hh.py (its SPPOConfig; the same settings are
    # in examples/sppo_hh.py @ 1cd4c13, read here), trlx/models/modeling_sppo.py,
    # trlx/trainer/accelerate_sppo_trainer.py, trlx/trainer/accelerate_base_trainer.py.
    "apa": dict(
        kl_coef=0.0,               # accelerate_sppo_trainer.py: rewards = kl_penalty * 0 (init_kl_coef 0.05 unused)
        kl_in="reward",
        kl_estimator="k1",         # kl_penalty = kl_ctl.value * -log_ratio (multiplied by 0 above)
        gamma=1.0, lam=0.95,       # apa_hh.py gamma=1, lam=0.95
        cliprange=0.2,             # not read by APA (apa_hh.py cliprange=100 enters only a logged PPO loss)
        cliprange_value=None,      # modeling_sppo.py loss: values_clipped commented out, 0.5 * MSE
        vf_coef=1.0,               # apa_hh.py vf_coef=1
        # modeling_sppo.py get_advantages_and_returns: whiten(advantages), called from the loss of each
        # training batch (8 rows in apa_hh.py), unmasked; fastrlhf whitens each mini-batch, masked (README,
        # "Advantages and rewards")
        whiten_advantages=True,
        whiten_scope="minibatch",
        adv_clip=None,             # no advantage clip
        score_scaling="std",       # apa_hh.py scale_reward="running": scores /= running_moments.std
        score_clip=100.0,          # apa_hh.py cliprange_reward=100
        max_grad_norm=None,        # accelerate_base_trainer.py learn: backward, opt.step(), no clipping
        # apa_hh.py 125M: num_rollouts=128 / batch_size=8 = 16 mini-batches; that needs per_device_batch_size
        # 8, which no preset sets: fastrlhf/recipes/apa-paper.yaml has both
        num_mini_batches=1,
        ppo_epochs=2,              # apa_hh.py ppo_epochs=2 (two consecutive steps per mini-batch there)
        adv_coeff=10.0,            # apa_hh.py ADV_COEFF_SQ = 10 (the paper's 1/λ)
        # Not preset fields (fastrlhf/recipes/apa-paper.yaml sets them): the official critic is a copy of the
        # SFT trunk with an MLP head (modeling_sppo.py v_net, make_head): --critic copy, while "shared" stays
        # every algorithm's memory-saving default (README, "The value model"); only the top 2 blocks train
        # (ModelConfig num_layers_unfrozen=2): --num_layers_unfrozen 2, a per-model count.
    ),
}


def _f(default, help, choices=None, preset=False, flag=True):
    return field(default=default, metadata={"help": help, "choices": choices, "preset": preset, "flag": flag})


@dataclass
class TrainConfig:
    # --- run ---
    algo: str = _f("ppo", "RL algorithm", ALGOS)
    task: Optional[str] = _f(None, "prompt source: arithmetic | padula-arithmetic (Padula & Soemers' chains) | "
                                   "sentiment | file (None: 'file' when --prompts is given, else 'arithmetic')",
                             TASKS + (None,))
    prompts: Optional[str] = _f(None, "prompt file, text (one per line) or .jsonl ('prompt' or 'text' key); "
                                      "for task sentiment it replaces the built-in list")
    digits: int = _f(1, "arithmetic task: operands have 1..digits digits")
    operators: str = _f("+", "arithmetic task: operators to draw from (any of + - *)")
    reward: Optional[str] = _f(None, "arithmetic | padula-arithmetic | vader | path/file.py:fn | module:fn, called as "
                                     "fn(prompts, responses) -> floats (None: the task's own reward)")
    partial_credit: bool = _f(False, "arithmetic reward: < 0.5 credit for matching digits of a wrong answer")
    reward_model: Optional[str] = _f(None, "Hugging Face sequence-classification model scoring prompt+response")
    reward_label: Optional[int] = _f(None, "which logit of --reward_model is the score (None: the label named "
                                           "POSITIVE in the model's id2label, 0 for a one-logit model, else an "
                                           "error listing the labels)")
    output_dir: str = _f("runs/fastrlhf", "where metrics.jsonl, checkpoints, the plot and TensorBoard go")
    overwrite_output_dir: bool = _f(False, "start afresh in an --output_dir that holds a run (its checkpoints and "
                                           "metrics are deleted); without it such a directory is refused unless "
                                           "--resume is given")
    seed: int = _f(0, "seed of every random generator")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda", ("auto", "cpu", "cuda"))
    num_threads: Optional[int] = _f(None, "CPU threads for torch (None: 1 for the built-in tiny model, whose "
                                          "matmuls are too small to gain from threads, else torch's default)")
    bf16: bool = _f(True, "bf16 autocast on CUDA (ignored on CPU)")
    max_steps: int = _f(150, "RL steps (one rollout batch each)")
    save_steps: int = _f(0, "checkpoint every N steps (0: by time, --save_minutes, and at the end)")
    save_minutes: float = _f(10.0, "also checkpoint after a step that ends this many minutes after the last "
                                   "checkpoint (0: off); an error during a rollout checkpoints the last completed step")
    save_total_limit: Optional[int] = _f(2, "keep this many newest checkpoints (None: all)")
    resume: Optional[str] = _f(None, "'latest' (checkpoint in --output_dir) or a checkpoint directory; "
                                     "--resume alone means latest")
    report_to: str = _f("none", "none | tensorboard", ("none", "tensorboard"))
    logging_steps: int = _f(1, "progress-bar refresh period (metrics.jsonl gets every step)")
    # --- rollout ---
    per_device_batch_size: int = _f(32, "micro-batch size (sequences per forward/backward)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    num_mini_batches: Optional[int] = _f(None, "optimizer steps per epoch; rollout batch = "
                                               "per_device_batch_size x gradient_accumulation_steps x this",
                                         preset=True)
    ppo_epochs: Optional[int] = _f(None, "passes over each rollout batch", preset=True)
    max_prompt_length: int = _f(128, "prompts are left-truncated to this many tokens")
    max_new_tokens: int = _f(4, "response length limit")
    temperature: float = _f(1.0, "sampling temperature (log-probs use the same one)")
    top_k: int = _f(0, "top-k sampling (0: off)")
    top_p: float = _f(1.0, "nucleus sampling mass (1: off)")
    # --- optimization ---
    learning_rate: float = _f(3e-4, "policy learning rate (AdamW)")
    critic_learning_rate: Optional[float] = _f(None, "value head / critic learning rate (None: --learning_rate)")
    optim: str = _f("adamw_torch", "adamw_torch | adamw_8bit (bitsandbytes 8-bit states) | paged_adamw_8bit",
                    OPTIMIZERS)
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("constant", "constant | linear | cosine (after warmup)",
                                ("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "linear learning-rate warmup, in optimizer steps")
    max_grad_norm: Optional[float] = _f(None, "global grad-norm clip (None: off)", preset=True)
    vf_coef: Optional[float] = _f(None, "value-loss weight", preset=True)
    critic: str = _f("shared", "value model: shared (a linear head on the policy's trunk: no second copy of the "
                               "weights) | copy (a separate trunk copied from the policy at the start of RL, with "
                               "a 2-layer MLP head, as APA's official code)", ("shared", "copy"))
    critic_warmup_steps: int = _f(0, "the first N RL steps update only the value model, the policy is left as it "
                                     "is (PPO-max's critic pre-training, paper §5.4)")
    num_layers_unfrozen: int = _f(-1, "train only the policy's top K transformer blocks (their LoRA adapters "
                                      "under --use_peft); embeddings, final norm and output layer still train, as "
                                      "trlx's freeze_bottom_causal_layers (-1: all blocks)")
    # --- advantages and rewards ---
    gamma: Optional[float] = _f(None, "GAE discount", preset=True)
    lam: Optional[float] = _f(None, "GAE lambda", preset=True)
    whiten_advantages: Optional[bool] = _f(None, "masked whitening of advantages", preset=True)
    whiten_scope: Optional[str] = _f(None, "what --whiten_advantages whitens together: rollout (all its tokens, "
                                           "once) | minibatch (each optimizer step's rows, at that step)",
                                     ("rollout", "minibatch", None), preset=True)
    adv_clip: Optional[float] = _f(None, "clip whitened advantages to ±this (None: off)", preset=True)
    score_scaling: Optional[str] = _f(None, "none | std (divide by running std) | mean_std (also subtract "
                                            "running mean)", ("none", "std", "mean_std", None), preset=True)
    score_clip: Optional[float] = _f(None, "clip the (scaled) score to ±this (None: off)", preset=True)
    # --- losses ---
    cliprange: Optional[float] = _f(None, "PPO ratio clip ε (low side)", preset=True)
    cliprange_high: Optional[float] = _f(None, "PPO ratio clip on the high side (None: --cliprange)")
    dual_clip: Optional[float] = _f(None, "PPO dual clip c > 1 (None: off)")
    cliprange_value: Optional[float] = _f(None, "value clip ε_v (None: ½ MSE)", preset=True)
    adv_coeff: Optional[float] = _f(None, "APA 1/λ", preset=True)
    entropy_coef: float = _f(0.0, "entropy bonus weight")
    batch_entropy_coef: float = _f(0.0, "batch-entropy bonus weight: loss −= this × H_batch, the entropy of the "
                                        "PPO mini-batch's mean distribution (README, \"Batch entropy\")")
    batch_entropy_positions: str = _f("all", "positions H_batch averages: all (H(p̄_t) at each response position "
                                             "t, averaged over the positions with a valid token) | last (one p̄ "
                                             "over each row's last valid response token: Padula & Soemers' "
                                             "one-token answers)", BATCH_ENTROPY_POSITIONS)
    kl_coef: Optional[float] = _f(None, "KL weight β (initial value with --adaptive_kl)", preset=True)
    kl_estimator: Optional[str] = _f(None, "KL estimator k1 | k2 | k3", KL_ESTIMATORS + (None,), preset=True)
    kl_in: Optional[str] = _f(None, "reward (per-token shaping) | loss (policy-loss term)",
                              ("reward", "loss", None), preset=True)
    adaptive_kl: bool = _f(False, "adapt β towards --kl_target")
    kl_target: float = _f(0.1, "target KL per sequence for --adaptive_kl")
    kl_horizon: float = _f(10000.0, "adaptive KL horizon (in samples)")
    ptx_file: Optional[str] = _f(None, "pretraining (ptx) loss on this SFT text file (text or .jsonl "
                                       "with a 'text' key)")
    ptx_coef: float = _f(0.0, "ptx loss weight (needs --ptx_file)")
    # --- supervised warm-start (built in for the arithmetic task) ---
    sft_steps: Optional[int] = _f(None, "supervised warm-start steps before RL (None: 250 for the built-in "
                                        "model on arithmetic, else 0)")
    sft_noise: float = _f(0.6, "fraction of warm-start answers that are wrong (off by a few), so RL has "
                               "something to learn")
    sft_learning_rate: float = _f(3e-3, "warm-start learning rate")
    sft_batch_size: int = _f(64, "warm-start batch size")
    eval_samples: int = _f(256, "held-out prompts scored by `fastrlhf eval` and the final summary")
    # --- response endings, reward input, logged samples (README, "Train: PPO, PPO-max, APA") ---
    stop: Optional[list] = _f(None, "stop string; repeat the flag for several (YAML: a list). A response ends at "
                                    "the token completing the first one (that token is trained on, like EOS); "
                                    "the text scored and logged is cut before it, trailing spaces removed (trlx)")
    min_new_tokens: Optional[int] = _f(None, "draw each prompt's response-length limit uniformly from "
                                             "[min_new_tokens, max_new_tokens] (None: max_new_tokens for all); "
                                             "EOS and --stop still end a response earlier")
    reward_input: Optional[str] = _f(None, "what --reward vader and --reward_model score: response | "
                                           "prompt_response (None: prompt_response, as Padula & Soemers' "
                                           "imdb_ppo.py; other rewards get both and choose)",
                                     ("response", "prompt_response", None))
    log_samples: int = _f(4, "per step, append the first N (prompt, response, reward) of the rollout to "
                             "<output_dir>/samples.jsonl (0: off)")
    # --- several processes (README, "More than one GPU") ---
    fsdp: bool = _f(False, "under torchrun: shard the policy, reference and critic (FSDP2 fully_shard per "
                           "transformer block) and their gradients and optimizer state, instead of replicating "
                           "them (DDP)")
    dist_timeout_s: float = _f(1800.0, "under torchrun: seconds any collective (all-reduce, barrier) may wait for "
                                       "the other processes before the job fails (torch's default: 1800)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"flag": False})

    def resolved(self, explicit=()) -> "TrainConfig":
        """A copy with the preset applied to every field left None and not named in `explicit` (the
        options the user gave, so `--score_clip none` can switch a preset's clip off), and the
        task/reward defaults filled."""
        cfg = dataclasses.replace(self)
        for k, v in PRESETS[cfg.algo].items():
            if getattr(cfg, k) is None and k not in explicit:
                setattr(cfg, k, v)
        if cfg.cliprange_high is None:
            cfg.cliprange_high = cfg.cliprange
        if cfg.task is None:
            cfg.task = "file" if cfg.prompts else "arithmetic"
        if cfg.reward is None and cfg.reward_model is None:
            cfg.reward = {"arithmetic": "arithmetic", "padula-arithmetic": "padula-arithmetic",
                          "sentiment": "vader"}.get(cfg.task)
        if cfg.reward_input is None and (cfg.reward == "vader" or cfg.reward_model):
            cfg.reward_input = "prompt_response"
        if cfg.critic_learning_rate is None:
            cfg.critic_learning_rate = cfg.learning_rate
        if cfg.sft_steps is None:
            cfg.sft_steps = 250 if (cfg.model.model_name_or_path is None and cfg.task == "arithmetic") else 0
        if cfg.algo == "ppo-max" and cfg.reward_model and cfg.model.critic_model_name_or_path is None \
                and cfg.critic == "shared":
            cfg.model = dataclasses.replace(cfg.model, critic_model_name_or_path=cfg.reward_model)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        model = ModelConfig(**d.pop("model", {}))
        return cls(model=model, **d)


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def _base_type(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    if typing.get_origin(tp) is typing.Union:  # e.g. Union[str, list]: given as a string on the command line
        return str, False
    return tp, False


def _parser_type(name, base, optional):
    def convert(text):
        if optional and text.lower() in ("none", "null"):
            return None
        if base is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None
    convert.__name__ = base.__name__
    return convert


def build_parser(prog="fastrlhf train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                description="PPO / PPO-max / APA on a Hugging Face causal LM. No flags: "
                                            "the built-in tiny Llama on single-digit addition.")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="a built-in YAML file of flag values (fastrlhf/recipes/NAME.yaml; --config and flags "
                        "override it); 'list' prints the recipes")
    p.add_argument("--config", default=None, help="YAML file of flag values (flags given here override it)")
    for cls, title in ((TrainConfig, "training"), (ModelConfig, "model (fastrlhf.models)")):
        group = p.add_argument_group(title)
        defaults = cls()
        for f, tp in _fields(cls):
            base, optional = _base_type(tp)
            default = getattr(defaults, f.name)
            help_ = f.metadata["help"]
            if f.metadata.get("preset"):
                help_ += " (default per --algo: " + ", ".join(
                    f"{a}={PRESETS[a][f.name]}" for a in ALGOS) + ")"
            choices = [c for c in (f.metadata.get("choices") or ()) if c is not None] or None
            kw = dict(default=argparse.SUPPRESS, help=help_ + f" [default: {default}]")
            if base is bool and not optional:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
            elif f.name == "resume":
                group.add_argument("--resume", nargs="?", const="latest", metavar="PATH", **kw)
            elif f.name == "stop":
                group.add_argument("--stop", action="append", metavar="STRING", **kw)
            else:
                if choices:
                    kw["help"] += f" {{{', '.join(map(str, choices))}}}"
                    kw["choices"] = choices + [None] if optional else choices
                group.add_argument(f"--{f.name}", type=_parser_type(f.name, base, optional),
                                   metavar=base.__name__.upper(), **kw)
    return p


def _split(values: dict, source: str) -> tuple:
    train_names = {f.name for f, _ in _fields(TrainConfig)}
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - train_names - model_names)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {unknown}; see `fastrlhf train --help`")
    return ({k: v for k, v in values.items() if k in train_names},
            {k: v for k, v in values.items() if k in model_names})


def _check_types(values: dict, source: str):
    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(ModelConfig)}
    for k, v in values.items():
        args = typing.get_args(hints[k])
        if typing.get_origin(hints[k]) is typing.Union and type(None) not in args:
            if not isinstance(v, tuple(typing.get_origin(a) or a for a in args)):
                raise ValueError(f"{source}: {k}: expected one of {[a.__name__ for a in args]}, got {v!r}")
            continue
        base, optional = _base_type(hints[k])
        if v is None and optional:
            continue
        ok = isinstance(v, base) and not (base is int and isinstance(v, bool))
        if base is float and isinstance(v, int) and not isinstance(v, bool):
            values[k] = float(v)
            ok = True
        if not ok and typing.get_origin(base) is None and base in (int, float, str, bool):
            raise ValueError(f"{source}: {k}: expected {base.__name__}{' or null' if optional else ''}, "
                             f"got {v!r}")


def _yaml_values(text: str, source: str) -> dict:
    import yaml
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{source}:{where}: expected YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of option: value, got {type(data).__name__}")
    values = {k.replace("-", "_"): v for k, v in data.items()}
    _split(values, source)
    _check_types(values, source)
    return values


def load_yaml(path) -> dict:
    """The option: value mapping of a `--config` file, checked against the flags."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: expected an existing YAML file, got {str(path)!r}")
    return _yaml_values(path.read_text(), f"config {path}")


def recipes() -> dict:
    """{name: first comment line} of the recipes shipped in the package (fastrlhf/recipes/NAME.yaml)."""
    from importlib import resources

    out = {}
    for f in sorted(resources.files("fastrlhf").joinpath("recipes").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            first = next((ln for ln in f.read_text().splitlines() if ln.startswith("#")), "#")
            out[f.name[:-len(".yaml")]] = first.lstrip("#").strip()
    return out


def load_recipe(name: str) -> dict:
    """The option: value mapping of the built-in recipe `name`, checked against the flags."""
    from importlib import resources

    names = recipes()
    if name not in names:
        raise ValueError(f"recipe: expected one of {tuple(names)} (or 'list'), got {name!r}")
    text = resources.files("fastrlhf").joinpath(f"recipes/{name}.yaml").read_text()
    return _yaml_values(text, f"recipe {name}")


def parse_args(argv, prog="fastrlhf train") -> TrainConfig:
    """Flags (+ optional recipe and YAML) -> a resolved, validated TrainConfig. Raises ValueError
    (argparse errors exit with status 2 and a usage message; `--recipe list` prints the recipes and
    exits with status 0)."""
    ns = vars(build_parser(prog).parse_args(argv))
    recipe = ns.pop("recipe", None)
    yaml_path = ns.pop("config", None)
    if recipe == "list":
        for name, line in recipes().items():
            print(f"{name:<20} {line}")
        raise SystemExit(0)
    values = load_recipe(recipe) if recipe else {}
    values.update(load_yaml(yaml_path) if yaml_path else {})
    values.update(ns)
    train_kw, model_kw = _split(values, "options")
    cfg = TrainConfig(model=ModelConfig(**model_kw), **train_kw).resolved(explicit=set(values))
    validate(cfg)
    if not cfg.resume and not cfg.overwrite_output_dir and holds_run(cfg.output_dir):   # training only
        raise ValueError(f"output_dir: {cfg.output_dir!r} holds a run (metrics.jsonl or checkpoint-*); pass "
                         f"--resume to continue it, --overwrite_output_dir to replace it, or another --output_dir")
    return cfg


# Flags a resumed run may change (applied from the resumed step on); every other flag must equal the
# checkpoint's, since the saved weights, optimizer state, running statistics and random streams depend on it.
RESUMABLE = ("resume", "overwrite_output_dir", "output_dir", "max_steps", "save_steps", "save_minutes",
             "save_total_limit", "report_to", "logging_steps", "eval_samples", "num_threads", "device",
             "learning_rate", "critic_learning_rate", "max_memory_gb", "log_samples", "dist_timeout_s")


def _flat(d: dict) -> dict:
    return {**{k: v for k, v in d.items() if k != "model"}, **d.get("model", {})}


def resume_changes(saved: dict, cfg: "TrainConfig") -> dict:
    """Flags that differ between a checkpoint's config (`saved`, its config.json) and `cfg` -> {flag: (saved,
    now)} of the RESUMABLE ones; ValueError naming every other one that differs (with both values)."""
    now, before = _flat(json.loads(json.dumps(cfg.to_dict(), default=str))), _flat(saved)
    diff = {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}
    fixed = {k: v for k, v in diff.items() if k not in RESUMABLE}
    if fixed:
        listed = ", ".join(f"--{k} {a!r} (checkpoint) vs {b!r} (now)" for k, (a, b) in fixed.items())
        raise ValueError(f"resume: these flags cannot change on --resume: {listed}; give the checkpoint's values "
                         f"or start a new run")
    return {k: v for k, v in diff.items() if k not in ("resume", "overwrite_output_dir")}


def holds_run(output_dir) -> bool:
    """Whether `output_dir` holds a training run's files (metrics.jsonl or a checkpoint-* directory)."""
    out = Path(output_dir)
    return out.is_dir() and ((out / "metrics.jsonl").exists() or any(out.glob("checkpoint-*")))


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def validate(cfg: TrainConfig):
    """Every check that needs no model: values, ranges, and combinations."""
    for name in ("num_mini_batches", "ppo_epochs", "vf_coef", "gamma", "lam", "whiten_advantages", "whiten_scope",
                 "score_scaling", "cliprange",
                 "adv_coeff", "kl_coef", "kl_estimator", "kl_in"):
        if getattr(cfg, name) is None:
            raise ValueError(f"{name}: expected a value (it has no 'off' setting), got None")
    _choice("algo", cfg.algo, ALGOS)
    _choice("task", cfg.task, TASKS)
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _choice("report_to", cfg.report_to, ("none", "tensorboard"))
    _choice("optim", cfg.optim, OPTIMIZERS)
    if cfg.optim != "adamw_torch" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"optim: {cfg.optim!r} needs the bitsandbytes package (pip install 'fastrlhf[quant]')")
    _choice("lr_scheduler_type", cfg.lr_scheduler_type, ("constant", "linear", "cosine"))
    _choice("score_scaling", cfg.score_scaling, ("none", "std", "mean_std"))
    _choice("whiten_scope", cfg.whiten_scope, ("rollout", "minibatch"))
    _choice("critic", cfg.critic, ("shared", "copy"))
    _choice("kl_estimator", cfg.kl_estimator, KL_ESTIMATORS)
    _choice("kl_in", cfg.kl_in, ("reward", "loss"))
    _choice("batch_entropy_positions", cfg.batch_entropy_positions, BATCH_ENTROPY_POSITIONS)
    positive_ints = ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "num_mini_batches",
                     "ppo_epochs", "max_new_tokens", "max_prompt_length", "logging_steps", "sft_batch_size",
                     "eval_samples")
    for name in positive_ints:
        v = getattr(cfg, name)
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    for name in ("save_steps", "sft_steps", "warmup_steps", "top_k", "log_samples", "critic_warmup_steps"):
        v = getattr(cfg, name)
        if not (isinstance(v, int) and v >= 0):
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if not (isinstance(cfg.num_layers_unfrozen, int) and cfg.num_layers_unfrozen >= -1):
        raise ValueError(f"num_layers_unfrozen: expected -1 (all blocks) or an int >= 0, got {cfg.num_layers_unfrozen!r}")
    if cfg.critic == "copy" and cfg.model.critic_model_name_or_path is not None:
        raise ValueError(f"critic: 'copy' copies the policy's trunk; it cannot be combined with "
                         f"critic_model_name_or_path {cfg.model.critic_model_name_or_path!r}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ValueError(f"num_threads: expected None or an int >= 1, got {cfg.num_threads!r}")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise ValueError(f"save_total_limit: expected None or an int >= 1, got {cfg.save_total_limit!r}")
    for f, _ in _fields(TrainConfig):        # inf / NaN would train on with all-NaN metrics
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name}: expected a finite number, got {v!r}")
    for name in ("learning_rate", "critic_learning_rate", "sft_learning_rate", "temperature", "kl_target",
                 "kl_horizon", "dist_timeout_s"):
        v = getattr(cfg, name)
        if not v > 0:
            raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    for name in ("save_minutes", "weight_decay", "entropy_coef", "batch_entropy_coef", "kl_coef", "ptx_coef", "vf_coef",
                 "cliprange_high", "adv_coeff"):
        v = getattr(cfg, name)
        if not v >= 0:
            raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
    for name in ("max_grad_norm", "adv_clip", "score_clip", "cliprange_value"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ValueError(f"{name}: expected None or a number > 0, got {v!r}")
    if not 0 <= cfg.cliprange < 1:
        raise ValueError(f"cliprange: expected 0 <= cliprange < 1, got {cfg.cliprange!r}")
    if cfg.dual_clip is not None and not cfg.dual_clip > 1:
        raise ValueError(f"dual_clip: expected None or a number > 1, got {cfg.dual_clip!r}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {cfg.top_p!r}")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise ValueError(f"gamma, lam: expected numbers in [0, 1], got gamma={cfg.gamma!r}, lam={cfg.lam!r}")
    if not 0 <= cfg.sft_noise <= 1:
        raise ValueError(f"sft_noise: expected a number in [0, 1], got {cfg.sft_noise!r}")
    if cfg.reward_label is not None and not (isinstance(cfg.reward_label, int) and cfg.reward_label >= 0):
        raise ValueError(f"reward_label: expected None or an int >= 0, got {cfg.reward_label!r}")
    if cfg.stop is not None and not (isinstance(cfg.stop, list) and cfg.stop
                                     and all(isinstance(x, str) and x for x in cfg.stop)):
        raise ValueError(f"stop: expected a list of non-empty strings, got {cfg.stop!r}")
    if cfg.min_new_tokens is not None and not (isinstance(cfg.min_new_tokens, int)
                                               and 1 <= cfg.min_new_tokens <= cfg.max_new_tokens):
        raise ValueError(f"min_new_tokens: expected None or an int in [1, max_new_tokens={cfg.max_new_tokens}], "
                         f"got {cfg.min_new_tokens!r}")
    _choice("reward_input", cfg.reward_input, ("response", "prompt_response", None))
    if cfg.reward_input is not None and cfg.reward != "vader" and not cfg.reward_model:
        raise ValueError(f"reward_input: applies to --reward vader and --reward_model (a reward function gets "
                         f"prompts and responses and chooses), got --reward {cfg.reward!r}")
    if cfg.reward_label is not None and not cfg.reward_model:
        raise ValueError(f"reward_label: applies to --reward_model, got --reward {cfg.reward!r}")
    # combinations
    if cfg.prompts and not Path(cfg.prompts).is_file():
        raise ValueError(f"prompts: expected an existing file, got {cfg.prompts!r}")
    if cfg.prompts and cfg.task in ("arithmetic", "padula-arithmetic"):
        raise ValueError(f"prompts: task {cfg.task!r} generates its prompts; use --task file or sentiment")
    if cfg.task == "file" and not cfg.prompts:
        raise ValueError("prompts: --task file needs --prompts FILE")
    if cfg.reward and cfg.reward_model:
        raise ValueError(f"reward, reward_model: give one, got --reward {cfg.reward!r} and --reward_model "
                         f"{cfg.reward_model!r}")
    if not cfg.reward and not cfg.reward_model:
        raise ValueError(f"reward: task {cfg.task!r} has no built-in reward; give --reward or --reward_model")
    if cfg.reward == "arithmetic" and cfg.task != "arithmetic":
        raise ValueError(f"reward: 'arithmetic' scores arithmetic prompts only, got --task {cfg.task!r}")
    if cfg.reward == "padula-arithmetic" and cfg.task not in ("padula-arithmetic", "file"):
        raise ValueError(f"reward: 'padula-arithmetic' scores chain prompts (--task padula-arithmetic, or a "
                         f"--prompts file of them), got --task {cfg.task!r}")
    if cfg.reward and cfg.reward not in BUILTIN_REWARDS and ":" not in cfg.reward:
        raise ValueError(f"reward: expected one of {BUILTIN_REWARDS}, path/file.py:fn or module:fn, "
                         f"got {cfg.reward!r}")
    if cfg.reward and cfg.reward.split(":")[0].endswith(".py") and not Path(cfg.reward.rsplit(":", 1)[0]).is_file():
        raise ValueError(f"reward: expected an existing Python file, got {cfg.reward.rsplit(':', 1)[0]!r}")
    if cfg.reward_model and not Path(cfg.reward_model).exists():
        raise ValueError(f"reward_model: expected a local model directory, got {cfg.reward_model!r}")
    if cfg.task in ("arithmetic", "padula-arithmetic"):
        make_task(cfg.task, digits=cfg.digits, operators=cfg.operators)
    if cfg.model.model_name_or_path is None and cfg.model.builtin_model in PADULA_SIZES \
            and cfg.task not in ("padula-arithmetic", "file"):
        raise ValueError(f"builtin_model: {cfg.model.builtin_model!r} has the WordTokenizer (numbers 0..99, "
                         f"+ * =), for --task padula-arithmetic or a --prompts file of chains, got --task {cfg.task!r}")
    if cfg.resume and cfg.overwrite_output_dir:
        raise ValueError("overwrite_output_dir: expected False with --resume (it would delete the run to resume)")
    if cfg.resume:
        from .checkpoint import latest
        path = latest(cfg.output_dir) if cfg.resume == "latest" else Path(cfg.resume)
        if path is None:
            raise ValueError(f"resume: no checkpoint in --output_dir {cfg.output_dir!r} to resume from")
        if not (path / "state.pt").is_file():
            raise ValueError(f"resume: expected a checkpoint directory (with state.pt), got {cfg.resume!r}")
        resume_changes(json.loads((path / "config.json").read_text()), cfg)   # refuses what cannot change
    if cfg.ptx_coef > 0 and not cfg.ptx_file:
        raise ValueError(f"ptx_coef: {cfg.ptx_coef} needs --ptx_file, got none")
    if cfg.ptx_file and not Path(cfg.ptx_file).is_file():
        raise ValueError(f"ptx_file: expected an existing file, got {cfg.ptx_file!r}")
    if cfg.algo == "apa" and cfg.dual_clip is not None:
        raise ValueError("dual_clip: APA has no ratio to clip; drop --dual_clip or use --algo ppo/ppo-max")
    if cfg.adaptive_kl and cfg.kl_coef == 0:
        raise ValueError("adaptive_kl: needs --kl_coef > 0 to adapt (β = 0 stays 0)")
    if cfg.sft_steps and cfg.task not in ("arithmetic", "padula-arithmetic"):
        raise ValueError(f"sft_steps: the built-in warm-starts are for the arithmetic and padula-arithmetic tasks, "
                         f"got --task {cfg.task!r}")
    if cfg.bf16 and cfg.device == "cuda" and cfg.model.dtype in ("float16", "fp16"):
        raise ValueError("bf16: autocast to bf16 with a float16 model; pass --no-bf16 or --dtype bfloat16")
    if cfg.fsdp:
        m = cfg.model
        quantized = [f"--{k}" for k in ("load_in_4bit", "load_in_8bit", "ref_load_in_8bit") if getattr(m, k)]
        if quantized:
            raise ValueError(f"fsdp: bitsandbytes' quantized weights ({', '.join(quantized)}) cannot be sharded "
                             f"by fully_shard; drop --fsdp (DDP replicates them) or the quantization")
        if m.use_peft and cfg.sft_steps:
            raise ValueError(f"fsdp: with --use_peft the warm start's reference is a second LoRA adapter, which "
                             f"cannot join a sharded model; expected --sft_steps 0, got {cfg.sft_steps}")
        if cfg.optim != "adamw_torch":
            raise ValueError(f"fsdp: bitsandbytes' 8-bit optimizers do not take sharded (DTensor) parameters; "
                             f"expected --optim adamw_torch, got {cfg.optim!r}")
    validate_model(cfg.model)
