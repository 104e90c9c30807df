"""HF Jobs offload against a local server speaking the Jobs and Hub upload endpoints (tests/hub_server.py), with
the real huggingface_hub client pointed at it through HF_ENDPOINT: the per-flavor preview, the submit request
body (flavor, timeout, command, the token only as a secret), logs, status, cancel, and pull building a run
directory that chat accepts: the job's own commit, and what a stopped job pushed."""
from __future__ import annotations

import json
import os
import threading

import pytest

from finetune import remote
from finetune.hub import SUBMISSION
from tests.conftest import ROOT, run_cli
from tests.hub_server import HARDWARE, HubServer, _hw

TOKEN = "hf_write"
QWEN_32B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120, "num_hidden_layers": 64,
            "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 27648, "vocab_size": 152064,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir, tiny_model) -> str:
    """A finished local run (2 steps of the tiny model): what a job pushes."""
    from finetune.config import FIELDS, env_name

    out = str(tmp_path_factory.mktemp("remote") / "remote-run")
    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}
    env.update(FINETUNE_CACHE=cache_dir, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", MODEL="finetune/tiny-qwen2",
               MAX_STEPS="2", EVAL_GENERATIONS="0", EVAL_ROWS="4", OUTPUT_DIR=out)
    train = run_cli([], env)
    assert train.returncode == 0, train.stderr[-1500:]
    return out


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
    assert spec["environment"]["FINETUNE_EXPECT_CUDA"] == "1"  # no usable GPU there: stop, never train on its CPU
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
    assert result.returncode == 2 and "FLAVOR='v100-huge' is not a GPU Jobs flavor" in result.stderr
    result, _ = submit(hub, run_env, tmp_path, token=None)
    assert result.returncode == 2 and "no Hugging Face token" in result.stderr
    assert not hub.jobs


def job_pushes(hub, env, run_dir, stage="COMPLETED"):
    """Each job does what it does remotely: log steps, push the run directory through the real `push` code with
    the submission the launcher gave it (as the job's train does), then end in `stage`."""
    def fake_job(job):
        def run():
            hub.set_job_stage(job["id"], "RUNNING")
            hub.add_job_log(job["id"], "  [######      ] step 1/2 | loss 6.9000 | 1,200 tok/s | ETA 0:00:01 | mem 1 GB")
            hub.add_job_log(job["id"], "  [############] step 2/2 | loss 6.5000 | 1,200 tok/s | ETA 0:00:00 | mem 1 GB")
            job_env, ended = job["spec"]["environment"], "ERROR"
            try:  # the job always ends, so `logs --follow` returns whatever happened here
                pushed = run_cli(["push", run_dir, "--repo", job_env["PUSH_TO_HUB"], "--private"],
                                 {**env, SUBMISSION: job_env.get(SUBMISSION, "")})
                ended = stage if pushed.returncode == 0 else "ERROR"
            finally:
                hub.set_job_stage(job["id"], ended)
        threading.Thread(target=run).start()
    hub.on_job_created(fake_job)


