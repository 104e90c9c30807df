"""setup_environment.sh / run.sh behaviour that does not need a fresh install."""
from __future__ import annotations

import os
import subprocess

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
    now = subprocess.run("cat requirements.txt setup_environment.sh pyproject.toml | cksum | cut -d' ' -f1",
                         shell=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert stamp == now
    result = subprocess.run([os.path.join(ROOT, "run.sh"), "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "==>" not in result.stderr
