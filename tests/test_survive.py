"""Runs that survive: checkpoints, resume after SIGKILL (torch and MLX), Ctrl-C / SIGTERM, `runs`, injected
out-of-memory, a full disk, and inputs that used to end in tracebacks. Tiny model, so each run takes seconds."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_cli

STEPS = 24


def tiny_env(run_env, out, **extra) -> dict:
    return {**run_env, "MODEL": "finetune/tiny-qwen2", "MAX_STEPS": str(STEPS), "BATCH_SIZE": "4", "GRAD_ACCUM": "2",
            "SAVE_STEPS": "3", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "8", "LEARNING_RATE": "0.002",
            "OUTPUT_DIR": str(out), **extra}


def start(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(run_dir, at_least: int, proc, timeout=300) -> None:
    from finetune import checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = checkpoint.whole(str(run_dir))
        if found and found[-1][0] >= at_least:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def final_loss(run_dir) -> float:
    run = json.load(open(os.path.join(run_dir, "run.json")))
    assert run["status"] == "completed", run.get("error")
    return run["evaluation"]["after"]["eval_loss"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_sigkill_at_a_random_step_then_resume_reaches_the_same_loss(backend, run_env, tmp_path):
    extra = {"BACKEND": backend} if backend == "mlx" else {}
    straight = tmp_path / "straight"
    done = run_cli([], tiny_env(run_env, straight, **extra))
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = start(tiny_env(run_env, killed, **extra))
    wait_for_checkpoint(killed, random.Random(os.getpid()).choice([3, 6, 9, 12]), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    listed = run_cli(["runs", str(tmp_path)], run_env).stdout
    assert "died" in listed and f"./run.sh train --resume {killed}" in listed
    resumed = run_cli(["train", "--resume", str(killed)], run_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from step" in resumed.stdout
    assert final_loss(killed) == pytest.approx(final_loss(straight), rel=0.01)
    metrics = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == sorted({m["step"] for m in metrics if "loss" in m})


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_a_loadable_adapter_and_says_how_to_resume(sig, code, run_env, tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = start(tiny_env(run_env, out, SAVE_STEPS="100"))
    wait_for_steps(out, 3, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    run = json.load(open(out / "run.json"))
    assert run["status"] == "interrupted" and run["step_reached"] >= 3
    assert f"./run.sh train --resume {out}" in stdout
    assert "Traceback" not in stderr
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert "interrupted" in run_cli(["runs", str(tmp_path)], run_env).stdout


def wait_for_steps(out, steps: int, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    path = out / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and any(json.loads(x).get("step", 0) >= steps for x in path.read_text().splitlines() if x):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no progress")


def test_resume_refuses_changed_settings_and_finished_runs(run_env, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_env(run_env, out))
    wait_for_checkpoint(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    changed = run_cli(["train", "--resume", str(out), "--learning-rate", "0.1"], run_env)
    assert changed.returncode == 2 and "LEARNING_RATE=0.1 differs from the run's 0.002" in changed.stderr
    same = run_cli(["train", "--resume", str(out), "--logging-steps", "2"], {**run_env, "RESUME": ""})
    assert same.returncode == 0, same.stderr[-1500:]
    again = run_cli([], {**run_env, "RESUME": str(out)})
    assert again.returncode == 2 and "already completed" in again.stderr


def test_resuming_a_run_recorded_before_a_setting_existed_keeps_how_it_trained(run_env, tmp_path):
    """A DPO run whose run.json predates RPO_ALPHA and GROUP_BY_LENGTH resumes as plain DPO (0), not the new default
    (1.0), and keeps drawing its rows length-grouped, as it did."""
    out = tmp_path / "dpo"
    proc = start(tiny_env(run_env, out, METHOD="dpo", BATCH_SIZE="2", GRAD_ACCUM="1"))
    wait_for_checkpoint(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    record = json.load(open(out / "run.json"))
    assert record["config"].pop("rpo_alpha") == 1.0
    assert record["config"].pop("group_by_length") is False
    (out / "run.json").write_text(json.dumps(record))
    resumed = run_cli(["train", "--resume", str(out)], {**run_env, "RESUME": ""})
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    config = json.load(open(out / "run.json"))["config"]
    assert config["rpo_alpha"] == 0.0 and config["group_by_length"] is True  # the order such a run was drawn in


def test_injected_out_of_memory_halves_the_micro_batch_and_continues(run_env, tmp_path, monkeypatch, cache_dir):
    """In-process: the session raises torch's OOM once at step 5; the run must finish with the same effective batch."""
    import torch

    from backends.torch_backend import TorchSession
    from finetune import cli

    original, calls = TorchSession.train_step, {"n": 0}

    def flaky(self, batch, micro_batch, lr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(self, batch, micro_batch, lr)

    monkeypatch.setattr(TorchSession, "train_step", flaky)
    for k, v in tiny_env(run_env, tmp_path / "run", MAX_STEPS="8").items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 0
    run = json.load(open(tmp_path / "run" / "run.json"))
    (event,) = run["result"]["oom_events"]
    assert event["micro_batch"] == [4, 2] and event["grad_accum"] == [2, 4] and event["at_step"] == 5
    assert event["resumed_from_step"] == 3 and run["result"]["steps"] == 8
    assert "out of memory at step 5" in open(tmp_path / "run" / "training_log.txt").read()


def test_disk_full_while_checkpointing_keeps_the_last_whole_checkpoint(run_env, tmp_path, monkeypatch, capsys):
    import errno

    from finetune import checkpoint, cli, fsio

    real, calls = fsio.build_dir, {"n": 0}

    def full_disk(final, build):
        if "checkpoints" in final:
            calls["n"] += 1
            if calls["n"] == 3:  # step 0, step 3, then the disk is full
                raise fsio.WriteError(final, OSError(errno.ENOSPC, "No space left on device"))
        return real(final, build)

    monkeypatch.setattr(fsio, "build_dir", full_disk)
    out = tmp_path / "run"
    for k, v in tiny_env(run_env, out).items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write") and "step-6: the disk is full" in err[-1]
    run = json.load(open(out / "run.json"))
    assert run["status"] == "failed" and "disk is full" in run["error"]
    assert [s for s, _ in checkpoint.whole(str(out))] == [0, 3]


def test_a_library_save_failing_as_runtime_error_is_one_line_and_keeps_the_last_checkpoint(run_env, tmp_path,
                                                                                            monkeypatch, capsys):
    """torch.save reports a full disk as RuntimeError, not OSError: it still ends in one line naming the file."""
    import torch

    from finetune import checkpoint, cli

    real, calls = torch.save, {"n": 0}

    def failing(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # step 0, step 3, then the write fails as PyTorch's stream writer says it
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    out = tmp_path / "run"
    for k, v in tiny_env(run_env, out).items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write") and "optimizer.pt: [enforce fail" in err[-1]
    assert json.load(open(out / "run.json"))["status"] == "failed"
    assert [s for s, _ in checkpoint.whole(str(out))] == [0, 3]
    assert not [f for f in os.listdir(out / "checkpoints") if f.startswith(".")]  # no temp left behind


def test_two_runs_in_the_same_second_and_outputs_land_where_you_are(run_env, tmp_path):
    env = {**tiny_env(run_env, ""), "MAX_STEPS": "1", "RUN_NAME": "same"}
    env.pop("OUTPUT_DIR")
    procs = [subprocess.Popen([os.path.join(ROOT, "run.sh")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.communicate()
    assert sorted(os.listdir(tmp_path / "outputs")) == ["same", "same-2"]
    run = tmp_path / "outputs" / "same"
    modes = {name: oct(os.stat(run / name).st_mode & 0o777) for name in
             ("adapter_model.safetensors", "adapter_config.json", "run.json", "report.md", "metrics.jsonl")}
    assert set(modes.values()) == {"0o644"}, modes
    log = open(run / "training_log.txt").read()
    assert "Settings (value  <- source" in log and "Plan" in log and "predicted peak" in log
    report = open(run / "report.md").read()
    assert f"The adapter is in `{os.path.abspath(run)}`" in report and "./run.sh chat" in report
    record = json.load(open(run / "run.json"))
    assert record["config"]["batch_size"] == 4 and record["config"]["dtype"] in ("fp32", "bf16")
    assert record["model"]["name"] == "finetune/tiny-qwen2"


@pytest.mark.parametrize("case", ["corrupt_config", "empty_config", "binary_yaml", "proc_output", "missing_folder",
                                  "dry_run_output", "convert_corrupt_config", "convert_truncated", "convert_no_lora",
                                  "convert_out_is_file"])
def test_inputs_that_used_to_crash_are_one_line_errors(case, run_env, tmp_path, tiny_model):
    import shutil

    args, env = [], dict(run_env)
    model = tmp_path / "model"
    if case in ("corrupt_config", "empty_config"):
        shutil.copytree(tiny_model, model)
        (model / "config.json").write_text("{not json" if case == "corrupt_config" else "{}")
        env["MODEL"], needle = str(model), "config.json"
    elif case == "binary_yaml":
        (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00binary")
        args, needle = ["train", "--config", str(tmp_path / "c.yaml")], "c.yaml"
    elif case in ("proc_output", "dry_run_output"):
        env.update(MODEL="finetune/tiny-qwen2", OUTPUT_DIR="/proc/finetune-run")
        args, needle = (["train", "--dry-run"] if case == "dry_run_output" else []), "OUTPUT_DIR=/proc/finetune-run"
    elif case == "missing_folder":
        env["MODEL"], needle = str(tmp_path / "nowhere"), "folder does not exist"
    else:
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapters.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # valid, empty
        (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2}))
        out = tmp_path / "out"
        if case == "convert_corrupt_config":
            (adapter / "adapter_config.json").write_text("{broken")
            needle = "adapter_config.json"
        elif case == "convert_truncated":
            (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                                     "lora_parameters": {"rank": 4, "scale": 2.0}}))
            (adapter / "adapters.safetensors").write_bytes(b"\xff\xff\xff\x00\x00\x00\x00\x00{")
            needle = "adapters.safetensors"
        elif case == "convert_no_lora":
            needle = "lora_parameters"
        else:
            (adapter / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                                     "lora_parameters": {"rank": 4, "scale": 2.0}}))
            out.write_text("a file")
            needle = "is a file"
        args = ["convert", str(adapter), "--to", "peft", "--out", str(out)]
    result = run_cli(args, env)
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-1000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists("/proc/finetune-run")


def test_auto_schedule_decays_from_the_plateau_and_a_resumed_run_decays_from_the_same_step(run_env, tmp_path,
                                                                                           monkeypatch):
    """LR_SCHEDULER=auto (the default): the step the loss flattened at is part of the checkpoint, so a run stopped
    after it resumes on the same decay. The plateau test is made to pass at its first chance (a huge ratio)."""
    from backends.torch_backend import TorchSession
    from finetune import cli, schedule

    monkeypatch.setattr(schedule, "PLATEAU_RATIO", 1e9)
    monkeypatch.setattr(schedule, "PLATEAU_HOLD", 3)
    env = tiny_env(run_env, tmp_path / "straight", LOGGING_STEPS="1", MAX_STEPS="30")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main([]) == 0

    def lrs(out):
        return [m["lr"] for m in map(json.loads, open(out / "metrics.jsonl")) if "lr" in m]

    straight = json.load(open(tmp_path / "straight" / "run.json"))
    start = straight["result"]["lr_decay_from"]
    assert straight["config"]["lr_scheduler"] == "auto" and schedule.PLATEAU_MIN_STEPS + 2 <= start <= 20
    got, peak = lrs(tmp_path / "straight"), float(env["LEARNING_RATE"])
    assert got[1:start] == [peak] * (start - 1)                 # warmup (1 step), then constant up to the plateau
    assert all(a > b > 0 for a, b in zip(got[start - 1:], got[start:]))  # then down every step, never to zero
    assert len(got) == 30 and got[-1] == pytest.approx(peak / (30 - start + 1))
    assert f"(auto: constant to step {start}, where the loss flattened" in open(tmp_path / "straight" / "report.md").read()

    original, calls = TorchSession.train_step, {"n": 0}

    def interrupted(self, batch, micro_batch, lr):
        calls["n"] += 1
        if calls["n"] == start + 4:  # Ctrl-C during a step after the decay began: the loop finishes it and saves
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, micro_batch, lr)

    monkeypatch.setattr(TorchSession, "train_step", interrupted)
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "stopped"))
    assert cli.main([]) == 130
    monkeypatch.setattr(TorchSession, "train_step", original)
    assert cli.main(["train", "--resume", str(tmp_path / "stopped")]) == 0
    resumed = json.load(open(tmp_path / "stopped" / "run.json"))
    assert resumed["result"]["lr_decay_from"] == start
    assert lrs(tmp_path / "stopped") == got
    assert final_loss(tmp_path / "stopped") == pytest.approx(final_loss(tmp_path / "straight"), rel=1e-4)
