import dataclasses

import pytest

from fastrlhf import config, models, train
from fastrlhf.config import ALGOS, PRESETS, TrainConfig, build_parser, parse_args


def test_defaults_are_the_builtin_arithmetic_job():
    cfg = parse_args([])
    assert cfg.algo == "ppo" and cfg.task == "arithmetic" and cfg.reward == "arithmetic"
    assert cfg.model.model_name_or_path is None and cfg.sft_steps > 0
    for k, v in PRESETS["ppo"].items():
        assert getattr(cfg, k) == v


@pytest.mark.parametrize("algo", ["ppo", "ppo-max", "apa"])
def test_presets_apply_and_flags_override_them(algo):
    cfg = parse_args(["--algo", algo])
    for k, v in PRESETS[algo].items():
        assert getattr(cfg, k) == v, k
    cfg = parse_args(["--algo", algo, "--kl_coef", "0.3", "--score_clip", "none", "--cliprange_value", "0.5"])
    assert (cfg.kl_coef, cfg.score_clip, cfg.cliprange_value) == (0.3, None, 0.5)


# Each preset as its source's code sets it, written out here (not read back from PRESETS); the sources are
# cited next to each value in fastrlhf/config.py.
SOURCED = {
    # TRL PPOConfig / PPOTrainer, but ppo_epochs 2 (TRL: 4), kept for the default job
    "ppo": dict(kl_coef=0.05, kl_in="reward", kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
                cliprange_value=0.2, vf_coef=0.1, whiten_advantages=True, whiten_scope="rollout", adv_clip=None,
                score_scaling="none",
                score_clip=None, max_grad_norm=None, num_mini_batches=1, ppo_epochs=2, adv_coeff=10.0),
    # MOSS-RLHF train_ppo_en.sh + config_ppo.py + accelerate_config.yaml
    "ppo-max": dict(kl_coef=0.01, kl_in="reward", kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
                    cliprange_value=0.2, vf_coef=1.0, whiten_advantages=False, whiten_scope="minibatch", adv_clip=None,
                    score_scaling="std",
                    score_clip=None, max_grad_norm=1.0, num_mini_batches=1, ppo_epochs=1, adv_coeff=10.0),
    # RLHF-APA apa_hh.py + modeling_sppo.py + accelerate_sppo_trainer.py + accelerate_base_trainer.py
    "apa": dict(kl_coef=0.0, kl_in="reward", kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
                cliprange_value=None, vf_coef=1.0, whiten_advantages=True, whiten_scope="minibatch", adv_clip=None,
                score_scaling="std",
                score_clip=100.0, max_grad_norm=None, num_mini_batches=1, ppo_epochs=2, adv_coeff=10.0),
}


@pytest.mark.parametrize("algo", ALGOS)
def test_preset_values_from_their_sources(algo):
    assert PRESETS[algo] == SOURCED[algo]
    cfg = parse_args(["--algo", algo])
    assert {k: getattr(cfg, k) for k in SOURCED[algo]} == SOURCED[algo]


def test_default_job_settings_unchanged():
    """`fastrlhf train` with no flags is the documented quickstart: these are its settings before the presets
    were sourced (ppo_epochs was a plain default of 2)."""
    cfg = parse_args([])
    assert (cfg.ppo_epochs, cfg.kl_coef, cfg.vf_coef, cfg.max_grad_norm, cfg.whiten_advantages, cfg.sft_steps,
            cfg.num_mini_batches, cfg.model.builtin_model) == (2, 0.05, 0.1, None, True, 250, 1, "tiny-llama")
    assert (cfg.whiten_scope, cfg.critic, cfg.critic_warmup_steps, cfg.num_layers_unfrozen) == \
        ("rollout", "shared", 0, -1)


# ---------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------

