"""One process vs two (torchrun, gloo) on this machine: the gradient sum's cost and a real training run each way.

  1. all_reduce of one step's LoRA gradients (SmolLM2-135M at r16: the planner's count) between two processes:
     latency and bytes/s, the planner's ALLREDUCE["cpu"] constants;
  2. the offline SmolLM2-135M-Instruct on the shipped sample, NPROC=1 vs NPROC=2, same seed, steps and effective
     batch: training seconds, tokens/s, the planner's estimate, and the held-out eval loss before -> after
     (the two must agree: the same sum, another order of float additions);
  3. the same run with FSDP=on (each process holds half of the base weights and gathers them layer by layer):
     what the gathering costs, the weights each process held, and the same eval loss.
On one CPU the two processes share its cores, so the second process brings no compute: the point here is that the
numbers agree and what the communication costs; the speed-up needs one device per process (GPUs, Macs).

Run:  python bench/distributed.py            (~5 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def allreduce_worker() -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from finetune import models
    from finetune.plan import _linear_params, _lora_params

    dist.init_process_group("gloo")
    info, _ = models.resolve("smollm2-135m-offline", user_named_it=True)
    n = _lora_params(info, 16)
    out = {}
    for label, size in (("latency (1 float)", 1), (f"LoRA r16 gradients ({n * 4 / 1e6:.1f} MB)", n)):
        t = torch.zeros(size)
        for _ in range(3):
            dist.all_reduce(t)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - start)
        out[label] = (float(np.median(times)), size * 4)
    layer = _linear_params(info) // info.num_layers  # FSDP: one decoder layer's fp32 weights, gathered from 2 halves
    shard, whole = torch.zeros(layer // 2), torch.zeros(layer // 2 * 2)
    times = []
    for i in range(23):
        start = time.perf_counter()
        dist.all_gather_into_tensor(whole, shard)
        times.append(time.perf_counter() - start)
    out[f"all_gather, one layer's weights ({layer * 4 / 1e6:.1f} MB)"] = (float(np.median(times[3:])), layer * 4 / 2)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def train(nproc: int, out: str, fsdp: str = "off") -> dict:
    env = {**os.environ, "MODEL": "smollm2-135m-offline", "MAX_STEPS": "8", "BATCH_SIZE": "4", "GRAD_ACCUM": "2",
           "MAX_SEQ_LENGTH": "256", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "16", "LEARNING_RATE": "0.001",
           "OUTPUT_DIR": out, "NPROC": str(nproc), "BACKEND": "torch", "HF_HUB_OFFLINE": "1", "FSDP": fsdp}
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    r = run["result"]
    return {"nproc": nproc, "fsdp": run["plan"]["fsdp"], "held": r["extra"].get("fsdp_weights_held", 1.0),
            "peak": r["peak_memory_gb"], "seconds": r["train_seconds"], "tokens_per_s": r["tokens_per_s"],
            "predicted": r["predicted_seconds"], "before": run["evaluation"]["before"]["eval_loss"],
            "after": run["evaluation"]["after"]["eval_loss"]}


def main() -> None:
    if "--allreduce-worker" in sys.argv:
        return allreduce_worker()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--allreduce-worker"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    print("| collective, 2 processes, gloo | median | rate (bytes received) |\n|---|---:|---:|")
    for label, (seconds, nbytes) in json.loads(line[7:]).items():
        rate = f"{nbytes / seconds / 1e9:.2f} GB/s" if nbytes > 4 else "-"
        print(f"| {label} | {seconds * 1e3:.2f} ms | {rate} |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, fsdp in ((1, "off"), (2, "off"), (2, "on")):
            rows.append(train(n, os.path.join(tmp, f"nproc{n}-{fsdp}"), fsdp))
    print("\n| NPROC | FSDP | decoder weights held | peak GB (rank 0) | train s | tokens/s | planner's estimate s "
          "| eval loss before -> after |\n|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['nproc']} | {'on' if r['fsdp'] else 'off'} | {r['held']:.0%} | {r['peak']:.2f} | {r['seconds']:.1f} "
              f"| {r['tokens_per_s']:,.0f} | {r['predicted']:.1f} | {r['before']:.4f} -> {r['after']:.4f} |")
    for r in rows[1:]:
        a, b = rows[0]["after"], r["after"]
        print(f"eval loss after: 2 processes{' (FSDP)' if r['fsdp'] else ''} vs 1 differ by {abs(a - b) / a:.2e} "
              "(relative)")


if __name__ == "__main__":
    main()
