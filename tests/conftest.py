"""Shared fixtures: the tiny model is built once per test session into a private cache, and every
subprocess runs offline (HF_HUB_OFFLINE=1), as CI does."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from backends.mlx_blas import use_openblas

use_openblas()  # in-process MLX tests (mlx-lm loads, parity checks) get OpenBLAS too: backends/mlx_blas.py
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MLX = importlib.util.find_spec("mlx") is not None
MLX_MODULES = ("test_mlx_backend", "test_mlx_blas")


def pytest_collection_modifyitems(config, items):
    """MLX tests skip, saying why, where mlx is not installed (Linux + NVIDIA); the rest of their modules still run.
    Tests on the real offline model, and those listed in SLOW_TESTS, are `slow`: `-m "not slow"` is the quick loop."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not HAS_MLX and (item.module.__name__.rsplit(".", 1)[-1] in MLX_MODULES or params.get("backend") == "mlx"
                            or item.get_closest_marker("mlx")):
            item.add_marker(pytest.mark.skip(reason="mlx is not installed here (setup installs it on Apple Silicon "
                                                    "and on Linux without an NVIDIA GPU)"))
        if "offline_model" in item.fixturenames or "real_run" in item.fixturenames or \
                item.nodeid.split("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


# The slowest tests on the tiny model (each > ~10 s here; from `./run.sh test --durations=0`).
SLOW_TESTS: set[str] = set()


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
def offline_model(cache_dir) -> str:
    """SmolLM2-135M-Instruct converted from the registry package's GGUF, once per test session (~40 s)."""
    from finetune import offline_model

    return offline_model.ensure(cache_dir)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, offline_model, cache_dir):
    """`./run.sh` as a user runs it offline (the default model is unreachable, so the offline model trains),
    shortened to 12 steps x 8 rows at lr 1e-3 with 8 held-out generations: (run dir, result, base model dir)."""
    out = str(tmp_path_factory.mktemp("runs") / "quick_test")
    from finetune.config import FIELDS, env_name

    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}
    env.update(FINETUNE_CACHE=cache_dir, HF_HUB_OFFLINE="1", MAX_STEPS="12", BATCH_SIZE="8", GRAD_ACCUM="1",
               LEARNING_RATE="0.001", OUTPUT_DIR=out, EVAL_GENERATIONS="8", EVAL_ROWS="16", MAX_NEW_TOKENS="32")
    result = subprocess.run([os.path.join(ROOT, "run.sh")], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result, offline_model


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


def fit(session, rows, steps: int, lr: float, batch: int = 4) -> list[float]:
    """Train a loaded backend session for `steps` SFT steps on `rows` (in order), as the loop would; the losses."""
    from finetune.methods import Batch

    losses = []
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        stats = session.train_step(Batch("sft", chunk, float(sum(r.n_trained for r in chunk))), batch, lr)
        losses.append(stats["loss"])
    session.model.eval()
    return losses


def eval_loss(session, rows) -> float:
    from finetune.methods import sft

    return sft.eval_loss(session, rows)
