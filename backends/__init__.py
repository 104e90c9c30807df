"""Backends: one module each, behind one small protocol, found by name.

Built-ins are listed in BUILTIN; third parties add theirs through the `finetune.backends` entry-point
group (value: "module:object", the object satisfying `Backend`). A backend receives decided values
(Config + Plan) and never reads env or CLI itself. Methods (sft, dpo, grpo) are a value in the plan,
not new backends: `supports()` says which it can run.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Iterator, Protocol

from finetune.errors import UserError
from finetune.hardware import Hardware
from finetune.models import ModelInfo

# name -> "module:attribute"; imported lazily so `doctor` and `--dry-run` stay fast
BUILTIN = {"torch": "backends.torch_backend:BACKEND", "mlx": "backends.mlx_backend:BACKEND",
           "unsloth": "backends.unsloth_backend:BACKEND"}
PREFERENCE = ("mlx", "unsloth", "torch")  # auto choice: first usable one wins (MLX on Apple silicon, Unsloth on CUDA)


class Session(Protocol):
    """A loaded model with its adapter attached (fresh LoRA starts as the base model exactly). The loop
    (finetune/loop.py) drives it; methods (finetune/methods/) build the batches."""

    def token_logps(self, rows: list, adapter: bool = True) -> list: ...   # per row: trained tokens' log-probs
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 num_return: int = 1) -> list[list[int]]: ...
    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
               adapter: bool = True) -> Iterator[int]: ...                # chat
    def train_step(self, batch, micro_batch: int, lr: float) -> dict: ...  # one optimizer step; loss, tokens
    def reseed(self, seed: int) -> None: ...
    def save_adapter(self, directory: str) -> list[str]: ...               # returns the files written
    def load_adapter_weights(self, directory: str) -> None: ...
    def save_state(self, directory: str) -> None: ...                      # optimizer state (checkpoints)
    def load_state(self, directory: str) -> None: ...
    def peak_memory_gb(self) -> float: ...
    def is_oom(self, err: BaseException) -> bool: ...
    def release_memory(self) -> None: ...
    def describe(self) -> dict: ...


class Backend(Protocol):
    name: str

    def available(self, hw: Hardware) -> str | None: ...               # None = usable, else why not
    def supports(self, model: ModelInfo, method: str) -> str | None: ...
    def device(self, hw: Hardware) -> str: ...                          # "cuda" | "mps" | "cpu" | "mlx"
    def load(self, cfg, plan, model: ModelInfo, tokenizer, adapter: str | None = None) -> Session: ...
    # Optional: `auto_skip(hw) -> str | None` -- usable when named (BACKEND=x) but not a good automatic
    # choice on this machine (MLX off Apple silicon), with the reason `doctor` prints.
    # Optional: `before_transformers(hw) -> None` -- called before anything imports transformers, for a backend
    # that patches it as it loads (Unsloth); only for the backend asked for, or every candidate of `auto`.
    # Optional: `join(hw) -> finetune.world.World` -- for a process started by a launcher (torchrun, mlx.launch):
    # its rank and the backend's sum over the processes. The session's `world` attribute is then set to it and its
    # train_step sums the step's gradients over the processes (finetune/world.py has the rules).


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


def before_transformers(requested: str, hw: Hardware) -> None:
    for name in (names() if requested == "auto" else (requested,) if requested in names() else ()):
        try:
            hook = getattr(get(name), "before_transformers", None)
        except Exception:  # a plugin that cannot even import: select() reports backends, this only prepares them
            continue
        if hook:
            hook(hw)


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
