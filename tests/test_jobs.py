"""HF Jobs offload against a local server speaking the Jobs and Hub upload endpoints (tests/hub_server.py), with
the real huggingface_hub client pointed at it through HF_ENDPOINT: the per-flavor preview, the submit request
body (flavor, timeout, command, the token only as a secret), logs, status, cancel, and pull building a run
directory that chat accepts."""
from __future__ import annotations

import json
import os
import threading

import pytest

from tests.conftest import run_cli
from tests.hub_server import HubServer

TOKEN = "hf_write"
QWEN_32B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 64,
            "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 27648, "vocab_size": 152064,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def env_for(run_env, hub, tmp_path, token=TOKEN, **extra) -> dict:
    env = {k: v for k, v in run_env.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), "MODEL": "finetune/tiny-qwen2", **extra})
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def big_model(tiny_model, tmp_path):
    """A 32B model's config with the tiny tokenizer: only config.json and the tokenizer are read before a plan."""
    import shutil

    folder = tmp_path / "qwen-32b-config"
    shutil.copytree(tiny_model, folder)
    (folder / "config.json").write_text(json.dumps(QWEN_32B))
    (folder / "model.safetensors").unlink()
    return str(folder)


def test_local_dry_run_that_does_not_fit_shows_the_cheapest_flavor(big_model, hub, run_env, tmp_path):
    result = run_cli(["train", "--dry-run"], env_for(run_env, hub, tmp_path, MODEL=big_model))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Does not fit here:" in out and "live prices" in out and "auto picks" in out
    assert "t4-small" in out and "does not fit" in out.split("t4-small")[1].splitlines()[0]
    chosen = next(line for line in out.splitlines() if line.startswith("* "))
    assert "a100-large" in chosen and "$" in chosen


def test_remote_preview_submits_nothing_without_yes(hub, run_env, tmp_path):
    result = run_cli(["train", "--remote", "hf-jobs", "--max-steps", "2"], env_for(run_env, hub, tmp_path))
    assert result.returncode == 2 and "add --yes" in result.stderr
    assert "auto picks t4-small" in result.stdout and not hub.jobs


def submit(hub, run_env, tmp_path, *args, **extra):
    env = env_for(run_env, hub, tmp_path, **extra)
    return run_cli(["train", "--remote", "hf-jobs", "--yes", "--max-steps", "2", *args], env), env


def test_submit_sends_the_toolkit_data_and_token_only_as_a_secret(hub, run_env, tmp_path):
    result, _ = submit(hub, run_env, tmp_path, "--flavor", "a10g-small", "--learning-rate", "0.001")
    assert result.returncode == 0, result.stderr[-2000:]
    (job,) = hub.jobs.values()
    spec = job["spec"]
    assert spec["flavor"] == "a10g-small" and isinstance(spec["timeoutSeconds"], int) and spec["timeoutSeconds"] > 900
    assert spec["secrets"] == {"HF_TOKEN": TOKEN}
    assert TOKEN not in json.dumps(spec["environment"]) and TOKEN not in json.dumps(spec["command"])
    assert spec["environment"]["LEARNING_RATE"] == "0.001" and spec["environment"]["MAX_STEPS"] == "2"
    assert spec["environment"]["PUSH_TO_HUB"].startswith("alice/")
    script = spec["command"][-1]
    assert "./run.sh train" in script and "snapshot_download" in script and "DATASET=/workspace/ft/data" in script
    data_repo = next(repo for kind, repo in hub.repos if kind == "dataset")
    files = hub.files(data_repo, "dataset")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert files["code/finetune/train.py"] == open(os.path.join(root, "finetune", "train.py"), "rb").read()
    assert {"code/run.sh", "code/backends/torch_backend.py", "data/train.jsonl", "data/validation.jsonl"} <= set(files)
    assert all(TOKEN.encode() not in b for b in files.values())
    assert hub.repos[("dataset", data_repo)]["private"]
    assert "Submitted job" in result.stdout and job["id"] in result.stdout


