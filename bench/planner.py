"""The planner's memory and time predictions against measurements, cell by cell, on the real offline model.

Grid: batch 1/4/16 x rows of ~90 tokens (the shipped sample) and ~500 tokens (sample sentences joined into
long conversations) x gradient checkpointing on/off x fp32/bf16. Each cell is `python -m finetune train` in
its own process (MAX_STEPS steps, no generations), so its measured peak (process RSS, as run.json records it)
is that cell's alone. Prints predicted vs measured peak memory (goal: every cell within +-20%) and predicted vs
measured training time (goal: within +-30%).

Short cells run more steps (at least --min-tokens tokens, so that a few seconds of start-up noise on a shared
machine do not decide the cell).

Run:  python bench/planner.py [--steps 6] [--quick | --batches 1,4] (~30 minutes on 2 cores; --quick: batch 1, 16)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MODEL = "smollm2-135m-offline"


def long_rows(path: str, n: int = 64, sentences: int = 14) -> str:
    """Conversations of ~500 tokens: many sample sentences in, the JSON list of their people out."""
    from finetune.sample_data import SYSTEM_PROMPT, generate

    base = generate(n * sentences, seed=5)
    with open(path, "w") as fh:
        for i in range(n):
            chunk = base[i * sentences:(i + 1) * sentences]
            text = " ".join(r["messages"][1]["content"] for r in chunk)
            answer = "[" + ", ".join(r["messages"][2]["content"] for r in chunk[:6]) + "]"
            fh.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": text},
                                              {"role": "assistant", "content": answer}]}) + "\n")
    return path


def run_cell(dataset: str, batch: int, ckpt: str, dtype: str, steps: int) -> dict:
    out = os.path.join(tempfile.mkdtemp(prefix="bench-plan-"), "run")
    env = {**os.environ, "MODEL": MODEL, "DATASET": dataset, "BATCH_SIZE": str(batch), "GRAD_ACCUM": "1",
           "GRADIENT_CHECKPOINTING": ckpt, "DTYPE": dtype, "MAX_STEPS": str(steps), "EVAL_GENERATIONS": "0",
           "EVAL_ROWS": str(batch), "EVAL_STEPS": str(10 ** 6), "SAVE_STEPS": str(10 ** 6), "OUTPUT_DIR": out,
           "BACKEND": "torch"}
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    run = json.load(open(os.path.join(out, "run.json")))
    r, plan = run["result"], run["plan"]
    return {"predicted_gb": plan["predicted_peak_gb"], "measured_gb": r["peak_memory_gb"],
            "predicted_s": plan["est_seconds"], "measured_s": r["train_seconds"], "tokens": run["data"]["mean_tokens"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--min-tokens", type=int, default=8000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,4,16)")
    p.add_argument("--ckpt", default="off,on", help="gradient checkpointing values (default off,on)")
    p.add_argument("--rows", default="~90,~500", help="row lengths (default ~90,~500)")
    args = p.parse_args()
    long_path = long_rows(os.path.join(tempfile.mkdtemp(prefix="bench-long-"), "long.jsonl"))
    datasets = {k: v for k, v in {"~90": "sample", "~500": long_path}.items() if k in args.rows.split(",")}
    row_tokens = {"~90": 88, "~500": 438}
    batches = (tuple(int(b) for b in args.batches.split(",")) if args.batches else (1, 16) if args.quick
               else (1, 4, 16))
    print(f"model {MODEL}, torch backend on {os.cpu_count()} CPU cores, >= {args.steps} steps and >= "
          f"{args.min_tokens} tokens per cell; memory = peak process RSS (run.json)")
    print("\n| rows | batch | steps | ckpt | dtype | predicted GB | measured GB | error | predicted s | measured s | error |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|")
    worst_mem = worst_time = 0.0
    for (label, ds), batch, ckpt, dtype in itertools.product(datasets.items(), batches, args.ckpt.split(","),
                                                             ("fp32", "bf16")):
        steps = max(args.steps, -(-args.min_tokens // (batch * row_tokens[label])))
        cell = run_cell(ds, batch, ckpt, dtype, steps)
        if "error" in cell:
            print(f"| {label} | {batch} | {steps} | {ckpt} | {dtype} | failed: {cell['error']} |")
            continue
        mem_err = cell["predicted_gb"] / cell["measured_gb"] - 1
        time_err = cell["predicted_s"] / cell["measured_s"] - 1
        worst_mem, worst_time = max(worst_mem, abs(mem_err)), max(worst_time, abs(time_err))
        print(f"| {label} ({cell['tokens']:.0f}) | {batch} | {steps} | {ckpt} | {dtype} | {cell['predicted_gb']:.2f} | "
              f"{cell['measured_gb']:.2f} | {mem_err:+.0%} | {cell['predicted_s']:.1f} | {cell['measured_s']:.1f} | "
              f"{time_err:+.0%} |", flush=True)
    print(f"\nworst memory error {worst_mem:.0%} (goal <= 20%), worst time error {worst_time:.0%} (goal <= 30%)")


if __name__ == "__main__":
    main()
