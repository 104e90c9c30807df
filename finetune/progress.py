"""Progress display shared by every backend: one line with step, loss, tokens/s, ETA and memory.

The loop calls `Progress.__call__` with plain dict events ({"event": "step"|"log", "step", "tokens",
"seconds", "loss", "eval_loss", "memory_gb", ...}); "log" events are also appended to metrics.jsonl.
`seconds` and `tokens` count the whole run, so a resumed run shows the same rate and ETA as before.
"""
from __future__ import annotations

import json
import sys

from finetune import fsio


def hms(seconds: float) -> str:
    """H:MM:SS, the one format for durations (ETA, plan estimates, job timeouts)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, metrics_path: str | None, stream=None, tracker=None):
        self.total = total_steps
        self.tracker = tracker
        self.metrics_path = metrics_path
        self.stream = stream or sys.stdout
        self.last_loss: float | None = None
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, event: dict) -> None:
        if event.get("event") == "log":
            record = {k: v for k, v in event.items() if k != "event"}
            if self.metrics_path:
                with open(self.metrics_path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(fsio.finite(record), allow_nan=False) + "\n")
            if self.tracker:
                self.tracker.log(record)
            self.last_loss = record.get("loss", self.last_loss)
            shown = {k: v for k, v in record.items() if k.startswith("eval_") or k.startswith("reward")}
            if "eval_loss" in record or any(k.startswith("eval_") for k in record):
                text = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                self._print(f"  eval @ step {record['step']}: {text}", final=True)
            return
        step = event.get("step", 0)
        done = step >= self.total
        # Non-TTY output (CI logs, training_log.txt) gets a line every 10% instead of a redraw per step.
        if not self.tty and not done and step % max(1, self.total // 10):
            return
        seconds = event.get("seconds") or 0.0
        tok_s = event.get("tokens", 0) / seconds if seconds > 0 else 0.0
        eta = seconds / step * (self.total - step) if step else 0.0
        width = 24
        bar = "#" * int(width * step / max(self.total, 1))
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "-"
        mem = f"{event['memory_gb']:.2f} GB" if event.get("memory_gb") is not None else "-"
        self._print(f"  [{bar:<{width}}] step {step}/{self.total} | loss {loss} | {tok_s:,.0f} tok/s | "
                    f"ETA {hms(eta)} | mem {mem}", final=done or not self.tty)

    def _print(self, line: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
