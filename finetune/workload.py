"""What a run trains on, resolved before any plan: the method, its checked rows, the starting adapter, the model
and tokenizer, the encoded items. Its own module so that train and the HF Jobs launcher (remote) share it without
importing each other."""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from finetune import adapters, methods, models, outputs
from finetune.config import Config
from finetune.errors import UserError

# Settings that may name a local path: a run records them absolute, so `--resume` from another directory finds the
# same files (a relative DATASET resolved elsewhere once trained a resumed run on a different file).
PATH_SETTINGS = ("dataset", "model", "adapter")


def inspect(cfg: Config, sources: dict[str, str]):
    """Everything before a plan: data (all rows checked before any model loads), model, tokenizer, encoding.
    Shared by local training (finetune.train) and the HF Jobs launcher (finetune.remote)."""
    method = methods.get(cfg.method)
    rows = method.read(cfg)
    start = adapters.find(cfg.adapter) if cfg.adapter else None
    model_name = cfg.model
    if start and sources["model"] == "default" and start.parent:
        model_name = start.parent["model"]["name"]  # continue on the model the adapter was trained on
    if os.path.isdir(model_name):
        model_name = os.path.abspath(model_name)
    model, fallback = models.resolve(model_name, user_named_it=sources["model"] != "default" or model_name != cfg.model)
    if fallback:
        print(outputs.banner(fallback))
    if start:
        adapters.check_fits(start, model)
    tokenizer = models.load_tokenizer(model)
    prepared = method.prepare(rows, tokenizer, cfg)
    return method, rows, start, model, fallback, tokenizer, prepared


def local(value: str | None) -> bool:
    return bool(value) and value != "sample" and os.path.exists(value)


def absolute_paths(cfg: Config) -> Config:
    return replace(cfg, **{n: os.path.abspath(getattr(cfg, n)) for n in PATH_SETTINGS if local(getattr(cfg, n))})


def same_setting(name: str, given, recorded) -> bool:
    if name in PATH_SETTINGS and local(given) and local(recorded):
        return os.path.samefile(given, recorded)
    return given == recorded


def fingerprint(cfg: Config) -> str | None:
    """sha256 of the local data files a run trains on (train and validation), or None for a Hub dataset."""
    from finetune import data

    spec = methods.get(cfg.method).SAMPLE_DIR if cfg.dataset == "sample" else cfg.dataset
    if not os.path.exists(spec):
        return None
    train, validation, _ = data.locate(spec)
    digest = hashlib.sha256()
    for path in (train, validation):
        if path:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def check_same_data(cfg: Config, record: dict, run_dir: str) -> None:
    """A resumed run must see the data it started on: same position in the same rows."""
    recorded = (record.get("data") or {}).get("fingerprint")
    if recorded and fingerprint(cfg) != recorded:
        raise UserError(f"RESUME={run_dir}: the dataset {cfg.dataset} changed since the run started (its files' "
                        "sha256 differs); resuming would continue on other rows. Start a new run (ADAPTER=the run "
                        "directory keeps what it learned)")
