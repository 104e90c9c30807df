"""Config precedence (flag > env > YAML > plan > built-in) and one-line errors for bad values."""
from __future__ import annotations

import pytest

from finetune.config import Config, resolve
from finetune.errors import UserError
from tests.conftest import run_cli


def test_builtin_defaults_when_nothing_given():
    cfg, sources = resolve({}, env={})
    assert cfg == Config()
    assert set(sources.values()) == {"default"}


def test_flag_beats_env_beats_yaml(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch_size: 2\nlora_r: 4\nlearning_rate: 0.001\n")
    env = {"BATCH_SIZE": "3", "LORA_R": "6"}
    cfg, sources = resolve({"config": str(yaml_file), "batch_size": "5"}, env=env)
    assert (cfg.batch_size, sources["batch_size"]) == (5, "cli")          # flag > env > yaml
    assert (cfg.lora_r, sources["lora_r"]) == (6, "env")                  # env > yaml
    assert (cfg.learning_rate, sources["learning_rate"]) == (0.001, f"yaml:{yaml_file}")
    assert sources["seed"] == "default"


def test_plan_fills_only_what_nobody_set(tiny_model):
    from finetune import hardware, methods, models, plan as planner
    from finetune.train import resolved, settings_table

    model = models.info_from_config("tiny", tiny_model, models._read_config(tiny_model))
    hw = hardware.detect()
    cfg, sources = resolve({}, env={"GRAD_ACCUM": "3", "DTYPE": "auto"})
    plan = planner.make(cfg, hw, model, "torch", "cpu", n_train_rows=100, mean_tokens=80)
    final = resolved(cfg, plan, methods.get("sft"), None)
    settings = settings_table(cfg, final, sources)
    assert settings["batch_size"]["source"] == "plan" and settings["batch_size"]["value"] == plan.batch_size
    assert settings["grad_accum"] == {"value": 3, "source": "env"}      # env beats the plan
    assert plan.grad_accum == 3
    # every auto setting is recorded with what the planner chose, even one set to "auto" explicitly
    assert settings["dtype"] == {"value": plan.dtype, "source": "plan"} and plan.dtype in ("fp32", "bf16")
    assert settings["gradient_checkpointing"]["value"] in ("on", "off")
    assert all(v["value"] not in (None, "auto") for k, v in settings.items()
               if k in ("batch_size", "grad_accum", "max_steps", "eval_steps", "save_steps", "quantize"))


@pytest.mark.parametrize("env,needle", [
    ({"BATCH_SIZE": "abc"}, "BATCH_SIZE='abc'"),
    ({"MAX_STEPS": "-3"}, "MAX_STEPS='-3'"),
    ({"BACKEND": "foo"}, "BACKEND='foo'"),
    ({"LEARNING_RATE": "fast"}, "LEARNING_RATE='fast'"),
    ({"LORA_DROPOUT": "2"}, "LORA_DROPOUT='2'"),
    ({"DTYPE": "fp8"}, "DTYPE='fp8'"),
    ({"METHOD": "ppo"}, "METHOD='ppo'"),
])
def test_bad_env_value_is_one_line_exit_2(env, needle, run_env):
    result = run_cli(["--dry-run"], {**run_env, **env})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_values_name_what_is_allowed():
    with pytest.raises(UserError, match=r"BACKEND='foo' is not valid: choose one of auto, torch"):
        resolve({}, env={"BACKEND": "foo"}, known_backends=("torch",))
    with pytest.raises(UserError, match=r"MAX_STEPS='-3' is not valid: expected >= 1"):
        resolve({}, env={"MAX_STEPS": "-3"})
    with pytest.raises(UserError, match=r"--batch-size='x' is not valid: expected a whole number"):
        resolve({"batch_size": "x"}, env={})


def test_unknown_yaml_key_exit_2(tmp_path, run_env):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("batch_size: 2\nbatchsize: 4\n")
    result = run_cli(["--config", str(yaml_file), "--dry-run"], run_env)
    assert result.returncode == 2
    assert f"{yaml_file}: unknown key 'batchsize'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_yaml_value_and_syntax(tmp_path):
    bad_value = tmp_path / "v.yaml"
    bad_value.write_text("max_steps: -1\n")
    with pytest.raises(UserError, match=r"v.yaml: max_steps=-1 is not valid"):
        resolve({"config": str(bad_value)}, env={})
    bad_syntax = tmp_path / "s.yaml"
    bad_syntax.write_text("batch_size: [1, 2\n")
    with pytest.raises(UserError, match=r"s.yaml: line \d+ is not valid YAML"):
        resolve({"config": str(bad_syntax)}, env={})


def test_auto_words_mean_planner_decides():
    cfg, sources = resolve({}, env={"BATCH_SIZE": "auto", "MAX_STEPS": ""})
    assert cfg.batch_size is None and cfg.max_steps is None
    assert sources["batch_size"] == "env" and sources["max_steps"] == "default"


def test_dry_run_prints_sources_and_plan(run_env):
    result = run_cli(["--dry-run", "--lora-r", "8"], {**run_env, "BATCH_SIZE": "2", "MODEL": "finetune/tiny-qwen2"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "lora_r                   8" in out and "<- cli" in out
    assert "batch_size               2" in out and "<- env" in out
    assert "predicted peak" in out and "time estimate" in out
