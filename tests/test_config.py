import dataclasses

import pytest

from fastrlhf import config, models, train
from fastrlhf.config import PRESETS, TrainConfig, build_parser, parse_args


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


def test_preset_values_from_their_sources():
    assert PRESETS["apa"]["adv_coeff"] == 10.0 and PRESETS["apa"]["kl_coef"] == 0.0
    assert PRESETS["apa"]["score_clip"] == 100.0 and PRESETS["apa"]["cliprange_value"] is None
    assert PRESETS["ppo-max"]["max_grad_norm"] == 1.0 and PRESETS["ppo-max"]["score_scaling"] == "std"
    assert all(PRESETS[a]["gamma"] == 1.0 and PRESETS[a]["lam"] == 0.95 for a in PRESETS)


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
    checkpoint.save(tmp_path, 3, {}, {})
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