def test_precedence_preset_recipe_config_flag(tmp_path):
    """dataclass defaults < --algo preset < --recipe < --config < flags, each shown to win over the one before."""
    # apa-paper sets vf_coef 1, max_new_tokens 128 and learning_rate 1e-6; the apa preset has kl_coef 0
    cfg = parse_args(["--recipe", "apa-paper"])
    assert cfg.max_new_tokens == 128 and cfg.kl_coef == 0.0          # recipe > default, preset > default
    f = tmp_path / "c.yaml"
    f.write_text("algo: ppo-max\nmax_new_tokens: 7\nlearning_rate: 2.0e-5\n")
    cfg = parse_args(["--recipe", "padula-sentiment", "--config", str(f), "--learning_rate", "3e-5"])
    assert cfg.algo == "ppo-max"                                      # config > recipe (algo: ppo)
    assert cfg.kl_coef == 0.0 and PRESETS["ppo-max"]["kl_coef"] != 0.0  # recipe > preset of the config's algo
    assert cfg.ppo_epochs == 4 and PRESETS["ppo-max"]["ppo_epochs"] == 1  # recipe > preset
    assert cfg.max_new_tokens == 7                                    # config > recipe (15)
    assert cfg.learning_rate == 3e-5                                  # flag > config > recipe
    assert parse_args(["--recipe", "padula-sentiment", "--ppo_epochs", "3"]).ppo_epochs == 3   # flag > recipe
    cfg = parse_args(["--algo", "ppo-max", "--recipe", "apa-paper"])  # the recipe's algo beats --algo's preset
    assert cfg.algo == "ppo-max" and cfg.vf_coef == 1.0 and cfg.score_clip == 100.0


