"""One config dataclass, one precedence rule.

    CLI flags > environment variables > YAML file (--config) > memory-tuned plan > built-in defaults

Every field is settable all four ways: env var = FIELD_NAME upper-cased, flag = --field-name,
YAML key = field_name. Fields whose default is None are "auto": the planner fills them.
`resolve` returns the Config plus where each value came from, which the run prints and records.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from finetune.errors import UserError
from finetune.methods import NAMES as METHOD_NAMES
from finetune.schedule import SCHEDULES

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
LORA_SCALINGS = ("standard", "rslora")
SAMPLE_DATASET = "sample"  # the shipped dataset (data/sample/), see finetune/sample_data.py


def _opt(help: str, *, choices: tuple[str, ...] | None = None, lo: float | None = None,
         hi: float | None = None, lo_open: bool = False, cli_only: bool = False) -> dict:
    return {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "cli_only": cli_only}


@dataclass
class Config:
    model: str = field(default=DEFAULT_MODEL, metadata=_opt("Hugging Face model id or local directory"))
    dataset: str = field(default=SAMPLE_DATASET, metadata=_opt(
        "JSONL/JSON/CSV/Parquet file, directory, or Hugging Face dataset id ('sample' = the shipped one)"))
    column_map: str | None = field(default=None, metadata=_opt(
        "rename dataset columns before shape detection, e.g. 'question=prompt,answer=completion'"))
    method: str = field(default="sft", metadata=_opt("training method", choices=METHOD_NAMES))
    adapter: str | None = field(default=None, metadata=_opt(
        "start from this adapter: a run directory, a PEFT adapter folder or an mlx-lm adapter folder"))
    backend: str = field(default="auto", metadata=_opt("auto, or a registered backend name (see `finetune doctor`)"))
    nproc: str = field(default="auto", metadata=_opt(
        "processes to train with on this machine, started by torchrun (auto: one per visible CUDA GPU, else 1)"))
    cpu_lanes: str = field(default="auto", metadata=_opt(
        "CPU: threads that train a step's rows side by side, each on its share of the cores (auto: 2 on a CPU with 2 "
        "or more cores for micro-batches of 2 or more rows and up to 1,024 tokens; 1 = one thread team for all rows)"))
    fsdp: str = field(default="auto", metadata=_opt(
        "shard the frozen base weights over the processes (torch FSDP); auto: only when a whole copy does not fit "
        "one device", choices=("auto", "on", "off")))
    output_dir: str | None = field(default=None, metadata=_opt("run directory (default outputs/<run-name>)"))
    run_name: str | None = field(default=None, metadata=_opt("name of the run (default: time + model)"))
    batch_size: int | None = field(default=None, metadata=_opt("per-device batch size (auto: planner)", lo=1))
    grad_accum: int | None = field(default=None, metadata=_opt("gradient accumulation steps (auto: planner)", lo=1))
    max_steps: int | None = field(default=None, metadata=_opt("optimizer steps; unset = EPOCHS over the data", lo=1))
    epochs: float = field(default=1.0, metadata=_opt("passes over the training split", lo=0, lo_open=True))
    learning_rate: float = field(default=2e-4, metadata=_opt(
        "peak learning rate (unset: the method's own, SFT 2e-4, DPO and KTO 2e-5, ORPO and GRPO 5e-5)", lo=0, lo_open=True, hi=1))
    max_seq_length: int = field(default=1024, metadata=_opt("tokens per row; longer rows are truncated", lo=16))
    lora_r: int = field(default=16, metadata=_opt("LoRA rank", lo=1))
    lora_alpha: float = field(default=32.0, metadata=_opt("LoRA alpha (the update's scale: see LORA_SCALING)", lo=0,
                                                          lo_open=True))
    lora_scaling: str = field(default="standard", metadata=_opt(
        "the update's scale: standard = alpha / r (PEFT's default; 2 at r16 alpha 32), rslora = alpha / sqrt(r) "
        "(rank-stabilized LoRA, PEFT's use_rslora; 8): a larger step at the same learning rate", choices=LORA_SCALINGS))
    lora_type: str = field(default="lora", metadata=_opt("adapter type (DoRA = weight-decomposed LoRA)",
                                                         choices=("lora", "dora")))
    lora_dropout: float = field(default=0.0, metadata=_opt(
        "LoRA dropout (0 as in PEFT and mlx-lm: on a CPU its random masks cost a third of the step)", lo=0, hi=0.9))
    group_by_length: bool = field(default=False, metadata=_opt(
        "order rows so a step's rows have similar lengths (less padding, faster; off: every step a random draw, "
        "which bench/quality.py found better on mixed-task data)"))
    seed: int = field(default=42, metadata=_opt("random seed (data split, init, sampling)", lo=0, hi=2 ** 32 - 1))
    gradient_checkpointing: str = field(default="auto", metadata=_opt(
        "recompute activations to save memory", choices=("auto", "on", "off")))
    dtype: str = field(default="auto", metadata=_opt("compute dtype", choices=("auto", "fp32", "bf16", "fp16")))
    quantize: str = field(default="auto", metadata=_opt("4-bit base weights (QLoRA: bitsandbytes on CUDA, MLX quantization on mlx; on the CPU only when asked, for testing)", choices=("auto", "none", "4bit")))
    val_split: float = field(default=0.1, metadata=_opt(
        "share of rows held out when the dataset has no validation split", lo=0, lo_open=True, hi=0.5))
    eval_rows: int = field(default=32, metadata=_opt("held-out rows scored for eval loss", lo=1))
    eval_generations: int = field(default=32, metadata=_opt("held-out rows generated for the before/after metric", lo=0))
    max_new_tokens: int = field(default=64, metadata=_opt("generation length in evaluation", lo=1))
    logging_steps: int = field(default=5, metadata=_opt("log train loss every N steps", lo=1))
    eval_steps: int | None = field(default=None, metadata=_opt("eval loss every N steps (auto: 5 times a run)", lo=1))
    lr_scheduler: str = field(default="auto", metadata=_opt(
        "learning-rate schedule after warmup (auto: constant until the training loss flattens, then linear to zero; "
        "wsd: constant, then linear over the last 20% of steps)",
        choices=SCHEDULES))
    warmup_ratio: float = field(default=0.05, metadata=_opt("share of steps spent warming up the LR", lo=0, hi=0.5))
    save_steps: int | None = field(default=None, metadata=_opt(
        "checkpoint every N steps (auto: every ~10 minutes or 10% of the run, whichever comes first)", lo=1))
    save_total: int = field(default=2, metadata=_opt("checkpoints kept (the newest ones)", lo=1))
    resume: str | None = field(default=None, metadata=_opt(
        "continue the run in this directory from its last whole checkpoint"))
    beta: float | None = field(default=None, metadata=_opt(
        "DPO: strength of the preference (auto 0.1); GRPO: weight of the KL to the reference (auto 0 = off)", lo=0))
    rpo_alpha: float | None = field(default=None, metadata=_opt(
        "DPO / KTO: weight of the chosen (thumbs-up) answers' NLL added to the loss (RPO, TRL's rpo_alpha; auto 1; "
        "0 = plain DPO / KTO)", lo=0))
    reward: str | None = field(default=None, metadata=_opt(
        "GRPO rewards, comma-separated: built-ins (see README) or file.py:function (auto: from the data)"))
    num_generations: int = field(default=4, metadata=_opt("GRPO: completions sampled per prompt", lo=2))
    temperature: float = field(default=1.0, metadata=_opt("GRPO: sampling temperature", lo=0, lo_open=True, hi=5))
    report_to: str = field(default="none", metadata=_opt("experiment tracker", choices=("none", "trackio")))
    push_to_hub: str | None = field(default=None, metadata=_opt(
        "after training, push the adapter to this Hub repo (user/name)"))
    remote: str = field(default="none", metadata=_opt("where to train: here, or on Hugging Face Jobs",
                                                      choices=("none", "hf-jobs")))
    flavor: str = field(default="auto", metadata=_opt(
        "HF Jobs hardware flavor (auto: the cheapest that fits; see `finetune train --dry-run --remote hf-jobs`)"))
    remote_max_hours: float = field(default=6.0, metadata=_opt(
        "HF Jobs: flavors whose estimate exceeds this many hours are not picked by auto", lo=0, lo_open=True))
    config: str | None = field(default=None, metadata=_opt("YAML file with any of these keys", cli_only=True))
    dry_run: bool = field(default=False, metadata=_opt("print the plan and exit", cli_only=True))
    yes: bool = field(default=False, metadata=_opt("do not ask before submitting a remote job", cli_only=True))


FIELDS = {f.name: f for f in fields(Config)}
AUTO = "auto"
MAX_VALUE_CHARS = 4096       # a path's limit on Linux; no setting needs more
MAX_NPROC = 64              # processes on one machine (torchrun's --nproc-per-node)
MAX_CONFIG_BYTES = 1 << 20   # a settings file is a few lines: refuse anything that could be a bomb before parsing
_KIND_TEXT = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def lora_scale(cfg) -> float:
    """What the adapter's B @ A is multiplied by, on every backend. Standard stays the default: bench/quality.py
    found rsLoRA's larger step better at lr 1e-4 and worse at 1e-3 on one- and two-row steps (README, Measured)."""
    return cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.lora_scaling == "rslora" else cfg.lora_r)


