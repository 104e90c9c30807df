"""Shared fixtures: the tiny model is built once per test session into a private cache, and every
subprocess runs offline (HF_HUB_OFFLINE=1), as CI does."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("finetune-cache"))
    os.environ["FINETUNE_CACHE"] = path  # in-process callers of tiny.ensure() use it too
    return path


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> str:
    from finetune import tiny

    return tiny.ensure(cache_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def run_env(cache_dir):
    """Environment for CLI subprocesses: offline, private cache, none of the user's overrides."""
    from finetune.config import FIELDS, env_name

    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}
    env.update(FINETUNE_CACHE=cache_dir, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], env: dict, cwd: str = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
