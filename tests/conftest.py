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


# The slowest tests on the tiny model (each >= 8 s in a full run here, `./run.sh test --durations=60`).
SLOW_TESTS: set[str] = {
    "tests/test_architectures.py::test_mlx_trains_every_architecture_mlx_lm_can_load",
    "tests/test_architectures.py::test_torch_trains_every_architecture_and_its_adapter_loads_in_peft",
    "tests/test_check_data.py::test_default_model_offline_falls_back_to_the_offline_model_with_banner",
    "tests/test_config.py::test_dry_run_prints_sources_and_plan",
    "tests/test_data.py::test_alpaca_and_sharegpt_files_train_with_no_flags",
    "tests/test_data.py::test_tool_calling_file_trains_and_check_data_names_the_form",
    "tests/test_end_to_end.py::test_all_outputs_exist",
    "tests/test_end_to_end.py::test_output_dir_is_never_overwritten",
    "tests/test_end_to_end.py::test_report_to_trackio_logs_locally",
    "tests/test_export.py::test_a_tokenizer_llama_cpp_does_not_know_is_refused_cleanly",
    "tests/test_export.py::test_chat_answers_once_and_keeps_history_interactively",
    "tests/test_export.py::test_chat_uses_the_data_system_prompt_unless_told_otherwise",
    "tests/test_export.py::test_greedy_ids_identical_in_peft_merged_and_f16_gguf",
    "tests/test_export.py::test_mlx_trained_adapter_to_merged_to_gguf",
    "tests/test_export.py::test_quantized_ggufs_still_answer_in_valid_json",
    "tests/test_export.py::test_refusals_are_one_line_and_leave_no_half_written_export",
    "tests/test_hub.py::test_push_adapter_uploads_files_and_a_model_card_without_the_token",
    "tests/test_hub.py::test_push_to_hub_at_the_end_of_train",
    "tests/test_jobs.py::test_a_failed_job_shows_its_last_lines_and_pull_refuses",
    "tests/test_jobs.py::test_different_settings_get_different_result_repos_and_the_job_pins_huggingface_hub",
    "tests/test_jobs.py::test_live_flavors_missing_from_the_fallback_table_are_planned_and_priced",
    "tests/test_jobs.py::test_local_dry_run_that_does_not_fit_shows_the_cheapest_flavor",
    "tests/test_jobs.py::test_logs_status_cancel_and_pull_a_finished_job",
    "tests/test_jobs.py::test_no_jobs_access_and_unknown_flavor_are_one_line",
    "tests/test_jobs.py::test_pull_of_a_cancelled_job_says_so_and_keeps_what_it_pushed",
    "tests/test_methods.py::test_bad_preference_rows_and_settings",
    "tests/test_methods.py::test_check_data_and_train_agree_on_the_shipped_samples",
    "tests/test_methods.py::test_dpo_chained_after_sft",
    "tests/test_methods.py::test_grpo_with_a_user_reward_file",
    "tests/test_methods.py::test_grpo_with_no_eval_generations_trains_and_says_there_is_no_evaluation",
    "tests/test_methods.py::test_kto_trains_on_thumbs_up_and_down_rows",
    "tests/test_methods.py::test_orpo_trains_from_the_base_model_in_one_stage",
    "tests/test_methods.py::test_rpo_adds_the_chosen_nll_to_the_dpo_loss",
    "tests/test_mlx_backend.py::test_run_writes_every_output",
    "tests/test_nonfinite.py::test_a_run_whose_gradients_are_never_finite_stops_failed_with_its_adapter",
    "tests/test_offline_model.py::test_default_model_unreachable_falls_back_to_the_offline_model",
    "tests/test_qlora_cpu.py::test_cpu_4bit_run_trains_the_real_model_and_its_adapter_loads_in_peft",
    "tests/test_setup.py::test_unsloth_profile_pins_a_set_that_resolves",
    "tests/test_survive.py::test_a_library_save_failing_as_runtime_error_is_one_line_and_keeps_the_last_checkpoint",
    "tests/test_survive.py::test_disk_full_while_checkpointing_keeps_the_last_whole_checkpoint",
    "tests/test_survive.py::test_injected_out_of_memory_halves_the_micro_batch_and_continues",
    "tests/test_survive.py::test_interrupt_saves_a_loadable_adapter_and_says_how_to_resume",
    "tests/test_survive.py::test_resume_refuses_changed_settings_and_finished_runs",
    "tests/test_survive.py::test_resuming_a_run_recorded_before_a_setting_existed_keeps_how_it_trained",
    "tests/test_survive.py::test_sigkill_at_a_random_step_then_resume_reaches_the_same_loss",
    "tests/test_survive.py::test_two_runs_in_the_same_second_and_outputs_land_where_you_are",
    "tests/test_torch_backend.py::test_dora_trains_on_cpu",
}


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
