"""mlx[cpu] on Linux: its bundled reference BLAS vs the system OpenBLAS (backends/mlx_blas.py), in one run.

Each variant runs in its own process (the BLAS is chosen when libmlx.so loads):
  matmul     fp32 1024 x 1024 x 1024, best of 5 after a warm-up, GFLOP/s
  train step forward + backward (value_and_grad, full-parameter gradients: the upper bound of a LoRA step's
             matmuls) of the real offline model (SmolLM2-135M, fp32) on a BATCH x SEQ batch; seconds per step
             and tokens/s, best of 2 after a warm-up
Run:  python bench/mlx_blas.py [--batch 2] [--seq 64]     (~3 minutes on 2 cores; needs libopenblas0)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
if {openblas}:
    from backends.mlx_blas import use_openblas
    assert use_openblas(), "no system OpenBLAS found (apt-get install libopenblas0)"
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model

def best(fn, n):
    fn(); times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return min(times)

a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
gflops = 2 * 1024 ** 3 / best(lambda: mx.eval(a @ b), 5) / 1e9

from pathlib import Path
model, _ = load_model(Path({model!r}))
model.set_dtype(mx.float32)
x = mx.random.randint(0, 1000, ({batch}, {seq}))
def loss(m):
    return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()
step = nn.value_and_grad(model, loss)
secs = best(lambda: mx.eval(step(model)), 2)
print(json.dumps({{"gflops": gflops, "step_s": secs, "tok_s": {batch} * {seq} / secs}}))
"""


def run(openblas: bool, model: str, batch: int, seq: int) -> dict:
    code = CHILD.format(root=ROOT, openblas=openblas, model=model, batch=batch, seq=seq)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    from finetune import offline_model

    model = offline_model.ensure()
    print(f"mlx[cpu], SmolLM2-135M fp32, batch {args.batch} x {args.seq} tokens, {os.cpu_count()} cores")
    rows = {name: run(flag, model, args.batch, args.seq) for name, flag in (("reference BLAS", False),
                                                                             ("OpenBLAS", True))}
    print("| BLAS | fp32 matmul GFLOP/s | train step (fwd+bwd) | tokens/s |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['gflops']:.1f} | {r['step_s']:.2f} s | {r['tok_s']:.0f} |")
    ref, fast = rows["reference BLAS"], rows["OpenBLAS"]
    print(f"OpenBLAS / reference: matmul {fast['gflops'] / ref['gflops']:.1f}x, train step "
          f"{ref['step_s'] / fast['step_s']:.1f}x")


if __name__ == "__main__":
    main()