def test_no_jobs_access_and_unknown_flavor_are_one_line(hub, run_env, tmp_path):
    result, _ = submit(hub, run_env, tmp_path, token="hf_nojobs")
    assert result.returncode == 2 and "402" in result.stderr and "credits" in result.stderr
    result, _ = submit(hub, run_env, tmp_path, "--flavor", "v100-huge")
    assert result.returncode == 2 and "FLAVOR='v100-huge' is not a single-GPU Jobs flavor" in result.stderr
    result, _ = submit(hub, run_env, tmp_path, token=None)
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr
    assert not hub.jobs


def test_logs_status_cancel_and_pull_a_finished_job(hub, run_env, tmp_path, tiny_model):
    finished = tmp_path / "remote-run"
    train = run_cli([], {**run_env, "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": "2", "EVAL_GENERATIONS": "0",
                         "EVAL_ROWS": "4", "OUTPUT_DIR": str(finished)})
    assert train.returncode == 0, train.stderr[-1500:]

    def fake_job(job):  # what the job does remotely: log steps, push the run directory, complete
        def run():
            hub.set_job_stage(job["id"], "RUNNING")
            hub.add_job_log(job["id"], "  [######      ] step 1/2 | loss 6.9000 | 1,200 tok/s | ETA 0:00:01 | mem 1 GB")
            hub.add_job_log(job["id"], "  [############] step 2/2 | loss 6.5000 | 1,200 tok/s | ETA 0:00:00 | mem 1 GB")
            repo = job["spec"]["labels"]["finetune-result"].replace("--", "/")
            hub.add_repo(repo, {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}, private=True)
            hub.set_job_stage(job["id"], "COMPLETED")
        threading.Thread(target=run).start()
    hub.on_job_created(fake_job)
    result, env = submit(hub, run_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (job_id,) = hub.jobs
    logs = run_cli(["jobs", "logs", job_id, "--follow"], env)
    assert logs.returncode == 0 and "step 2/2 | loss 6.5000" in logs.stdout
    status = run_cli(["jobs", "status", job_id], env)
    assert "COMPLETED" in status.stdout and "step 2/2, loss 6.5000" in status.stdout and "cost so far" in status.stdout
    listed = run_cli(["jobs", "list"], env)
    assert job_id in listed.stdout and "COMPLETED" in listed.stdout
    out = tmp_path / "pulled"
    pulled = run_cli(["jobs", "pull", job_id, "--out", str(out)], env)
    assert pulled.returncode == 0, pulled.stderr
    record = json.load(open(out / "run.json"))
    assert record["run_dir"] == str(out) and record["pulled"]["job"] == job_id
    chat = run_cli(["chat", str(out), "--prompt", "Maria, 30, lives in Oslo.", "--max-new-tokens", "4"], env)
    assert chat.returncode == 0 and chat.stdout.endswith("\n"), chat.stderr[-1500:]  # the tiny model says little
    cancel = run_cli(["jobs", "cancel", job_id], env)
    assert cancel.returncode == 0 and hub.calls("POST", f"/jobs/alice/{job_id}/cancel")


def test_a_failed_job_shows_its_last_lines_and_pull_refuses(hub, run_env, tmp_path):
    def fail(job):
        hub.set_job_stage(job["id"], "RUNNING")
        hub.add_job_log(job["id"], "error: MODEL=x: could not be loaded")
        hub.set_job_stage(job["id"], "ERROR", "exit code 2")
    hub.on_job_created(fail)
    result, env = submit(hub, run_env, tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    (job_id,) = hub.jobs
    status = run_cli(["jobs", "status", job_id], env)
    assert "ERROR" in status.stdout and "could not be loaded" in status.stdout
    pulled = run_cli(["jobs", "pull", job_id], env)
    assert pulled.returncode == 2 and "is ERROR, nothing to pull" in pulled.stderr and "could not be loaded" in pulled.stderr
    unknown = run_cli(["jobs", "status", "0123456789abcdef01234567"], env)
    assert unknown.returncode == 2 and "no such job" in unknown.stderr
    hub.set_job_stage(job_id, "ERROR", "Job timeout")
    timed_out = run_cli(["jobs", "pull", job_id], env)
    assert timed_out.returncode == 2 and "ran past its timeout" in timed_out.stderr, timed_out.stderr
