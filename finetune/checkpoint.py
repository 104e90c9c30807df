"""Checkpoints in the run directory: RUN_DIR/checkpoints/step-N/, each whole or absent.

A checkpoint is built under a temp name and renamed into place (finetune.fsio.build_dir), so a run killed
mid-save leaves at most a dot-named temp folder, which `latest` ignores and `clean` removes. Contents:
    adapter_model.safetensors, adapter_config.json  the adapter as of step N (loads in plain PEFT)
    mlx/                                            MLX runs: the mlx-lm adapter too
    optimizer.pt / optimizer.safetensors            the backend's optimizer state (torch, + its fp16 loss scale /
                                                    MLX); random state needs none: the loop reseeds every step
    trainer_state.json                              the loop's state: step, data position, micro-batch...
Only the newest SAVE_TOTAL checkpoints are kept; older ones are removed after a newer one is whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

from finetune import fsio


@dataclass
class LoopState:
    """What a checkpoint restores (besides the backend's weights, optimizer and RNG)."""
    step: int = 0                  # optimizer steps done
    position: int = 0              # items drawn from the order stream
    micro_batch: int = 1
    grad_accum: int = 1
    tokens_seen: int = 0           # non-padding input tokens trained on
    train_seconds: float = 0.0     # time in steps (evaluation and checkpoints excluded)
    records: list[dict] = field(default_factory=list)   # metrics.jsonl so far
    oom_events: list[dict] = field(default_factory=list)
    skipped_steps: int = 0         # steps whose loss or gradient was not finite: counted, never applied
    losses: list[float] = field(default_factory=list)   # each applied step's train loss (LR_SCHEDULER=auto reads it)
    decay_from: int | None = None  # LR_SCHEDULER=auto: the step after which the loss had flattened and the LR decays

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


DIR = "checkpoints"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def root(run_dir: str) -> str:
    return os.path.join(run_dir, DIR)


def whole(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every whole checkpoint, oldest first."""
    base = root(run_dir)
    if not os.path.isdir(base):
        return []
    found = []
    for name in os.listdir(base):
        m = _NAME.match(name)
        if m and os.path.isfile(os.path.join(base, name, STATE)):
            found.append((int(m.group(1)), os.path.join(base, name)))
    return sorted(found)


def latest(run_dir: str) -> str | None:
    found = whole(run_dir)
    return found[-1][1] if found else None


def save(run_dir: str, session, state, keep: int) -> str:
    """Write checkpoint step-<state.step> (a no-op when it exists) and keep the newest `keep`."""
    final = os.path.join(root(run_dir), f"step-{state.step}")
    if not os.path.isfile(os.path.join(final, STATE)):
        def build(tmp: str) -> None:
            session.save_adapter(tmp)
            session.save_state(tmp)
            fsio.write_json(os.path.join(tmp, STATE), state.to_dict())

        fsio.build_dir(final, build)
    for _, old in whole(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE), encoding="utf-8") as fh:
        return json.load(fh)


def load(path: str, session):
    """Restore the backend from checkpoint `path`; returns the loop state saved with it."""
    session.load_adapter_weights(path)
    session.load_state(path)
    return LoopState.from_dict(read_state(path))


def clean(run_dir: str) -> None:
    """Remove temp folders a killed save left behind."""
    base = root(run_dir)
    if os.path.isdir(base):
        for name in os.listdir(base):
            if name.startswith("."):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
