"""On one CPU: one thread team over all its cores, two lanes (threads) in one process, or two processes?

Why one team is not enough: a micro-batch costs ~0.3 s of fixed work on this CPU (44 k op dispatches for SmolLM2's
forward + backward, single-threaded Python and dispatcher, whatever the row count; plan.STEP_OVERHEAD_S), and
between the large matmuls its small ops give the second thread little to do. Two processes (NPROC=2, torchrun) each
take half of the step's rows, so that work runs on both cores at once, then sum the LoRA gradients; but each starts
its own interpreter and copy of the model (10-15 s here), which a short run does not win back. Two lanes
(CPU_LANES=2, backends/torch_lanes.py: two threads of one core each in one process, gradients summed in lane order)
get the same overlap without the start. This bench is why NPROC auto stays 1 on the CPU and CPU_LANES auto is 2
(README, "More than one device").

For each (data, rows per step): `finetune train` in each layout, interleaved, each alone on the machine, the same
rows, seed and steps (about the same tokens in every cell); training seconds from run.json (the loop, no start or
evaluation) and the whole command's wall time (start and evaluation included). The steps are the plan's batch of R
rows (GRAD_ACCUM=1). Layouts: one = NPROC=1 CPU_LANES=1; lanes = NPROC=1 CPU_LANES=2; procs = NPROC=2 (one thread
each). Records from before lanes existed have no "layout": theirs is one (nproc 1) or procs (nproc 2).

Run:  python bench/cpu_processes.py [--rows 2,4,8,16] [--data sample,multiturn] [--layouts one,lanes,procs]
                                    [--repeats 1]            (~30 min, 2 cores)
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


LAYOUTS = {"one": {"NPROC": "1", "CPU_LANES": "1"}, "lanes": {"NPROC": "1", "CPU_LANES": "2"},
           "procs": {"NPROC": "2", "CPU_LANES": "1"}}


def layout_of(record: dict) -> str:
    return record.get("layout") or ("one" if record["nproc"] == 1 else "procs")


def train(data: str, rows: int, layout: str, out: str) -> dict:
    steps = max(2, ROWS_PER_CELL // rows)
    env = {**os.environ, "MODEL": "smollm2-135m-offline", "DATASET": data, "MAX_STEPS": str(steps),
           "BATCH_SIZE": str(rows), "GRAD_ACCUM": "1", "MAX_SEQ_LENGTH": "512", "EVAL_GENERATIONS": "0",
           "EVAL_ROWS": "8", "EVAL_STEPS": str(10 ** 6), "SAVE_STEPS": str(10 ** 6), "LEARNING_RATE": "0.001",
           "OUTPUT_DIR": out, "BACKEND": "torch", "HF_HUB_OFFLINE": "1", **LAYOUTS[layout]}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    with open(os.path.join(out, "run.json"), encoding="utf-8") as fh:
        run = json.load(fh)
    r = run["result"]
    return {"rows": rows, "steps": steps, "layout": layout, "nproc": int(LAYOUTS[layout]["NPROC"]),
            "lanes": run["plan"].get("lanes", 1), "train_s": r["train_seconds"], "wall_s": wall,
            "tokens": r["tokens_seen"], "eval_after": run["evaluation"]["after"]["eval_loss"],
            "predicted_s": run["plan"]["est_seconds"]}


def table(results: list[dict]) -> str:
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        key = (r["data"], r["rows"], r.get("date", ""), r.get("session", ""))  # a speed-up only within one session
        cells.setdefault(key, {}).setdefault(layout_of(r), []).append(r)
    shown = [name for name in LAYOUTS if any(name in by for by in cells.values())]
    others = [name for name in shown if name != "one"]
    lines = ["| data | rows per step | tokens per row | " + " | ".join(f"{n}: train s (wall)" for n in shown)
             + "".join(f" | {n}: speed-up" for n in others) + " | eval loss " + " / ".join(shown) + " |",
             "|---|---:|---:|" + "---:|" * (len(shown) + len(others)) + "---|"]
    for (data, rows, _, _), by in sorted(cells.items()):
        if "one" not in by or not any(n in by for n in others):
            continue
        mean = {n: {k: sum(r[k] for r in by[n]) / len(by[n]) for k in ("train_s", "wall_s", "eval_after")}
                for n in shown if n in by}
        per_row = by["one"][0]["tokens"] / (by["one"][0]["rows"] * by["one"][0]["steps"])
        cols = [f"{mean[n]['train_s']:.1f} ({mean[n]['wall_s']:.0f})" if n in mean else "-" for n in shown]
        ups = [f"{mean['one']['train_s'] / mean[n]['train_s']:.2f}x" if n in mean else "-" for n in others]
        losses = " / ".join(f"{mean[n]['eval_after']:.5f}" if n in mean else "-" for n in shown)
        lines.append(f"| {data} | {rows} | {per_row:.0f} | " + " | ".join(cols + ups) + f" | {losses} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="2,4,8,16")
    p.add_argument("--data", default="sample,multiturn")
    p.add_argument("--layouts", default="one,lanes,procs", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--print", action="store_true", help="print the table of what --results holds, run nothing")
    a = p.parse_args()
    if a.print:
        with open(a.results, encoding="utf-8") as fh:
            return print(table([json.loads(line) for line in fh if line.strip()]))
    stamp, session = time.strftime("%Y-%m-%d"), time.strftime("%H:%M")
    results = []
    for data in a.data.split(","):
        folder = data_dir(data)  # written once, not before every run
        for rows in (int(x) for x in a.rows.split(",")):
            for rep in range(a.repeats):
                layouts = a.layouts.split(",")
                for layout in (layouts if rep % 2 == 0 else layouts[::-1]):  # interleaved: drift hits every side
                    with tempfile.TemporaryDirectory() as tmp:
                        rec = {"data": data, "date": stamp, "session": session, "cpus": os.cpu_count(),
                               **train(folder, rows, layout, os.path.join(tmp, "run"))}
                    print(json.dumps(rec), flush=True)
                    results.append(rec)
                    with open(a.results, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