def env_name(name: str) -> str:
    return name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(f) -> type:
    # Annotations are strings under `from __future__ import annotations`: "int | None" -> int.
    t = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "bool": bool, "str": str}[t]


def parse_value(name: str, raw: Any, where: str) -> Any:
    """Turn a raw value (string from env/CLI, anything from YAML) into the field's type, or raise
    UserError naming `where` (e.g. "BATCH_SIZE", "--batch-size", "cfg.yaml: batch_size")."""
    f = FIELDS[name]
    meta, kind = f.metadata, _base_type(f)
    optional = "None" in str(f.type)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "auto", "none"))):
        return None
    if isinstance(raw, (list, dict, set, tuple)):  # before any str(): YAML aliases can make one grow to gigabytes
        raise UserError(f"{where} is not valid: expected {_KIND_TEXT[kind]}, got a YAML {type(raw).__name__}")
    if isinstance(raw, str) and len(raw) > MAX_VALUE_CHARS:
        raise UserError(f"{where} is not valid: {len(raw):,} characters (at most {MAX_VALUE_CHARS:,})")
    try:
        if kind is bool:
            value = raw if isinstance(raw, bool) else {"1": True, "true": True, "yes": True, "on": True,
                                                       "0": False, "false": False, "no": False, "off": False}[str(raw).strip().lower()]
        elif kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(str(raw).strip())
        elif kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(str(raw).strip())
            if not math.isfinite(value):
                raise ValueError
        else:
            value = str(raw).strip()
    except (ValueError, KeyError):
        expected = _KIND_TEXT[kind]
        raise UserError(f"{where}={raw!r} is not valid: expected {expected}{_range_text(meta)}") from None
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{where}={raw!r} is not valid: choose one of {', '.join(meta['choices'])}")
    lo, hi = meta["lo"], meta["hi"]
    if (lo is not None and (value < lo or (meta["lo_open"] and value == lo))) or (hi is not None and value > hi):
        raise UserError(f"{where}={raw!r} is not valid: expected {_range_text(meta).lstrip(', ')}")
    return value