def test_logs_status_cancel_and_pull_a_finished_job(hub, run_env, tmp_path, finished):
    job_pushes(hub, env_for(run_env, hub, tmp_path), finished)
    result, env = submit(hub, run_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (job_id,) = hub.jobs
    logs = run_cli(["jobs", "logs", job_id, "--follow"], env)
    assert logs.returncode == 0 and "step 2/2 | loss 6.5000" in logs.stdout
    status = run_cli(["jobs", "status", job_id], env)
    assert "COMPLETED" in status.stdout and "step 2/2, loss 6.5000" in status.stdout and "cost so far" in status.stdout
    listed = run_cli(["jobs", "list"], env)
    assert job_id in listed.stdout and "COMPLETED" in listed.stdout
    repo = hub.jobs[job_id]["spec"]["environment"]["PUSH_TO_HUB"]
    job_commit = hub.commits(repo)[-1]["oid"]
    hub.add_commit(repo, {"report.md": "a later push to main\n"})  # pull takes the job's commit, not main
    out = tmp_path / "pulled"
    pulled = run_cli(["jobs", "pull", job_id, "--out", str(out)], env)
    assert pulled.returncode == 0, pulled.stderr
    assert (out / "report.md").read_bytes() == open(os.path.join(finished, "report.md"), "rb").read()
    record = json.load(open(out / "run.json"))
    assert record["run_dir"] == str(out) and record["pulled"]["job"] == job_id
    assert record["pulled"]["revision"] == job_commit and record["pulled"]["partial"] is False
    chat = run_cli(["chat", str(out), "--prompt", "Maria, 30, lives in Oslo.", "--max-new-tokens", "4"], env)
    assert chat.returncode == 0 and chat.stdout.endswith("\n"), chat.stderr[-1500:]  # the tiny model says little
    cancel = run_cli(["jobs", "cancel", job_id], env)
    assert cancel.returncode == 0 and hub.calls("POST", f"/jobs/alice/{job_id}/cancel")


def test_pull_of_a_cancelled_job_says_so_and_keeps_what_it_pushed(hub, run_env, tmp_path, finished):
    job_pushes(hub, env_for(run_env, hub, tmp_path), finished, stage="CANCELED")
    result, env = submit(hub, run_env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (job_id,) = hub.jobs
    assert run_cli(["jobs", "logs", job_id, "--follow"], env).returncode == 0  # returns once the job has ended
    out = tmp_path / "partial"
    pulled = run_cli(["jobs", "pull", job_id, "--out", str(out)], env)
    assert pulled.returncode == 2 and "Traceback" not in pulled.stderr, pulled.stderr
    said = pulled.stderr.strip().splitlines()[-1]  # after the client's download progress bars
    assert said.startswith(f"error: job {job_id} is CANCELED") and "partial" in said
    record = json.load(open(out / "run.json"))
    assert record["pulled"]["partial"] is True and record["pulled"]["stage"] == "CANCELED"
    assert (out / "adapter_model.safetensors").is_file()


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
    hub.set_job_stage(job_id, "CANCELED")
    cancelled = run_cli(["jobs", "pull", job_id], env)
    assert cancelled.returncode == 2 and f"job {job_id} is CANCELED, nothing to pull" in cancelled.stderr
    assert "wait" not in cancelled.stderr  # a stopped job will not push later


def test_different_settings_get_different_result_repos_and_the_job_pins_huggingface_hub(hub, run_env, tmp_path):
    first, _ = submit(hub, run_env, tmp_path, "--learning-rate", "0.001")
    second, _ = submit(hub, run_env, tmp_path, "--learning-rate", "0.002")
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-1500:]
    jobs = list(hub.jobs.values())
    repos = [j["spec"]["environment"]["PUSH_TO_HUB"] for j in jobs]
    assert repos[0] != repos[1] and all(r.startswith("alice/") for r in repos)
    assert jobs[0]["spec"]["labels"]["finetune-submission"] != jobs[1]["spec"]["labels"]["finetune-submission"]
    pin = next(line.split("#")[0].strip() for line in open(os.path.join(ROOT, "requirements.txt"))
               if line.startswith("huggingface_hub"))
    assert pin.startswith("huggingface_hub==") and f"pip install -q {pin} " in jobs[0]["spec"]["command"][-1]


def test_gpu_names_get_their_compute_capability():
    assert remote.capability("RTX PRO 6000 Blackwell") == "12.0" and remote.capability("NVIDIA L40S") == "8.9"
    assert remote.capability("L4") == "8.9" and remote.capability("A10G") == "8.6"
    assert remote.capability("A100") == "8.0"
    assert remote.capability("H100") == "9.0" and remote.capability("B200") == "10.0"
    assert remote.capability("Z9000") is None


def _several(entry: dict, count: str) -> dict:
    return {**entry, "accelerator": {**entry["accelerator"], "quantity": count}}


# Live flavors the fallback table lacks (prices here are made up for the test).
LIVE = HARDWARE + [_hw("rtx-pro-6000", "RTX PRO 6000", "8 vCPU", "64 GB", 2.70, "RTX PRO 6000 Blackwell", "96 GB"),
                   _hw("h100", "Nvidia H100", "24 vCPU", "250 GB", 4.50, "H100", "80 GB"),
                   _hw("zz-gpu", "Mystery GPU", "4 vCPU", "30 GB", 0.90, "Z9000", "16 GB"),
                   _several(_hw("rtx-pro-6000x2", "2x RTX PRO", "16 vCPU", "128 GB", 0.02, "RTX PRO 6000",
                                "192 GB"), "2"),
                   _several(_hw("a100-pair", "2x A100", "24 vCPU", "284 GB", 0.03, "A100", "160 GB"), "2")]


def test_live_flavors_missing_from_the_fallback_table_are_planned_and_priced(run_env, tmp_path):
    with HubServer(hardware=LIVE) as hub:
        env = env_for(run_env, hub, tmp_path)
        preview = run_cli(["train", "--remote", "hf-jobs", "--dry-run", "--max-steps", "2", "--flavor", "rtx-pro-6000"],
                          env)
        assert preview.returncode == 0, preview.stderr[-1500:]
        lines = preview.stdout.splitlines()
        header = next(line for line in lines if "flavor" in line and "$/h" in line)
        price_end = header.index("$/h") + 3
        for name, price in (("t4-small", "0.40"), ("rtx-pro-6000", "2.70"), ("h100", "4.50"), ("zz-gpu", "0.90")):
            row = next(line for line in lines if line[2:].startswith(name + " "))
            assert row[:price_end].endswith(" " + price), (row, header)  # columns line up under long GPU names
        assert "bf16" in next(x for x in lines if x.startswith("* rtx-pro-6000 "))  # chosen, planned with its bf16
        unknown = next(x for x in lines if x[2:].startswith("zz-gpu "))
        assert "fp16" in unknown and "Z9000" in preview.stdout and "no known compute capability" in preview.stdout
        pair = next(x for x in lines if x[2:].startswith("a100-pair "))  # several GPUs: VRAM per GPU, NPROC there
        assert "2x A100" in pair and " 80G " in pair
        assert "2x RTX PRO 6000" in next(x for x in lines if x[2:].startswith("rtx-pro-6000x2 "))
        result = run_cli(["train", "--remote", "hf-jobs", "--yes", "--max-steps", "2", "--flavor", "rtx-pro-6000"], env)
        assert result.returncode == 0, result.stderr[-1500:]
        (job_id,) = hub.jobs
        assert hub.jobs[job_id]["spec"]["flavor"] == "rtx-pro-6000"
        status = run_cli(["jobs", "status", job_id], env)
        assert "flavor rtx-pro-6000 ($2.70/h)" in status.stdout, status.stdout + status.stderr


MULTI = HARDWARE + [_several(_hw("h200", "Nvidia H200", "23 vCPU", "256 GB", 5.00, "H200", "141 GB"), "1"),
                    _several(_hw("h200x4", "4x Nvidia H200", "92 vCPU", "1024 GB", 20.00, "H200", "564 GB"), "4")]


def test_a_multi_gpu_flavor_is_planned_per_gpu_and_its_job_runs_nproc_processes(run_env, tmp_path, big_model):
    with HubServer(hardware=MULTI) as hub:
        env = env_for(run_env, hub, tmp_path, MODEL=big_model)
        args = ["train", "--remote", "hf-jobs", "--max-steps", "400", "--max-seq-length", "2048"]
        preview = run_cli([*args, "--dry-run", "--flavor", "h200x4"], env)
        assert preview.returncode == 0, preview.stderr[-1500:]
        assert "Plan on h200x4" in preview.stdout and "4 processes (NPROC)" in preview.stdout
        assert "memory below is per process" in preview.stdout
        times = {}
        for line in preview.stdout.splitlines():
            for name in ("h200", "h200x4"):
                if line[2:].startswith(name + " "):
                    h, m, s = (int(x) for x in line.split()[-2].split(":"))
                    times[name] = h + m / 60 + s / 3600
        assert times["h200x4"] < times["h200"]  # four GPUs share the steps (setup time stays)
        # auto: the cheapest flavor within REMOTE_MAX_HOURS; when one H200 is too slow, the x4 is picked
        limit = (times["h200x4"] + times["h200"]) / 2
        auto = run_cli([*args, "--dry-run", "--remote-max-hours", f"{limit:.3f}"], env)
        assert "auto picks h200x4" in auto.stdout, auto.stdout[-2500:] + auto.stderr[-1500:]
        done = run_cli([*args, "--yes", "--flavor", "h200x4"], env)
        assert done.returncode == 0, done.stderr[-1500:]
        (job,) = hub.jobs.values()
        spec = job["spec"]
        assert spec["flavor"] == "h200x4" and spec["environment"]["NPROC"] == "4"
        assert "./run.sh train" in spec["command"][-1]


QWEN_72B = {**QWEN_32B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
            "intermediate_size": 29568}


def test_a_16_bit_model_larger_than_one_gpu_is_sharded_over_a_multi_gpu_flavor(run_env, tmp_path, big_model):
    """72B in bf16 (~145 GB) with QUANTIZE=none: no single H200 holds it, h200x4 shards it (FSDP) and the job starts
    the four processes; `--dry-run` shows the per-GPU plan."""
    with open(os.path.join(big_model, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(QWEN_72B, fh)
    with HubServer(hardware=MULTI) as hub:
        env = env_for(run_env, hub, tmp_path, MODEL=big_model, QUANTIZE="none")
        args = ["train", "--remote", "hf-jobs", "--max-steps", "20", "--max-seq-length", "1024"]
        preview = run_cli([*args, "--dry-run"], env)
        assert preview.returncode == 0, preview.stdout[-1500:] + preview.stderr[-1500:]
        rows = {line[2:].split()[0]: line for line in preview.stdout.splitlines() if line[:1] in " *" and line[2:4] == "h2"}
        assert "does not fit" in rows["h200"] and "FSDP" in rows["h200x4"], rows
        assert "auto picks h200x" in preview.stdout
        assert "base weights sharded (FSDP)" in preview.stdout and "FSDP on: a whole copy needs" in preview.stdout
        done = run_cli([*args, "--yes", "--flavor", "h200x4"], env)
        assert done.returncode == 0, done.stderr[-1500:]
        (job,) = hub.jobs.values()
        assert job["spec"]["environment"]["NPROC"] == "4" and job["spec"]["environment"]["QUANTIZE"] == "none"


def test_nproc_above_one_reruns_the_same_command_under_torchrun(monkeypatch, tmp_path, tiny_model, cache_dir):
    """What the job's `./run.sh train` does with NPROC=4: every check here, then torchrun with the same arguments."""
    from finetune import cli, launch

    started = []
    monkeypatch.setattr(launch, "start", lambda n, argv: started.append((n, argv)) or 0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("WORLD_SIZE", "MLX_RANK", "NPROC"):
        monkeypatch.delenv(key, raising=False)
    argv = ["train", "--model", "finetune/tiny-qwen2", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2",
            "--output-dir", str(tmp_path / "run"), "--nproc", "4", "--backend", "torch"]
    cli.main(argv)
    assert started == [(4, argv)]
    assert launch.torchrun_command(4, argv)[1:] == ["-m", "finetune.launch", "--standalone", "--nproc-per-node=4",
                                                    "-m", "finetune", "--", *argv]
    assert not os.path.exists(tmp_path / "run")  # the checks wrote nothing; rank 0 makes the run directory
