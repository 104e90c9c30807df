"""`finetune push` against a local server that speaks the Hub's repo-create / preupload / commit API, with the
real huggingface_hub client pointed at it through HF_ENDPOINT (tests/hub_server.py). What arrived is checked:
the files, the model card, and that the token is in none of them."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli
from tests.hub_server import HubServer

TOKEN = "hf_write"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    from finetune.config import FIELDS, env_name

    out = str(tmp_path_factory.mktemp("push-runs") / "run")
    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}
    env.update(FINETUNE_CACHE=cache_dir, HF_HUB_OFFLINE="1", MODEL="finetune/tiny-qwen2", MAX_STEPS="3",
               EVAL_GENERATIONS="2", EVAL_ROWS="4", OUTPUT_DIR=out)
    result = run_cli([], env)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def hub_env(run_env, hub, tmp_path, token=TOKEN) -> dict:
    env = {k: v for k, v in run_env.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    if token:
        env["HF_TOKEN"] = token
    return env


def test_push_adapter_uploads_files_and_a_model_card_without_the_token(tiny_run, hub, run_env, tmp_path):
    result = run_cli(["push", tiny_run, "--repo", "alice/tiny-sft", "--private"], hub_env(run_env, hub, tmp_path))
    assert result.returncode == 0, result.stderr
    files = hub.files("alice/tiny-sft")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run.json", "report.md",
            "README.md"} <= set(files)
    assert hub.repos[("model", "alice/tiny-sft")]["private"] is True
    card = files["README.md"].decode()
    assert "base_model:" in card and "| eval loss (per trained token) |" in card
    assert "PeftModel.from_pretrained" in card and "mlx_lm.generate" in card and "ollama create" in card
    assert all(TOKEN.encode() not in data for data in files.values())
    assert json.loads(files["run.json"])["run_name"] == json.load(open(os.path.join(tiny_run, "run.json")))["run_name"]
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("args,token,needle", [
    (["--repo", "not a repo"], TOKEN, "--repo='not a repo' is not a Hub repo id"),
    (["--repo", "alice/x"], None, "no Hugging Face token"),
    (["--repo", "alice/x"], "hf_read", "no write access"),
    (["--repo", "alice/x"], "hf_unknown", "refused the token"),
])
def test_push_refusals_are_one_line(tiny_run, hub, run_env, tmp_path, args, token, needle):
    result = run_cli(["push", tiny_run, *args], hub_env(run_env, hub, tmp_path, token))
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert ("model", "alice/x") not in hub.repos or list(hub.files("alice/x")) == [".gitattributes"]


def test_push_to_an_unreachable_hub_and_from_a_non_run_dir(tiny_run, run_env, tmp_path):
    env = {**run_env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "h")}
    env.pop("HF_HUB_OFFLINE")
    result = run_cli(["push", tiny_run, "--repo", "alice/x"], env)
    assert result.returncode == 2 and "cannot be reached" in result.stderr and "Traceback" not in result.stderr
    result = run_cli(["push", str(tmp_path), "--repo", "alice/x"], env)
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_push_to_hub_at_the_end_of_train(hub, run_env, tmp_path):
    env = {**hub_env(run_env, hub, tmp_path), "HF_HUB_OFFLINE": "0", "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": "2",
           "EVAL_GENERATIONS": "0", "EVAL_ROWS": "4", "PUSH_TO_HUB": "alice/after-train", "OUTPUT_DIR": str(tmp_path / "r")}
    result = run_cli([], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter_model.safetensors" in hub.files("alice/after-train")
    run = json.load(open(tmp_path / "r" / "run.json"))
    assert TOKEN not in json.dumps(run) and TOKEN not in open(tmp_path / "r" / "training_log.txt").read()