def _range_text(meta: dict) -> str:
    lo, hi = meta["lo"], meta["hi"]
    if lo is None and hi is None:
        return ""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if meta['lo_open'] else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi}" if isinstance(hi, int) else f"<= {hi:g}")
    return ", " + " and ".join(parts)


def read_yaml(path: str) -> dict:
    import yaml  # local: keeps `finetune doctor` import-light

    from finetune import fsio

    fsio.check_regular_file(path, f"--config {path}", MAX_CONFIG_BYTES)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"--config {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
    except OSError as err:
        raise UserError(f"--config {path} cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    for key in data:
        if key not in FIELDS or FIELDS[key].metadata["cli_only"]:
            import difflib

            close = difflib.get_close_matches(str(key), settable_fields(), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "README's Settings table lists every key"
            raise UserError(f"{path}: unknown key '{str(key)[:80]}'; {hint}")
    return data


def settable_fields() -> list[str]:
    return [n for n, f in FIELDS.items() if not f.metadata["cli_only"]]


def resolve(cli: Mapping[str, Any], env: Mapping[str, str] | None = None,
            known_backends: tuple[str, ...] = ()) -> tuple[Config, dict[str, str]]:
    """Merge the layers. `cli` maps field name -> raw value for flags the user gave (others absent).
    Returns (config, sources) where sources[field] is "cli", "env", "yaml:<path>" or "default";
    the planner later marks the auto fields it fills as "plan"."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {n: "default" for n in FIELDS}
    yaml_path = cli.get("config")
    if yaml_path:
        for key, raw in read_yaml(yaml_path).items():
            values[key] = parse_value(key, raw, f"{yaml_path}: {key}")
            sources[key] = f"yaml:{yaml_path}"
    for name in settable_fields():
        raw = env.get(env_name(name))
        if raw is not None and raw != "":
            values[name] = parse_value(name, raw, env_name(name))
            sources[name] = "env"
    for name, raw in cli.items():
        if raw is None:
            continue
        values[name] = raw if isinstance(raw, bool) else parse_value(name, raw, flag_name(name))
        sources[name] = "cli"
    cfg = Config(**values)
    where = lambda name: {"cli": flag_name(name), "env": env_name(name)}.get(sources[name], f"{yaml_path}: {name}")  # noqa: E731
    allowed = (AUTO, *known_backends)
    if known_backends and cfg.backend not in allowed:
        raise UserError(f"{where('backend')}={cfg.backend!r} is not valid: choose one of {', '.join(allowed)}")
    if cfg.run_name is not None and (cfg.run_name in (".", "..") or any(c in cfg.run_name for c in "/\\\0")):
        raise UserError(f"{where('run_name')}={cfg.run_name!r} is not valid: a run name is one folder name (no '/', "
                        "no '..'); OUTPUT_DIR chooses where a run goes")
    if cfg.push_to_hub is not None:
        check_repo_id(cfg.push_to_hub, where("push_to_hub"))
    for name in ("nproc", "cpu_lanes"):  # processes, threads: auto or a count
        value = getattr(cfg, name)
        if value != AUTO and not (value.isdigit() and 1 <= int(value) <= MAX_NPROC):
            raise UserError(f"{where(name)}={value!r} is not valid: use auto or a whole number from 1 to {MAX_NPROC}")
    return cfg, sources


REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the Hub's rule


def check_repo_id(repo: str, where: str = "--repo") -> str:
    """A Hub repo id, `user/name`, checked before anything trains or uploads."""
    if not REPO_ID.match(repo or "") or "--" in repo or ".." in repo:
        raise UserError(f"{where}={repo!r} is not a Hub repo id; write it as user/name (letters, digits, . _ -)")
    return repo
