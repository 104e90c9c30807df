"""REPORT_TO=trackio: the run's logged metrics also go to a local Trackio project (`trackio show` to browse).

Names follow the transformers Trainer's convention (train/loss, eval/loss, train/learning_rate...), so a
Trackio dashboard shared with TRL runs lines up."""
from __future__ import annotations

RENAME = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "tokens": "train/num_tokens"}


class Tracker:
    def __init__(self, cfg, run_name: str, config: dict, resumed: bool = False):
        self.module = None
        if cfg.report_to != "trackio":
            return
        import trackio

        self.module = trackio
        trackio.init(project="finetune", name=run_name, config=config, resume="allow" if resumed else "never")

    def log(self, record: dict) -> None:
        if self.module is None:
            return
        metrics = {}
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            name = RENAME.get(key) or ("eval/" + key[5:] if key.startswith("eval_") else f"train/{key}")
            metrics[name] = value
        self.module.log(metrics, step=record.get("step"))

    def finish(self) -> None:
        if self.module is not None:
            self.module.finish()
            self.module = None
