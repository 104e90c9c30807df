"""On one CPU: one process of all its threads, or two processes (torchrun) of half the threads each?

Why two can win at all: a micro-batch costs ~0.3 s of fixed work on this CPU (44 k op dispatches for SmolLM2's
forward + backward, single-threaded Python and dispatcher, whatever the row count; plan.STEP_OVERHEAD_S), and short
rows give the second thread little to do. Two processes each take half of the step's rows, so the fixed work runs
on both cores at once; then they sum the LoRA gradients (exact: tests/test_distributed.py). With several rows per
process the kernels are big, one process's threads already keep every core busy, and the second process brings only
its start (torchrun, imports, its copy of the model), its memory and the sum. This bench is why NPROC auto stays 1
on the CPU (README, "More than one device").

For each (data, rows per step): `finetune train` with NPROC=1 and NPROC=2, interleaved, each alone on the
machine, the same rows, seed and steps (about the same tokens in every cell); training seconds from run.json
(the loop, no start or evaluation) and the whole command's wall time (the start of torchrun and the second
process included). The steps are the plan's batch of R rows (GRAD_ACCUM=1).

Run:  python bench/cpu_processes.py [--rows 2,4,8,16] [--data sample,multiturn] [--repeats 1]   (~20 min, 2 cores)
      python bench/cpu_processes.py --print
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import workloads  # noqa: E402  the quality bench's workloads, written deterministically
RESULTS = os.path.join(ROOT, "bench", "results", "cpu_processes.jsonl")
ROWS_PER_CELL = 64  # rows trained per cell: steps = 64 / rows per step


def data_dir(name: str) -> str:
    if name == "sample":
        return os.path.join(ROOT, "data", "sample")
    return workloads.write(name, os.path.join(tempfile.gettempdir(), "finetune-quality-data"))


def train(data: str, rows: int, nproc: int, out: str) -> dict:
    steps = max(2, ROWS_PER_CELL // rows)
    env = {**os.environ, "MODEL": "smollm2-135m-offline", "DATASET": data, "MAX_STEPS": str(steps),
           "BATCH_SIZE": str(rows), "GRAD_ACCUM": "1", "MAX_SEQ_LENGTH": "512", "EVAL_GENERATIONS": "0",
           "EVAL_ROWS": "8", "EVAL_STEPS": str(10 ** 6), "SAVE_STEPS": str(10 ** 6), "LEARNING_RATE": "0.001",
           "OUTPUT_DIR": out, "NPROC": str(nproc), "BACKEND": "torch", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    r = run["result"]
    return {"rows": rows, "steps": steps, "nproc": nproc, "train_s": r["train_seconds"], "wall_s": wall,
            "tokens": r["tokens_seen"], "eval_after": run["evaluation"]["after"]["eval_loss"],
            "predicted_s": run["plan"]["est_seconds"]}


def table(results: list[dict]) -> str:
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for r in results:
        cells.setdefault((r["data"], r["rows"]), {}).setdefault(r["nproc"], []).append(r)
    lines = ["| data | rows per step | tokens per row | 1 process: train s (wall) | 2 processes: train s (wall) "
             "| training speed-up | eval loss 1 / 2 |", "|---|---:|---:|---:|---:|---:|---|"]
    for (data, rows), by in sorted(cells.items()):
        if 1 not in by or 2 not in by:
            continue
        one, two = ({k: sum(r[k] for r in runs) / len(runs) for k in ("train_s", "wall_s", "eval_after")}
                    for runs in (by[1], by[2]))
        per_row = by[1][0]["tokens"] / (by[1][0]["rows"] * by[1][0]["steps"])
        lines.append(f"| {data} | {rows} | {per_row:.0f} | {one['train_s']:.1f} ({one['wall_s']:.0f}) "
                     f"| {two['train_s']:.1f} ({two['wall_s']:.0f}) | {one['train_s'] / two['train_s']:.2f}x "
                     f"| {one['eval_after']:.5f} / {two['eval_after']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="2,4,8,16")
    p.add_argument("--data", default="sample,multiturn")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--print", action="store_true", help="print the table of what --results holds, run nothing")
    a = p.parse_args()
    if a.print:
        with open(a.results, encoding="utf-8") as fh:
            return print(table([json.loads(line) for line in fh if line.strip()]))
    stamp = time.strftime("%Y-%m-%d")
    results = []
    for data in a.data.split(","):
        folder = data_dir(data)  # written once, not before every run
        for rows in (int(x) for x in a.rows.split(",")):
            for rep in range(a.repeats):
                for nproc in ((1, 2) if rep % 2 == 0 else (2, 1)):  # interleaved: drift hits both sides
                    with tempfile.TemporaryDirectory() as tmp:
                        rec = {"data": data, "date": stamp, "cpus": os.cpu_count(),
                               **train(folder, rows, nproc, os.path.join(tmp, "run"))}
                    print(json.dumps(rec), flush=True)
                    results.append(rec)
                    with open(a.results, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
