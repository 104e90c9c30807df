"""What a run trains on, resolved before any plan: the method, its checked rows, the starting adapter, the model
and tokenizer, the encoded items. Its own module so that train and the HF Jobs launcher (remote) share it without
importing each other."""
from __future__ import annotations

from finetune import adapters, methods, models, outputs
from finetune.config import Config


def inspect(cfg: Config, sources: dict[str, str]):
    """Everything before a plan: data (all rows checked before any model loads), model, tokenizer, encoding.
    Shared by local training (finetune.train) and the HF Jobs launcher (finetune.remote)."""
    method = methods.get(cfg.method)
    rows = method.read(cfg)
    start = adapters.find(cfg.adapter) if cfg.adapter else None
    model_name = cfg.model
    if start and sources["model"] == "default" and start.parent:
        model_name = start.parent["model"]["name"]  # continue on the model the adapter was trained on
    model, fallback = models.resolve(model_name, user_named_it=sources["model"] != "default" or model_name != cfg.model)
    if fallback:
        print(outputs.banner(fallback))
    tokenizer = models.load_tokenizer(model)
    prepared = method.prepare(rows, tokenizer, cfg)
    return method, rows, start, model, fallback, tokenizer, prepared
