"""SFT -> DPO and SFT -> GRPO on the real offline model, each step the real CLI, printing the before/after numbers
each report holds. The SFT run is kept short on purpose, so the preference and reward stages have room to show
what they add on top of it.

  sft    METHOD=sft,  the sample,      SFT_STEPS steps x 16
  dpo    METHOD=dpo  ADAPTER=<sft run>, the DPO sample (chosen JSON vs realistic mistakes), beta 0.1
  grpo   METHOD=grpo ADAPTER=<sft run>, the GRPO sample, REWARD=json_format,exact_match, G=4
--backend mlx runs every stage with BACKEND=mlx (mlx[cpu] in fp32 with the system OpenBLAS here: a correctness
run, not a speed one); --sft DIR starts DPO/GRPO from an existing SFT run of either backend (PEFT or MLX format).

Run:  python bench/methods.py [--backend torch|mlx] [--sft DIR] [--only dpo|grpo] [--rpo-alpha A]
      (torch ~15 min; mlx ~20 min per stage on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "smollm2-135m-offline"
SETTINGS = {
    "torch": {"sft": {"MAX_STEPS": "3", "BATCH_SIZE": "16", "GRAD_ACCUM": "1"},
              "dpo": {"MAX_STEPS": "20", "BATCH_SIZE": "8", "GRAD_ACCUM": "2"},  # DPO's default lr 2e-5
              "grpo": {"MAX_STEPS": "16", "BATCH_SIZE": "16", "GRAD_ACCUM": "1",  # GRPO's default lr 5e-5
                       "MAX_NEW_TOKENS": "40"}},
    # mlx[cpu] with the system OpenBLAS (backends/mlx_blas.py). In its fp32 the torch 3-step SFT adapter (and
    # one MLX step at 2e-4) already rank all 64 held-out pairs right, leaving DPO nothing to raise, so its SFT
    # is one step at 3e-5 (84 %) and DPO is scored on all 64 held-out pairs; DPO/GRPO settings as torch's
    "mlx": {"sft": {"MAX_STEPS": "1", "BATCH_SIZE": "16", "GRAD_ACCUM": "1", "LEARNING_RATE": "3e-5"},
            "dpo": {"MAX_STEPS": "20", "BATCH_SIZE": "8", "GRAD_ACCUM": "2", "EVAL_ROWS": "64"},
            "grpo": {"MAX_STEPS": "16", "BATCH_SIZE": "16", "GRAD_ACCUM": "1", "MAX_NEW_TOKENS": "40"}},
}


def subset(method: str, rows: int, work: str) -> str:
    """The first `rows` training rows of the method's sample (validation file kept), for the slow MLX runs."""
    from finetune import methods

    src = methods.get(method).SAMPLE_DIR
    out = os.path.join(work, f"{method}-subset")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(src, "train.jsonl")) as fh, open(os.path.join(out, "train.jsonl"), "w") as dst:
        dst.writelines(fh.readlines()[:rows])
    with open(os.path.join(src, "validation.jsonl")) as fh, open(os.path.join(out, "validation.jsonl"), "w") as dst:
        dst.writelines(fh.readlines())
    return out


def train(name: str, env_extra: dict, work: str) -> dict:
    out = os.path.join(work, name)
    env = {**os.environ, "MODEL": MODEL, "OUTPUT_DIR": out, **env_extra}
    done = subprocess.run([sys.executable, "-m", "finetune", "train"], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    run = json.load(open(os.path.join(out, "run.json")))
    run["dir"] = out
    return run


def row(name: str, run: dict) -> str:
    before, after = run["evaluation"]["before"], run["evaluation"]["after"]
    keys = [k for k in before["metrics"] if k in ("pref_accuracy", "reward_margin", "reward", "reward/json_format",
                                                   "reward/exact_match", "completion_length", "valid_format", "exact_match")]
    parts = ([f"eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"] if before.get("eval_loss") is not None
             else []) + [f"{k} {before['metrics'][k]:.3f} -> {after['metrics'][k]:.3f}" for k in keys]
    r = run["result"]
    return (f"| {name} | {run['plan']['backend']} | {r['steps']} x {run['plan']['batch_size']}x{run['plan']['grad_accum']} | "
            f"{r['train_seconds']:.0f} s | {'; '.join(parts)} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--sft", default=None, help="reuse this SFT run directory instead of training one")
    p.add_argument("--only", choices=("dpo", "grpo"), help="run only this stage after SFT")
    p.add_argument("--rpo-alpha", default=None, help="DPO: add the chosen answers' NLL with this weight (RPO_ALPHA)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench-methods-")
    print(f"model {MODEL}; runs in {work}")
    lines = ["| stage | backend | steps x batch | train time | before -> after (held-out) |", "|---|---|---|---|---|"]
    sft_dir = args.sft
    if sft_dir is None:
        sft = train("sft", {**SETTINGS[args.backend]["sft"], "BACKEND": args.backend}, work)
        sft_dir = sft["dir"]
        lines.append(row("sft", sft))
        print(lines[-1], flush=True)
    for method in (args.only,) if args.only else ("dpo", "grpo"):
        settings = dict(SETTINGS[args.backend][method])
        rows = settings.pop("ROWS", None)
        extra = {"METHOD": method, "ADAPTER": sft_dir, "BACKEND": args.backend, **settings}
        if method == "dpo" and args.rpo_alpha is not None:
            extra["RPO_ALPHA"] = args.rpo_alpha
        if rows:
            extra["DATASET"] = subset(method, int(rows), work)
        lines.append(row(f"sft -> {method}", train(method, extra, work)))
        print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
