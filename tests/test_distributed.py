"""More than one process (issue 23): torchrun on gloo, on this CPU. Two processes must train exactly what one does
with the same effective batch; a killed process stops the run cleanly and --resume continues it, on any number of
processes; the planner plans the world size; HF Jobs multi-GPU flavors start the distributed command."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_cli

pytest.importorskip("torch.distributed")

TINY = {"MODEL": "finetune/tiny-qwen2", "BATCH_SIZE": "4", "GRAD_ACCUM": "2", "EVAL_GENERATIONS": "0",
        "EVAL_ROWS": "8", "LEARNING_RATE": "0.002", "BACKEND": "torch"}


def _env(run_env, out, **extra) -> dict:
    return {**run_env, **TINY, "OUTPUT_DIR": str(out), **extra}


def _record(run_dir) -> dict:
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _adapter(run_dir) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(run_dir, "adapter_model.safetensors"))


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_two_processes_train_what_one_process_trains(run_env, tmp_path, tiny_model):
    one = run_cli([], _env(run_env, tmp_path / "one", MAX_STEPS="6", NPROC="1"))
    two = run_cli([], _env(run_env, tmp_path / "two", MAX_STEPS="6", NPROC="2"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "Starting 2 processes" in two.stdout and "2 processes (NPROC)" in two.stdout
    assert two.stdout.count("Settings (value") == 1  # rank 0 speaks for the run
    r1, r2 = _record(tmp_path / "one"), _record(tmp_path / "two")
    assert r1["plan"]["world_size"] == 1 and r2["plan"]["world_size"] == 2
    assert r2["result"]["steps"] == 6 and r2["result"]["tokens_seen"] == r1["result"]["tokens_seen"]
    before, after = r1["evaluation"]["after"]["eval_loss"], r2["evaluation"]["after"]["eval_loss"]
    assert after < r2["evaluation"]["before"]["eval_loss"]
    assert abs(after - before) / before < 1e-4  # the same sum; only the order of float additions differs
    assert _close(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) < 1e-3
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # rank 1 wrote nothing of its own


def test_fsdp_shards_the_base_and_trains_what_one_process_trains(run_env, tmp_path, tiny_model):
    """FSDP=on: DPO (its reference forwards with the adapter off), checkpointing and sample generations, every one a
    sharded forward that both processes run together; the result equals one process's, and the adapter is a
    normal PEFT adapter."""
    extra = {"METHOD": "dpo", "DATASET": "sample", "EVAL_GENERATIONS": "2", "MAX_STEPS": "4", "EVAL_STEPS": "2",
             "GRADIENT_CHECKPOINTING": "on"}
    one = run_cli([], _env(run_env, tmp_path / "one", NPROC="1", **extra))
    two = run_cli([], _env(run_env, tmp_path / "two", NPROC="2", FSDP="on", **extra))
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "base weights sharded (FSDP)" in two.stdout and "FSDP on (set by you)" in two.stdout
    r1, r2 = _record(tmp_path / "one"), _record(tmp_path / "two")
    assert r2["plan"]["fsdp"] is True and r1["plan"]["fsdp"] is False
    assert 0.45 < r2["result"]["extra"]["fsdp_weights_held"] < 0.55  # rank 0 holds half of the decoder's weights
    for when in ("before", "after"):
        a, b = r1["evaluation"][when], r2["evaluation"][when]
        assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-4 and a["generations"] == b["generations"]
    periodic = [[json.loads(x)["eval_loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in x]
                for n in ("one", "two")]
    assert len(periodic[0]) == 2 and np.allclose(periodic[0], periodic[1], rtol=1e-4)  # EVAL_STEPS: all evaluate
    assert _close(_adapter(tmp_path / "one"), _adapter(tmp_path / "two")) < 1e-3
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tmp_path / "two"))
    trained = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert trained and all(isinstance(v, torch.Tensor) and v.abs().sum() > 0 for v in trained.values())


def test_fsdp_kill_9_stops_cleanly_and_resume_continues_on_one_process(run_env, tmp_path, tiny_model):
    straight = run_cli([], _env(run_env, tmp_path / "straight", MAX_STEPS="24", NPROC="1"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = _start(_env(run_env, out, MAX_STEPS="24", SAVE_STEPS="4", NPROC="2", FSDP="on"))
    _wait_for_checkpoint(out, 4, proc)
    _rank(proc, 1).kill()  # rank 0 is inside a weight gather, not the step's sum: it must still see the loss
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stdout + stderr, stderr[-3000:]
    record = _record(out)
    assert record["status"] == "interrupted" and "another process" in record["error"]
    resumed = run_cli(["train", "--resume", str(out)], {**run_env, "NPROC": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    done = _record(out)
    assert done["result"]["steps"] == 24 and done["world_sizes"] == [2, 1]
    a, b = done["evaluation"]["after"]["eval_loss"], _record(tmp_path / "straight")["evaluation"]["after"]["eval_loss"]
    assert abs(a - b) / b < 1e-3, (a, b)


def _start(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "finetune"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run_dir, step: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(run_dir, "checkpoints", f"step-{step}")):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _rank(proc, rank: int):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "finetune" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_of_one_process_stops_the_run_cleanly_and_resume_continues_it(victim, run_env, tmp_path, tiny_model):
    straight = run_cli([], _env(run_env, tmp_path / "straight", MAX_STEPS="40", NPROC="1"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "killed"
    proc = _start(_env(run_env, out, MAX_STEPS="40", SAVE_STEPS="4", NPROC="2"))
    _wait_for_checkpoint(out, 4, proc)
    _rank(proc, victim).kill()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert f"process {victim} ended with signal 9" in stderr
    record = _record(out)
    if victim == 1:  # rank 0 lived: it saved the last whole step and said so
        assert record["status"] == "interrupted" and "another process" in record["error"]
        assert "Continue with:" in stdout and os.path.isfile(out / "adapter_model.safetensors")
    else:            # rank 0 died mid-run: its last checkpoint is what there is
        assert record["status"] == "running"
    assert os.path.isdir(out / "checkpoints" / "step-4")
    # resumed on ONE process: the effective batch is the run's, so it continues the same computation
    resumed = run_cli(["train", "--resume", str(out)], {**run_env, "NPROC": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    done = _record(out)
    assert done["status"] == "completed" and done["result"]["steps"] == 40
    assert done["world_sizes"][0] == 2 and done["world_sizes"][-1] == 1
    a, b = done["evaluation"]["after"]["eval_loss"], _record(tmp_path / "straight")["evaluation"]["after"]["eval_loss"]
    assert abs(a - b) / b < 1e-3, (a, b)


def test_sigint_stops_every_process_after_the_same_step(run_env, tmp_path, tiny_model):
    out = tmp_path / "run"
    proc = _start(_env(run_env, out, MAX_STEPS="60", SAVE_STEPS="2", NPROC="2"))
    _wait_for_checkpoint(out, 2, proc)
    proc.send_signal(signal.SIGINT)  # torchrun passes it to both processes
    stdout, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    record = _record(out)
    assert record["status"] == "interrupted" and 2 <= record["step_reached"] < 60
    assert os.path.isdir(out / "checkpoints" / f"step-{record['step_reached']}")
    resumed = run_cli(["train", "--resume", str(out), "--nproc", "2"], run_env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert _record(out)["result"]["steps"] == 60


def test_dry_run_plans_the_world_size_and_bad_values_are_one_line(run_env, tmp_path, tiny_model):
    env = _env(run_env, tmp_path / "plan")
    dry = run_cli(["train", "--dry-run", "--nproc", "2", "--max-steps", "3"], env)
    assert dry.returncode == 0, dry.stderr
    assert "processes" in dry.stdout and "2 (each: batch 4 x 1 of every step" in dry.stdout
    assert "to sum the LoRA gradients over 2 processes" in dry.stdout
    assert not os.path.exists(tmp_path / "plan")
    for args, extra, says in (
            (["--nproc", "0"], {}, "--nproc='0' is not valid"),
            (["--nproc", "two"], {}, "--nproc='two' is not valid"),
            (["--nproc", "3"], {"BATCH_SIZE": "1", "GRAD_ACCUM": "2"}, "NPROC=3: a step has only 2 rows"),
            (["--nproc", "2"], {"BACKEND": "mlx"}, "this run uses mlx")):
        if extra.get("BACKEND") == "mlx":
            pytest.importorskip("mlx.core")
        bad = run_cli(["train", "--max-steps", "3", *args], {**env, **extra})
        lines = [x for x in bad.stderr.splitlines() if x.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and says in lines[0], (args, bad.stderr)
        assert not os.path.exists(tmp_path / "plan")


@pytest.mark.slow
def test_two_processes_on_the_real_model_match_one(run_env, tmp_path, offline_model):
    """The issue's check on the real offline model: held-out eval loss equal within 1 %."""
    common = {"MODEL": "smollm2-135m-offline", "MAX_STEPS": "3", "BATCH_SIZE": "2", "GRAD_ACCUM": "2",
              "MAX_SEQ_LENGTH": "128", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "8", "LEARNING_RATE": "0.001"}
    for name, n, fsdp in (("one", "1", "off"), ("two", "2", "off"), ("sharded", "2", "on")):
        done = run_cli([], {**run_env, **common, "OUTPUT_DIR": str(tmp_path / name), "NPROC": n, "FSDP": fsdp},
                       timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    one = _record(tmp_path / "one")["evaluation"]
    for name in ("two", "sharded"):  # data-parallel, and FSDP on a model with tied embeddings
        two = _record(tmp_path / name)["evaluation"]
        assert two["after"]["eval_loss"] < two["before"]["eval_loss"]
        assert abs(one["after"]["eval_loss"] - two["after"]["eval_loss"]) / one["after"]["eval_loss"] < 0.01


def test_mlx_two_processes_on_the_ring_backend_train_what_one_trains(run_env, tmp_path, tiny_model):
    """mlx.launch with the ring backend on localhost (mlx[cpu]), as two Macs would run it over TCP."""
    pytest.importorskip("mlx.core")
    env = _env(run_env, tmp_path / "one", BACKEND="mlx", MAX_STEPS="4")
    one = run_cli([], env)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    two = subprocess.run([launcher, "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "finetune", "train"],
                         env={**env, "OUTPUT_DIR": str(tmp_path / "two")}, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    r1, r2 = _record(tmp_path / "one"), _record(tmp_path / "two")
    assert r2["plan"]["world_size"] == 2 and r2["result"]["tokens_seen"] == r1["result"]["tokens_seen"]
    a, b = r1["evaluation"]["after"]["eval_loss"], r2["evaluation"]["after"]["eval_loss"]
    assert b < r2["evaluation"]["before"]["eval_loss"] and abs(a - b) / a < 1e-3, (a, b)
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]


def test_world_share_any_and_sum_over_two_ranks():
    """finetune.world's helpers over a sum shared by two threads (what gloo / the MLX ring do between processes)."""
    import threading

    from finetune.world import World

    barrier, slots, seen = threading.Barrier(2), [None, None], {}

    def world(rank: int) -> World:
        def all_sum(values):
            slots[rank] = values
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return World(rank=rank, size=2, all_sum=all_sum)

    def run(rank: int) -> None:
        w = world(rank)
        seen[rank] = (w.share("/runs/é-1" if rank == 0 else "ignored"), w.any(rank == 1), w.any(False),
                      w.sum([rank + 1.0, 2.0]).tolist())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen[0] == seen[1] == ("/runs/é-1", True, False, [3.0, 4.0])
    assert World().share("x") == "x" and World().any(True) and World().writer


def test_nproc_auto_is_one_process_per_gpu_for_torch_only():
    from finetune import launch
    from finetune.hardware import CudaDevice, Hardware

    gpu = CudaDevice("NVIDIA H200", 141, "9.0", True)
    hw = Hardware(os="Linux", arch="x86_64", chip="x", ram_total_gb=64, ram_available_gb=60, swap_total_gb=0,
                  disk_free_gb=100, cpu_cores=16, cuda_devices=[gpu] * 4)
    cpu = Hardware(os="Linux", arch="x86_64", chip="x", ram_total_gb=64, ram_available_gb=60, swap_total_gb=0,
                   disk_free_gb=100, cpu_cores=16)
    assert launch.processes("auto", hw, "torch") == 4 and launch.processes("auto", cpu, "torch") == 1
    assert launch.processes("auto", hw, "unsloth") == 1  # Unsloth trains on one GPU: auto does not start torchrun
    assert launch.processes("3", cpu, "torch") == 3
