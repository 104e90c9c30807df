"""Run directories as records: a lock that tells a live run from a dead one, and `finetune runs`.

While a run trains, it holds an exclusive flock on RUN_DIR/.lock (which also names its pid). The kernel
drops the lock when the process ends, however it ends, so a run.json still saying "running" whose lock
can be taken belongs to a run that died (kill -9, power loss, host out of memory).
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex

from finetune import checkpoint
from finetune.errors import UserError

LOCK = ".lock"
RUN_JSON = "run.json"


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.fh = None

    def __enter__(self) -> "RunLock":
        self.fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            owner = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"{os.path.dirname(self.path)} is in use by a running training ({owner}); "
                            "wait for it or stop it first") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.fh:
            self.fh.close()   # closing releases the lock; the file stays (harmless, tells nothing by itself)


def is_live(run_dir: str) -> bool:
    """True while a process holds the run's lock."""
    path = os.path.join(run_dir, LOCK)
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


def read_record(run_dir: str) -> dict | None:
    try:
        return load_record(run_dir)
    except UserError:
        return None


def record_of(run_dir: str, what: str) -> dict:
    """run.json of the run directory `what` names (RESUME, RUN_DIR), or one line saying why it cannot be read."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{what}={run_dir}: not a run directory ({'a file' if os.path.exists(run_dir) else 'no such folder'}); "
                        "see `./run.sh runs`")
    try:
        return load_record(run_dir)
    except UserError as err:
        raise UserError(f"{what}={run_dir}: {err}") from None


def load_record(run_dir: str) -> dict:
    """run.json as a dict, or a one-line error saying what is wrong with it (missing, unreadable, damaged)."""
    path = os.path.join(run_dir, RUN_JSON)
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (not a run directory)") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror})") from None
    except (ValueError, RecursionError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UserError(f"{path}{where}: damaged (not valid JSON); the run's other files are untouched") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: damaged (a JSON {type(record).__name__}, not an object)")
    return record


def status(run_dir: str, record: dict | None = None) -> str:
    record = record if record is not None else read_record(run_dir)
    if record is None:
        return "unknown"
    state = record.get("status", "unknown")
    if state == "running" and not is_live(run_dir):
        return "died"
    return state


def resume_command(run_dir: str) -> str:
    return f"./run.sh train --resume {shlex.quote(run_dir)}"


def summary(run_dir: str) -> dict | None:
    """One row of `finetune runs`: a damaged run.json is a row saying so, never the end of the listing."""
    if not os.path.exists(os.path.join(run_dir, RUN_JSON)):
        return None
    try:
        return _summary(run_dir, load_record(run_dir))
    except (UserError, AttributeError, TypeError, KeyError) as err:  # wrong types inside a hand-edited record too
        reason = str(err) if isinstance(err, UserError) else f"{run_dir}/{RUN_JSON}: damaged ({type(err).__name__})"
        return {"run_dir": run_dir, "status": "damaged", "method": None, "model": None, "step": 0, "max_steps": None,
                "eval_loss_before": None, "eval_loss_after": None, "started": None, "resume": None, "problem": reason}


def _summary(run_dir: str, record: dict) -> dict:
    state = status(run_dir, record)
    ckpts = checkpoint.whole(run_dir)
    step = record.get("step_reached", ckpts[-1][0] if ckpts else 0)
    if state == "died" and ckpts:
        step = ckpts[-1][0]
    total = (record.get("plan") or {}).get("max_steps")
    evaluation = record.get("evaluation") or {}
    before = (evaluation.get("before") or {}).get("eval_loss")
    after = (evaluation.get("after") or {}).get("eval_loss")
    resumable = state in ("interrupted", "died", "failed") and bool(ckpts)
    return {"run_dir": run_dir, "status": state, "method": (record.get("config") or {}).get("method"),
            "model": (record.get("model") or {}).get("name"), "step": step, "max_steps": total,
            "eval_loss_before": before, "eval_loss_after": after, "started": record.get("started"),
            "resume": resume_command(run_dir) if resumable else None}


def find(root: str) -> list[dict]:
    """Every run directory directly under `root` (or `root` itself), newest first. No `outputs/` yet is no runs;
    a folder the user named that is missing or a file is an error."""
    if not os.path.isdir(root):
        if root == "outputs" and not os.path.exists(root):
            return []
        raise UserError(f"runs {root}: {'is a file' if os.path.exists(root) else 'no such folder'}; give the folder "
                        "that holds run directories (default outputs)")
    candidates = [root] if os.path.isfile(os.path.join(root, RUN_JSON)) else \
        [os.path.join(root, n) for n in sorted(os.listdir(root))]
    rows = [s for d in candidates if os.path.isdir(d) and (s := summary(d))]
    return sorted(rows, key=lambda r: str(r.get("started") or ""), reverse=True)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs found"
    def loss(v):
        return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
    lines = [f"{'status':<12} {'step':>9}  {'eval loss':<17} {'method':<5} run directory"]
    for r in rows:
        step = f"{r['step']}/{r['max_steps']}" if r["max_steps"] else str(r["step"])
        lines.append(f"{r['status']:<12} {step:>9}  {loss(r['eval_loss_before']) + ' -> ' + loss(r['eval_loss_after']):<17} "
                     f"{r['method'] or '-':<5} {r['run_dir']}")
        if r["resume"]:
            lines.append(f"{'':<12} resume: {r['resume']}")
        if r.get("problem"):
            lines.append(f"{'':<12} {r['problem']}")
    return "\n".join(lines)
