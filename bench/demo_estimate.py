"""The default demo's time estimate on a quiet machine and on a busy one (issue 18: within +-30 % both ways).

Runs `python -m finetune train` with no settings (the demo `./run.sh` trains: the shipped sample on the default
model, or the offline SmolLM2-135M when the Hub is unreachable) twice: alone, then beside a neighbour that keeps one
core busy with matmuls for the whole run. The planner measures the CPU's matmul peak when the run starts, so its
estimate should follow the machine's state; run.json has the prediction and the measured training time.

Run:  python bench/demo_estimate.py [--max-steps N] [--only quiet|busy]
      (the whole demo, both runs: ~45 min on a 2-core AVX2 CPU in fp32, ~11 min quiet and ~33 busy;
      --max-steps 20: the demo's data and settings, its first 20 steps)
      python bench/demo_estimate.py --replay PEAK:BUSY:STEPS:MEASURED [...]
      (seconds: what the planner's constants now predict for runs already measured, from their probe readings,
      e.g. 141.6:0:0:535 = the whole demo (STEPS 0), probe 141.6 GFLOP/s, no busy cores, 535 s; for refitting)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEIGHBOUR = """
import numpy as np, time
a = np.random.rand(1024, 1024).astype(np.float32)
while True:
    a @ a
"""


def demo(out: str, max_steps: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k.isupper() and k not in ("MODEL", "MAX_STEPS", "BATCH_SIZE")}
    env.update(OUTPUT_DIR=out, HF_HUB_OFFLINE="1", **({"MAX_STEPS": str(max_steps)} if max_steps else {}))
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    return {"peak": run["hardware"].get("cpu_peak_gflops"), "busy": run["hardware"].get("cpu_busy_cores"),
            "predicted": run["result"]["predicted_seconds"], "measured": run["result"]["train_seconds"],
            "model": run["model"]["name"], "steps": run["result"]["steps"]}


def replay(runs: list[str]) -> None:
    """The estimate is a function of the run's probe readings: pin them, run `finetune train --dry-run`, and keep
    the plan it makes (its est_seconds is what run.json records as predicted_seconds)."""
    import contextlib
    import io

    sys.path.insert(0, ROOT)
    from finetune import cli, hardware, plan

    os.environ["HF_HUB_OFFLINE"] = "1"
    made, make = [], plan.make
    plan.make = lambda *a, **k: made.append(make(*a, **k)) or made[-1]
    print("| probe GFLOP/s | busy cores | steps | predicted s | measured s | error |\n|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        peak, busy, steps, measured = (float(v) for v in run.split(":"))
        hardware.measure_cpu_peak = lambda bf16, seconds=0.0, p=peak: {"fp32": p}
        hardware.measure_cpu_busy = lambda b=busy: b
        os.environ.pop("MAX_STEPS", None)
        if steps:
            os.environ["MAX_STEPS"] = str(int(steps))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            cli.main(["train", "--dry-run"])
        predicted = made[-1].est_seconds
        print(f"| {peak:g} | {busy:g} | {int(steps) or 'all'} | {predicted:.0f} | {measured:g} | "
              f"{(predicted - measured) / measured:+.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay", nargs="+", metavar="PEAK:BUSY:STEPS:MEASURED",
                        help="no training: the estimate the planner now gives for runs already measured")
    parser.add_argument("--max-steps", type=int, default=None, help="stop the demo after this many steps")
    parser.add_argument("--only", choices=("quiet", "busy"), help="run only this one of the two")
    args = parser.parse_args()
    if args.replay:
        return replay(args.replay)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "busy":
            rows.append(("quiet", demo(os.path.join(tmp, "quiet"), args.max_steps)))
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                              "OPENBLAS_NUM_THREADS": "1"})
        try:
            if args.only != "quiet":
                rows.append(("busy (1 core taken)", demo(os.path.join(tmp, "busy"), args.max_steps)))
        finally:
            neighbour.kill()
    print(f"{rows[0][1]['model']}, {rows[0][1]['steps']} steps, {os.cpu_count()} cores\n")
    print("| machine | cores busy at the start | matmul probe GFLOP/s | predicted s | measured s | error |\n"
          "|---|---:|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['busy']} | {r['peak']} | {r['predicted']:.0f} | {r['measured']:.0f} | "
              f"{(r['predicted'] - r['measured']) / r['measured']:+.0%} |")


if __name__ == "__main__":
    main()
