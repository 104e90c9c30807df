"""Backends: one module each, behind one small protocol, found by name.

Built-ins are listed in BUILTIN; third parties add theirs through the `finetune.backends` entry-point
group (value: "module:object", the object satisfying `Backend`). A backend receives decided values
(Config + Plan) and never reads env or CLI itself. Methods (sft now, dpo/grpo later) are a value in
the plan, not new backends: `supports()` says which it can run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Protocol

from finetune.errors import UserError
from finetune.hardware import Hardware
from finetune.models import ModelInfo

# name -> "module:attribute"; imported lazily so `doctor` and `--dry-run` stay fast
BUILTIN = {"torch": "backends.torch_backend:BACKEND", "mlx": "backends.mlx_backend:BACKEND"}
PREFERENCE = ("mlx", "torch")  # auto choice: first usable one wins (MLX first on Apple silicon)


@dataclass
class TrainResult:
    train_seconds: float
    steps: int
    tokens_seen: int
    tokens_per_s: float
    final_train_loss: float | None
    peak_memory_gb: float | None       # measured by the backend on its device
    extra: dict[str, Any] = field(default_factory=dict)


class Session(Protocol):
    """A loaded model: the base model until `train()`, the base + adapter after it."""

    def eval_loss(self, rows: list) -> float: ...                       # rows: list[template.Encoded]
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]: ...
    def train(self, train_rows: list, eval_rows: list, on_log: Callable[[dict], None]) -> TrainResult: ...
    def save_adapter(self, run_dir: str) -> list[str]: ...              # returns the files written


class Backend(Protocol):
    name: str

    def available(self, hw: Hardware) -> str | None: ...               # None = usable, else why not
    def supports(self, model: ModelInfo, method: str) -> str | None: ...
    def device(self, hw: Hardware) -> str: ...                          # "cuda" | "mps" | "cpu" | "mlx"
    def load(self, cfg, plan, model: ModelInfo, tokenizer) -> Session: ...
    # Optional: `auto_skip(hw) -> str | None` -- usable when named (BACKEND=x) but not a good automatic
    # choice on this machine (MLX off Apple silicon), with the reason `doctor` prints.


def _registry() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="finetune.backends"):
        found.setdefault(ep.name, ep.value)
    return found


def names() -> tuple[str, ...]:
    return tuple(_registry())


def get(name: str) -> Backend:
    target = _registry().get(name)
    if target is None:
        raise UserError(f"BACKEND={name!r} is not valid: choose one of auto, {', '.join(names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def select(requested: str, hw: Hardware, model: ModelInfo | None, method: str) -> tuple[Backend, list[str]]:
    """The backend to use and why (one line per candidate considered)."""
    if requested != "auto":
        backend = get(requested)
        why_not = backend.available(hw) or (model and backend.supports(model, method))
        if why_not:
            raise UserError(f"BACKEND={requested} cannot run here: {why_not}")
        return backend, [f"{requested}: chosen by you"]
    reasons = []
    order = [n for n in PREFERENCE if n in names()] + [n for n in names() if n not in PREFERENCE]
    for name in order:
        backend = get(name)
        # auto_skip: usable when asked for by name, but not a good default here (MLX off Apple silicon)
        auto_skip = getattr(backend, "auto_skip", lambda hw: None)
        why_not = backend.available(hw) or auto_skip(hw) or (model and backend.supports(model, method))
        if why_not is None:
            reasons.append(f"{name}: chosen (first usable of {', '.join(order)})")
            return backend, reasons
        reasons.append(f"{name}: skipped, {why_not}")
    raise UserError("no backend can run here: " + "; ".join(reasons))
