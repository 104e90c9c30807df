"""GRPO reward functions: built-ins for checkable answers and a user's own, loaded from a Python file.

A reward function has TRL's signature, so functions written for TRL's GRPOTrainer work here unchanged:

    def my_reward(prompts, completions, **kwargs) -> list[float]

`completions` are strings (for conversational prompts, TRL-style [{"role": "assistant", "content": ...}] lists);
every other dataset column arrives as a keyword argument holding one value per completion (e.g. `answer`).
REWARD=json_format,exact_match sums the named rewards; REWARD=path/to/file.py:function loads one.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import numbers
import os
import re
import signal
import threading
from typing import Callable

from finetune.errors import UserError, first_line
from finetune.evaluate import json_object, score

REWARD_TIMEOUT_S = float(os.environ.get("FINETUNE_REWARD_TIMEOUT_S", "120"))  # one call, all completions of a step
ANSWER_COLUMNS = ("answer", "solution", "ground_truth", "reference", "target", "final_answer")


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: the assistant turn(s)
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _answers(kwargs: dict, n: int) -> list | None:
    for col in ANSWER_COLUMNS:
        if col in kwargs:
            return [None if v is None else str(v) for v in kwargs[col]]
    return None


def json_format(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is exactly one JSON object (with the answer's keys and value types when the data
    has an answer column), else 0.0."""
    answers = _answers(kwargs, len(completions))
    out = []
    for i, c in enumerate(completions):
        text = _text(c)
        if answers and answers[i] is not None and json_object(answers[i]) is not None:
            out.append(float(score(answers[i], text)["valid_format"]))
        else:
            out.append(float(json_object(text) is not None))
    return out


def exact_match(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion equals the answer column (JSON compared as objects, text ignoring spacing)."""
    answers = _answers(kwargs, len(completions))
    if answers is None:
        raise UserError(f"REWARD=exact_match needs an answer column ({', '.join(ANSWER_COLUMNS)}) in the data")
    return [float(a is not None and score(a, _text(c))["exact_match"]) for a, c in zip(answers, completions)]


def contains_answer(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the answer column's text occurs in the completion (case and spacing ignored): for free-form
    answers such as math results."""
    answers = _answers(kwargs, len(completions))
    if answers is None:
        raise UserError(f"REWARD=contains_answer needs an answer column ({', '.join(ANSWER_COLUMNS)}) in the data")
    norm = lambda s: re.sub(r"\s+", " ", s.strip().lower())  # noqa: E731
    return [float(a is not None and norm(a) in norm(_text(c))) for a, c in zip(answers, completions)]


BUILTIN: dict[str, Callable] = {"json_format": json_format, "exact_match": exact_match,
                                "contains_answer": contains_answer}


def _load_user(spec: str) -> Callable:
    path, _, name = spec.rpartition(":")
    where = f"REWARD={spec}"
    if not path.endswith(".py") or not name:
        raise UserError(f"{where}: expected a built-in ({', '.join(BUILTIN)}) or file.py:function")
    if not os.path.isfile(path):
        raise UserError(f"{where}: file {path} not found")
    module_name = "finetune_user_reward_" + re.sub(r"\W", "_", os.path.abspath(path))
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except BaseException as err:  # noqa: BLE001 -- any failure in the user's module is reported in one line
        if isinstance(err, KeyboardInterrupt):
            raise
        raise UserError(f"{where}: {path} cannot be imported ({type(err).__name__}: {first_line(err)})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"{where}: {path} has no function '{name}'")
    if not callable(fn):
        raise UserError(f"{where}: '{name}' in {path} is not a function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    kinds = {p.kind for p in params.values()}
    if "completions" not in params and inspect.Parameter.VAR_KEYWORD not in kinds:
        raise UserError(f"{where}: {name}{inspect.signature(fn)} must accept `completions` (TRL's signature: "
                        "def f(prompts, completions, **kwargs) -> list[float])")
    required = [p for p in params.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name not in ("prompts", "completions", "completion_ids")]
    if required and inspect.Parameter.VAR_KEYWORD not in kinds:
        raise UserError(f"{where}: {name}{inspect.signature(fn)} requires {', '.join(p.name for p in required)}, "
                        "which is not a dataset column; use def f(prompts, completions, **kwargs)")
    return fn


@functools.lru_cache(maxsize=8)
def load(spec: str) -> list[tuple[str, Callable]]:
    """(name, function) for each comma-separated reward."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        out.append((part, BUILTIN[part] if part in BUILTIN else _load_user(part)))
    if not out:
        raise UserError("REWARD is empty; name at least one reward")
    return out


def _limited(run: Callable, where: str):
    """run() under a wall-clock limit (SIGALRM: the user's code runs in the main thread), so a reward that hangs
    ends the run with a line saying which one, instead of hanging it."""
    if threading.current_thread() is not threading.main_thread():
        return run()

    def expired(*_):
        raise UserError(f"{where} did not return within {REWARD_TIMEOUT_S:g} s (FINETUNE_REWARD_TIMEOUT_S); "
                        "make it faster or raise the limit")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, REWARD_TIMEOUT_S)
    try:
        return run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def call(name: str, fn: Callable, prompts: list, completions: list, columns: dict) -> list[float]:
    """Run one reward and check what it returns: one finite number per completion."""
    where = f"REWARD {name}"
    try:
        values = _limited(lambda: fn(prompts=prompts, completions=completions, **columns), where)
    except UserError:
        raise
    except SystemExit as err:  # a reward must not end the run without a word (it would exit with its own code)
        raise UserError(f"{where} called sys.exit({err.code!r}); a reward returns numbers, it must not exit") from None
    except Exception as err:  # noqa: BLE001 -- the user's code failed: say where, in one line
        raise UserError(f"{where} raised {type(err).__name__}: {first_line(err)}") from None
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{type(values).__name__} of length {len(values)}" if hasattr(values, "__len__") else type(values).__name__
        raise UserError(f"{where} must return a list with one number per completion ({len(completions)}), got {got}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise UserError(f"{where} returned {v!r}; every reward must be a finite number")
        out.append(float(v))
    return out

