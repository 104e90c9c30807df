"""The run directory: created only after input is validated, never reused, written by every backend alike.

    adapter_model.safetensors, adapter_config.json, tokenizer files   (the backend saves these)
    run.json          resolved config + source of each value, hardware, versions, plan, results
    metrics.jsonl     one line per logged step / eval
    training_log.txt  everything the run printed
    loss.png          train and eval loss curves
    report.md         before/after evaluation with side-by-side generations
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from finetune.errors import UserError


def default_run_name(model_name: str, method: str) -> str:
    short = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name.rstrip("/").split("/")[-1]).lower()
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{short}-{method}"


def check_output_dir(output_dir: str | None, run_name: str) -> str:
    """The directory this run will write; refuses one that already holds anything (nothing is overwritten)."""
    if output_dir:
        if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
            raise UserError(f"OUTPUT_DIR={output_dir} already exists and is not empty; choose a new OUTPUT_DIR "
                            "(earlier runs are never overwritten)")
        return output_dir
    path, n = os.path.join("outputs", run_name), 2
    while os.path.exists(path):  # two runs started in the same second get -2, -3, ...
        path, n = os.path.join("outputs", f"{run_name}-{n}"), n + 1
    return path


class Tee:
    """Copies what the run prints into training_log.txt (progress redraws become plain lines there)."""

    def __init__(self, stream, path: str):
        self.stream, self.file = stream, open(path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text.replace("\r\033[K", "\n") if "\r" in text else text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def close(self) -> None:
        self.file.close()


def start_log(path: str) -> tuple[Tee, Tee]:
    out, err = Tee(sys.stdout, path), Tee(sys.stderr, path)
    sys.stdout, sys.stderr = out, err
    return out, err


def stop_log(tees: tuple[Tee, Tee]) -> None:
    sys.stdout, sys.stderr = tees[0].stream, tees[1].stream
    for tee in tees:
        tee.close()


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)  # a reader never sees half a run.json


def plot_loss(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quote(text: str) -> str:
    return "\n".join("    " + line for line in (text or "(empty)").splitlines()) or "    (empty)"


def write_report(path: str, run: dict, before: dict, after: dict) -> None:
    cfg, plan, result = run["config"], run["plan"], run["result"]
    lines = [
        f"# Fine-tuning report: {run['run_name']}", "",
        f"- model: `{run['model']['name']}`{' (offline tiny model: pipeline check, not a useful LM)' if run['model']['is_tiny'] else ''}",
        f"- dataset: `{run['data']['source']}` ({run['data']['train_rows']} train / {run['data']['validation_rows']} "
        f"validation rows, shape `{run['data']['shape']}`)",
        f"- backend: {plan['backend']} on {plan['device']}, dtype {plan['dtype']}, quantize {plan['quantize']}, "
        f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
        f"- steps: {result['steps']} x batch {plan['batch_size']} x accum {plan['grad_accum']}, "
        f"LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']:g}, lr {cfg['learning_rate']:g}",
        f"- time: {result['train_seconds']:.1f} s training, {result['tokens_per_s']:,.0f} tokens/s",
        f"- peak memory: predicted {plan['predicted_peak_gb']:.2f} GB, measured {result['peak_memory_gb'] or 0:.2f} GB", "",
        "## Before / after (held-out rows)", "",
        "| metric | base model | with adapter |", "|---|---|---|",
        f"| eval loss (per trained token) | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |",
    ]
    for key in before["metrics"]:
        n = len(before["generations"])
        lines.append(f"| {key} ({n} generations) | {before['metrics'][key]:.1%} | {after['metrics'].get(key, 0):.1%} |")
    lines += ["", "## Side-by-side generations", ""]
    for i, (b, a) in enumerate(zip(before["generations"], after["generations"]), 1):
        lines += [f"### Example {i}", "", "Prompt:", "", _quote(b["prompt"]), "", "Expected:", "", _quote(b["expected"]),
                  "", "Base model:", "", _quote(b["generated"]), "", "With adapter:", "", _quote(a["generated"]), ""]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
