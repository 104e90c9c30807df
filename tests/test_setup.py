"""setup_environment.sh / run.sh behaviour that does not need a fresh install."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_python_too_old_or_missing_is_a_clear_error(tmp_path):
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\nexit 1\n")  # answers the version probe like a too-old interpreter
    fake.chmod(0o755)
    result = subprocess.run([os.path.join(ROOT, "setup_environment.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": str(fake), "VENV": str(tmp_path / "venv")}, timeout=60)
    assert result.returncode == 1
    assert f"PYTHON={fake} is missing or older than 3.10" in result.stderr
    assert not (tmp_path / "venv").exists()  # nothing half-made


def test_run_sh_reuses_an_up_to_date_venv():
    # The stamp written by setup matches, so run.sh goes straight to the command (no pip output).
    stamp = open(os.path.join(ROOT, os.environ.get("VENV", ".venv"), ".finetune-stamp")).read().strip()
    now = subprocess.run("cat requirements.txt requirements-unsloth.txt setup_environment.sh pyproject.toml | cksum | cut -d' ' -f1",
                         shell=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert stamp == now
    result = subprocess.run([os.path.join(ROOT, "run.sh"), "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "==>" not in result.stderr


def test_unsloth_option_refuses_a_machine_without_nvidia(tmp_path):
    """UNSLOTH=1 builds its own environment on Linux + NVIDIA only; elsewhere one clear line and nothing made."""
    if subprocess.run("command -v nvidia-smi", shell=True).returncode == 0:
        return  # on a GPU machine this would start a real install; the refusal is what is tested here
    result = subprocess.run([os.path.join(ROOT, "setup_environment.sh")], capture_output=True, text=True,
                            env={**os.environ, "UNSLOTH": "1", "VENV": str(tmp_path / "venv")}, timeout=60)
    assert result.returncode == 1 and "UNSLOTH=1 needs Linux with an NVIDIA GPU" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_relative_paths_are_relative_to_where_you_run_it(tmp_path):
    """run.sh no longer changes into the repo: a relative OUTPUT_DIR / DATASET resolves from the caller's cwd."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "a ", "completion": "b"}\n{"prompt": "c ", "completion": "d"}\n')
    result = subprocess.run([os.path.join(ROOT, "run.sh"), "train", "--dry-run"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "MODEL": "finetune/tiny-qwen2", "HF_HUB_OFFLINE": "1",
                                                         "DATASET": "d.jsonl", "OUTPUT_DIR": "./quick_test"})
    assert result.returncode == 0, result.stderr[-1500:]
    assert "the run would write ./quick_test" in result.stdout and "d.jsonl" in result.stdout


UNSLOTH_SET = {"unsloth": "2026.10.9", "unsloth-zoo": "2026.10.9", "transformers": "5.17.0", "trl": "1.15.0",
               "datasets": "4.8.5", "huggingface-hub": "1.33.0", "bitsandbytes": "0.50.2"}
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Could not fetch URL",
           "No matching distribution found for unsloth")


def test_unsloth_profile_pins_a_set_that_resolves(tmp_path):
    """UNSLOTH=1 installs torch==2.14.1 then requirements-unsloth.txt; pip must resolve that set as pinned (the old
    profile kept our hub pin and torch 2.15 and ended in ResolutionImpossible). Needs the package registry."""
    import json

    import pytest

    script = open(os.path.join(ROOT, "setup_environment.sh")).read()
    assert 'TORCH="${TORCH_SPEC:-torch==2.14.1}"' in script and "-r requirements-unsloth.txt" in script
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "torch==2.14.1", "-r", "requirements-unsloth.txt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode and any(s in done.stderr for s in OFFLINE):
        pytest.skip("the package registry is not reachable: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    assert {k: got.get(k) for k in UNSLOTH_SET} == UNSLOTH_SET and got["torch"] == "2.14.1"
