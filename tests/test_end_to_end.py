"""`./run.sh` end to end offline: the default model is unreachable, so the real offline model (SmolLM2-135M-Instruct)
trains, a short run, and must learn the sample task's format; then the adapter in plain PEFT. A slow test."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, run_cli

OUTPUT_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run.json", "metrics.jsonl",
                "training_log.txt", "loss.png", "report.md")


@pytest.fixture(scope="module")
def default_run(real_run):
    return real_run


def test_all_outputs_exist(default_run):
    out, _, _ = default_run
    for name in OUTPUT_FILES:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "loss.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_banner_says_the_offline_model_stands_in(default_run):
    _, result, _ = default_run
    banner = [line for line in result.stdout.splitlines() if line.startswith("!")]
    assert banner and all(len(line) <= 80 for line in banner)
    assert "cannot be reached" in result.stdout and "smollm2-135m-offline" in result.stdout


def test_the_real_model_learns_the_format_and_run_json_records_it(default_run):
    out, _, _ = default_run
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["status"] == "completed"
    before, after = run["evaluation"]["before"], run["evaluation"]["after"]
    assert after["eval_loss"] < before["eval_loss"]
    assert after["metrics"]["valid_format"] > before["metrics"]["valid_format"]
    assert run["settings"]["max_steps"] == {"value": 12, "source": "env"}
    assert run["settings"]["dtype"]["source"] == "plan" and run["config"]["dtype"] in ("fp32", "bf16")
    assert run["result"]["steps"] == 12 and run["result"]["tokens_per_s"] > 0
    assert run["result"]["peak_memory_gb"] > 0 and run["result"]["predicted_peak_gb"] > 0
    assert run["model"]["name"] == "smollm2-135m-offline" and run["config"]["model"] == "smollm2-135m-offline"
    assert run["hardware"]["cpu_cores"] >= 1 and "torch" in run["versions"]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("loss" in m for m in metrics) and any("eval_loss" in m for m in metrics)


def test_report_has_before_and_after_columns(default_run):
    out, _, _ = default_run
    report = open(os.path.join(out, "report.md")).read()
    assert "| metric | base model | with adapter |" in report
    assert "| eval loss (per trained token) |" in report and "exact_match" in report and "valid_format" in report
    assert report.count("Base model:") == 8 and report.count("With adapter:") == 8


def test_training_log_has_progress(default_run):
    out, _, _ = default_run
    log = open(os.path.join(out, "training_log.txt")).read()
    assert "step 12/12" in log and "tok/s" in log and "ETA" in log


def test_adapter_loads_with_plain_peft_and_changes_logits(default_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, base_path = default_run
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Maria lives in Lisbon", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        tuned_logits = tuned(ids).logits
    assert (tuned_logits - base_logits).abs().max().item() > 1e-3


def test_output_dir_is_never_overwritten(default_run, run_env):
    out, _, _ = default_run
    before = sorted(os.listdir(out))
    result = run_cli([], {**run_env, "OUTPUT_DIR": out, "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": "1"})
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert sorted(os.listdir(out)) == before


def test_named_model_that_cannot_be_fetched_is_an_error(run_env, tmp_path):
    result = run_cli([], {**run_env, "MODEL": "someone/does-not-exist", "OUTPUT_DIR": str(tmp_path / "r")})
    assert result.returncode == 2
    assert "MODEL=someone/does-not-exist: could not be loaded" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_bad_data_fails_before_model_loads(run_env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n{oops\n')
    result = run_cli([], {**run_env, "DATASET": str(bad), "MODEL": "someone/never-fetched", "OUTPUT_DIR": str(tmp_path / "r")},
                     timeout=60)
    assert result.returncode == 2 and f"{bad}:2: not valid JSON" in result.stderr
    assert "MODEL" not in result.stderr and not (tmp_path / "r").exists()


def test_report_to_trackio_logs_locally(run_env, tmp_path):
    import sqlite3

    trackio_dir = tmp_path / "trackio"
    env = {**run_env, "REPORT_TO": "trackio", "TRACKIO_DIR": str(trackio_dir), "MODEL": "finetune/tiny-qwen2",
           "MAX_STEPS": "4", "LOGGING_STEPS": "1", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "4",
           "OUTPUT_DIR": str(tmp_path / "r")}
    result = run_cli([], env)
    assert result.returncode == 0, result.stderr[-2000:]
    db = sqlite3.connect(trackio_dir / "finetune.db")
    logged = [str(row[0]) for row in db.execute("select metrics from metrics")]
    assert any('"train/loss"' in m for m in logged) and any('"eval/loss"' in m for m in logged)


def test_hub_dataset_that_cannot_be_loaded_is_a_clear_error(run_env, tmp_path):
    result = run_cli(["--dry-run"], {**run_env, "DATASET": "someone/no-such-dataset", "MODEL": "finetune/tiny-qwen2"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: DATASET=someone/no-such-dataset: not a local path and could not be loaded")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_rows_on_a_model_without_chat_template_is_a_clear_error(run_env, tiny_model, tmp_path):
    import shutil

    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli(["--dry-run"], {**run_env, "MODEL": str(model_dir)})
    assert result.returncode == 2 and "has no chat template" in result.stderr
    assert "Traceback" not in result.stderr