def test_recipe_list_prints_names_and_first_comment(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--recipe", "list"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert set(lines) == {"padula-arithmetic", "padula-sentiment", "apa-paper", "ppo-max-paper"}
    assert lines["apa-paper"].startswith("APA (Zhu et al. 2023") and not lines["apa-paper"].startswith("#")


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(ValueError, match=r"recipe: expected one of .*apa-paper.*ppo-max-paper.*got 'ppo-maxx'"):
        parse_args(["--recipe", "ppo-maxx"])


@pytest.mark.parametrize("name", ["padula-arithmetic", "padula-sentiment", "apa-paper", "ppo-max-paper"])
def test_every_shipped_recipe_parses_and_validates(name, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(models, "load", boom)
    cfg = parse_args(["--recipe", name, "--max_steps", "2"])
    values = config.load_recipe(name)
    for k, v in values.items():                                       # every key lands in the config
        got = getattr(cfg.model, k) if hasattr(cfg.model, k) else getattr(cfg, k)
        if k != "max_steps":
            assert got == v, (name, k)
    assert cfg.max_steps == 2


def test_recipes_record_their_sources_values():
    """The values each recipe takes from its paper's code (cited in the YAML)."""
    apa = config.load_recipe("apa-paper")
    assert {k: apa[k] for k in ("per_device_batch_size", "num_mini_batches", "ppo_epochs", "learning_rate",
                                "vf_coef", "max_grad_norm", "score_clip", "max_new_tokens", "top_k")} \
        == dict(per_device_batch_size=8, num_mini_batches=16, ppo_epochs=2, learning_rate=1e-6, vf_coef=1.0,
                max_grad_norm=None, score_clip=100.0, max_new_tokens=128, top_k=50)
    pm = config.load_recipe("ppo-max-paper")
    assert {k: pm[k] for k in ("kl_coef", "learning_rate", "critic_learning_rate", "max_new_tokens", "ppo_epochs",
                               "whiten_advantages", "score_clip", "adv_clip", "temperature", "top_p")} \
        == dict(kl_coef=0.01, learning_rate=5e-7, critic_learning_rate=1.5e-6, max_new_tokens=512, ppo_epochs=1,
                whiten_advantages=False, score_clip=None, adv_clip=None, temperature=0.8, top_p=0.9)
    ps = config.load_recipe("padula-sentiment")
    assert {k: ps[k] for k in ("task", "reward", "per_device_batch_size", "learning_rate", "kl_coef", "ppo_epochs",
                               "max_new_tokens")} \
        == dict(task="sentiment", reward="vader", per_device_batch_size=256, learning_rate=1.41e-5, kl_coef=0.0,
                ppo_epochs=4, max_new_tokens=15)
    assert (ps["min_new_tokens"], ps["reward_input"]) == (4, "prompt_response")   # LengthSampler(4, 16); q + r
    assert apa["stop"] == ["Human:", "human:", "Assistant:", "assistant:"]          # apa_hh.py stop_sequences
    # modeling_sppo.py v_net + make_head; whiten() per training batch; apa_hh.py num_layers_unfrozen=2 (125M)
    assert (apa["critic"], apa["whiten_scope"], apa["num_layers_unfrozen"]) == ("copy", "minibatch", 2)


# ---------------------------------------------------------------------------------------------------
# the padula-arithmetic task and built-in model
# ---------------------------------------------------------------------------------------------------

def test_padula_task_resolves_its_reward_and_warm_start():
    cfg = parse_args(["--task", "padula-arithmetic"])
    assert cfg.reward == "padula-arithmetic" and cfg.sft_steps == 0
    cfg = parse_args(["--recipe", "padula-arithmetic", "--max_steps", "2", "--per_device_batch_size", "8"])
    assert (cfg.task, cfg.reward, cfg.model.builtin_model, cfg.sft_steps, cfg.max_steps) == \
        ("padula-arithmetic", "padula-arithmetic", "padula-gpt2-cpu", 4, 2)
    # their SFT: 256 chains / (batch 8 x accumulation 8) = 4 steps of 64, lr 1e-4 (gpt_math.py)
    assert (cfg.sft_batch_size, cfg.sft_learning_rate) == (64, 1e-4)


@pytest.mark.parametrize("argv,match", [
    (["--task", "padula-arithmetic", "--digits", "2"], "digits"),
    (["--task", "sentiment", "--reward", "padula-arithmetic"], "chain prompts"),
    (["--task", "sentiment", "--builtin_model", "padula-gpt2-cpu"], "WordTokenizer"),
    (["--builtin_model", "gpt2-xl"], "builtin_model: expected one of"),
    (["--reward", "vaders"], r"reward: expected one of \('arithmetic', 'padula-arithmetic', 'vader'\)"),
])
def test_padula_wiring_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo: apa\nlearning_rate: 1.0e-4\nmax_steps: 7\nuse_peft: true\nlora_r: 4\n"
                 "lora_target_modules: [q_proj, v_proj]\n")
    cfg = parse_args(["--config", str(f), "--max_steps", "9"])
    assert cfg.algo == "apa" and cfg.learning_rate == 1e-4 and cfg.max_steps == 9
    assert cfg.model.use_peft and cfg.model.lora_r == 4 and cfg.model.lora_target_modules == ["q_proj", "v_proj"]


def test_yaml_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rat"):
        parse_args(["--config", str(f)])
    f.write_text("max_steps: ten\n")
    with pytest.raises(ValueError, match="max_steps: expected int"):
        parse_args(["--config", str(f)])
    with pytest.raises(ValueError, match="existing YAML"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("argv", [["--learning_rat", "1"], ["--algo", "reinforce"], ["--max_steps", "x"],
                                  ["--kl_estimator", "k4"], ["--top_p", "abc"], ["--optim", "sgd"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--max_steps", "0"], "max_steps"),
    (["--learning_rate", "-1"], "learning_rate"),
    (["--top_p", "1.5"], "top_p"),
    (["--cliprange", "1.2"], "cliprange"),
    (["--dual_clip", "0.5"], "dual_clip"),
    (["--algo", "apa", "--dual_clip", "3"], "APA has no ratio"),
    (["--task", "sentiment", "--reward", "arithmetic"], "arithmetic prompts only"),
    (["--task", "file"], "needs --prompts"),
    (["--reward", "vader", "--reward_model", "."], "give one"),
    (["--ptx_coef", "0.5"], "needs --ptx_file"),
    (["--adaptive_kl", "--kl_coef", "0"], "adaptive_kl"),
    (["--reward", "missing.py:f"], "existing Python file"),
    (["--reward_model", "/no/such/dir"], "reward_model"),
    (["--load_in_4bit"], "use_peft"),                      # a model-flag combination (fastrlhf.models)
    (["--task", "sentiment", "--sft_steps", "3"], "warm-start"),
    (["--gamma", "1.5"], "gamma"),
])
def test_impossible_configs_fail_with_a_message(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


def test_main_fails_before_loading_any_model(monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(train, "load", boom)
    monkeypatch.setattr(models, "load", boom)
    assert train.main(["--algo", "apa", "--dual_clip", "2"]) == 2
    err = capsys.readouterr().err
    assert "fastrlhf train: error: dual_clip" in err


def test_help_lists_every_flag_with_its_default():
    text = build_parser().format_help()
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    names += [f.name for f in dataclasses.fields(models.ModelConfig)]
    for name in names:
        assert f"--{name}" in text, name
    assert text.count("[default:") >= len(names)
    for flag in ("--model_name_or_path", "--learning_rate", "--critic_learning_rate", "--per_device_batch_size",
                 "--gradient_accumulation_steps", "--max_steps", "--max_new_tokens", "--temperature", "--top_k",
                 "--top_p", "--algo", "--task", "--reward", "--output_dir", "--seed", "--save_steps", "--resume",
                 "--report_to", "--entropy_coef", "--batch_entropy_coef", "--kl_coef", "--kl_estimator", "--kl_in",
                 "--adaptive_kl", "--kl_target", "--kl_horizon", "--use_peft", "--lora_r", "--load_in_4bit"):
        assert flag in text


def test_resume_flag_forms(tmp_path):
    from fastrlhf import checkpoint
    with pytest.raises(ValueError, match="no checkpoint"):
        parse_args(["--resume", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="checkpoint directory"):
        parse_args(["--resume", str(tmp_path / "checkpoint-3")])
    checkpoint.save(tmp_path, 3, {}, parse_args(["--output_dir", str(tmp_path)]).to_dict())
    assert parse_args(["--resume", "--output_dir", str(tmp_path)]).resume == "latest"
    assert parse_args(["--resume", str(tmp_path / "checkpoint-3")]).resume == str(tmp_path / "checkpoint-3")


def test_ppo_max_critic_from_reward_model(tmp_path):
    cfg = TrainConfig(algo="ppo-max", task="sentiment", reward_model=str(tmp_path)).resolved()
    assert cfg.model.critic_model_name_or_path == str(tmp_path)
    assert TrainConfig(algo="ppo", task="sentiment", reward_model=str(tmp_path)).resolved() \
        .model.critic_model_name_or_path is None


def test_config_dict_round_trip():
    cfg = parse_args(["--algo", "ppo-max", "--lora_r", "8"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    config.validate(TrainConfig.from_dict(cfg.to_dict()))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning_rate: 1e-5\nalgo: [ppo\nseed: 3\n")
    with pytest.raises(ValueError, match=r"run.yaml: line \d+, column \d+: expected YAML"):
        parse_args(["--config", str(f)])


def test_a_model_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"model_name_or_path: '.*/missing': no such directory$"):
        parse_args(["--model_name_or_path", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match=r"model_name_or_path: .*a directory without a usable config.json"):
        parse_args(["--model_name_or_path", str(tmp_path)])


# ---------------------------------------------------------------------------------------------------
# response endings, reward input, logged samples
# ---------------------------------------------------------------------------------------------------

def test_stop_min_new_tokens_reward_input_flags(tmp_path):
    cfg = parse_args(["--stop", "Human:", "--stop", "Assistant:", "--min_new_tokens", "2"])
    assert cfg.stop == ["Human:", "Assistant:"] and cfg.min_new_tokens == 2 and cfg.log_samples == 4
    assert parse_args([]).stop is None and parse_args([]).reward_input is None
    f = tmp_path / "c.yaml"
    f.write_text("stop: ['###']\n")
    assert parse_args(["--config", str(f)]).stop == ["###"]
    assert parse_args(["--task", "sentiment"]).reward_input == "prompt_response"
    assert parse_args(["--task", "sentiment", "--reward_input", "response"]).reward_input == "response"
    rm = tmp_path / "rm"
    rm.mkdir()
    assert parse_args(["--task", "sentiment", "--reward_model", str(rm)]).reward_input == "prompt_response"


@pytest.mark.parametrize("argv,match", [
    (["--min_new_tokens", "5", "--max_new_tokens", "4"], "min_new_tokens"),
    (["--min_new_tokens", "0"], "min_new_tokens"),
    (["--reward_input", "response"], "reward_input: applies to --reward vader"),
    (["--reward_label", "1"], "reward_label: applies to --reward_model"),
    (["--log_samples", "-1"], "log_samples"),
])
def test_new_flags_refuse_bad_values(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_args(argv)
    with pytest.raises(ValueError, match="stop"):
        config.validate(dataclasses.replace(parse_args([]), stop=["ok", ""]))
