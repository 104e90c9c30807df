"""The hostile-input table for tests/test_hostile.py: one row per input a careless or hostile user could give,
grouped by the class of failure it once caused (issue 22). Each case sets up files under a fresh folder `{t}`,
runs one CLI command in-process, and expects an exit code and one clear error line holding `needle`.

    C(cls, id, argv, env, needle, rc=2, setup=fn(t), left=fn(t) -> problem or None)

`{t}` in argv/env values is that folder. Train cases use the tiny model and `--dry-run` unless they must train.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

TINY = {"MODEL": "finetune/tiny-qwen2"}
SFT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass
class C:
    cls: str
    id: str
    argv: list[str] = field(default_factory=lambda: ["train", "--dry-run"])
    env: dict[str, str] = field(default_factory=dict)
    needle: str = ""
    rc: int = 2
    setup: Callable | None = None
    left: Callable | None = None   # extra check of what is on disk afterwards: returns a problem text or None
    train_env: bool = True         # add the tiny model and a valid small dataset unless the case sets them
    report: bool = False           # check-data: the error is a line of its report (stdout), not of stderr
    patch: Callable | None = None  # patch(monkeypatch, t): inject a failure (a full disk) in-process
    keeps_run: bool = False        # the case leaves {t}/run on purpose (a run stopped with a checkpoint)


def write(path: str, text: str | bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(text, bytes) else "w") as fh:
        fh.write(text)


def rows_jsonl(path: str, rows: list, n: int = 1) -> None:
    write(path, "".join(json.dumps(r) + "\n" for r in rows * n))


def data(t: str, name: str = "d.jsonl", rows: list | None = None, n: int = 8) -> None:
    rows_jsonl(os.path.join(t, name), rows or [SFT_ROW], n)


def yaml_bomb_text(key: str) -> str:
    """A 10-line YAML whose one setting expands to 9**9 (387 M) strings if anything walks it."""
    parts = ['&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        parts.append(f"&{cur} [" + ",".join(["*" + prev] * 9) + "]")
    return f"{key}: [" + ", ".join(parts) + "]\n"


def no_run_dir(t: str) -> str | None:
    return "an outputs/ folder was created" if os.path.exists(os.path.join(t, "outputs")) else None


def out_has_no_run(t: str) -> str | None:
    made = [n for n in os.listdir(t) if n.startswith("run")] if os.path.isdir(t) else []
    return f"left {made}" if made else None


def symlink(src: str, dst: str) -> Callable:
    return lambda t: os.symlink(src.format(t=t), dst.format(t=t))


def make_fifo(t: str) -> None:
    os.mkfifo(f"{t}/pipe.jsonl")


def deep_json(t: str) -> None:
    write(f"{t}/deep.jsonl", json.dumps(SFT_ROW)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    write(f"{t}/deep.json", "[" * 100_000 + "]" * 100_000)


def wide_csv(t: str) -> None:
    write(f"{t}/wide.csv", "prompt,completion\n" + "\n".join([f'go,"{"word " * 40_000}"'] * 4) + "\n")


def both_train_files(t: str) -> None:
    data(t, "two/train.jsonl")
    write(f"{t}/two/train.csv", "prompt,completion\nhi,hello\nyo,hey\n")


def val_and_test(t: str) -> None:
    for name in ("vt/train.jsonl", "vt/validation.jsonl", "vt/test.jsonl"):
        data(t, name)


def model_without_weights(t: str) -> None:
    from finetune import tiny

    src = tiny.ensure(os.environ["FINETUNE_CACHE"])
    os.makedirs(f"{t}/noweights")
    for name in os.listdir(src):
        if not name.endswith((".safetensors", ".bin")):
            os.symlink(os.path.join(src, name), f"{t}/noweights/{name}")


def damaged_run(t: str) -> None:
    write(f"{t}/outputs/broken/run.json", "{truncated")
    write(f"{t}/outputs/good/run.json", json.dumps({"run_name": "good", "status": "completed", "step_reached": 3,
                                                     "config": {"max_steps": 3}}))


def foreign_adapter(t: str) -> None:
    """A PEFT adapter made for a model with hidden size 999: what an adapter of another model looks like."""
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(f"{t}/foreign")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 999), np.float32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((999, 4), np.float32)},
              f"{t}/foreign/adapter_model.safetensors")
    write(f"{t}/foreign/adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj"], "base_model_name_or_path": "big/one"}))


def full_disk_at_tokenizer_save(monkeypatch, t: str) -> None:
    import transformers

    def fail(*a, **k):
        raise RuntimeError("No space left on device (os error 28)")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", fail)


def full_disk_at_every_checkpoint(monkeypatch, t: str) -> None:
    import torch

    def fail(*a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", fail)


def signal_at_load(monkeypatch, t: str) -> None:
    import signal

    from finetune import models

    monkeypatch.setattr(models, "fetch_weights", lambda info: os.kill(os.getpid(), signal.SIGTERM))


def signal_in_final_evaluation(monkeypatch, t: str) -> None:
    import signal
    import time

    from finetune.methods import sft

    real, calls = sft.evaluate_model, []

    def evaluate(*a):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after training: a long one, stopped by SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        return real(*a)
    monkeypatch.setattr(sft, "evaluate_model", evaluate)


def short_limits(monkeypatch, t: str) -> None:
    from finetune import loop, rewards

    monkeypatch.setattr(rewards, "REWARD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(loop, "STOP_GRACE_S", 1.0)


def reward(body: str) -> Callable:
    return lambda t: write(f"{t}/r.py", "import os, signal, sys, time\n\n\ndef f(completions, **kw):\n    " + body + "\n")


def run_status(status: str) -> Callable:
    def check(t):
        record = json.load(open(f"{t}/run/run.json"))
        return None if record["status"] == status else f"run.json says {record['status']}, not {status}"
    return check


def finished_run(t: str) -> None:
    """A run directory with an adapter file (its contents are never read by the refusals tested)."""
    write(f"{t}/done/run.json", json.dumps({"run_name": "done", "status": "completed", "config": {"method": "sft"},
                                            "plan": {}, "model": {"name": "finetune/tiny-qwen2"}}))
    write(f"{t}/done/adapter_model.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    write(f"{t}/afile", "mine")


def cases() -> list[C]:
    bomb = [C("bombs", f"yaml_alias_bomb_{k}", ["train", "--dry-run", "--config", "{t}/bomb.yaml"], needle=k,
              setup=lambda t, k=k: write(f"{t}/bomb.yaml", yaml_bomb_text(k)))
            for k in ("run_name", "dataset", "batch_size", "model", "column_map")]
    bomb += [
        C("bombs", "yaml_huge_file", ["train", "--dry-run", "--config", "{t}/big.yaml"], needle="big.yaml",
          setup=lambda t: write(f"{t}/big.yaml", "run_name: " + "x" * 3_000_000 + "\n")),
        C("bombs", "json_nested_deep_jsonl", env={"DATASET": "{t}/deep.jsonl"}, needle="deep.jsonl:1", setup=deep_json),
        C("bombs", "json_nested_deep_json", env={"DATASET": "{t}/deep.json"}, needle="deep.json", setup=deep_json),
        C("bombs", "check_data_nested_deep", ["check-data", "{t}/deep.jsonl"], needle="deep.jsonl:1", setup=deep_json,
          report=True),
        C("bombs", "row_of_20_mb_with_max_seq_length_64", env={"DATASET": "{t}/big.jsonl", "MAX_SEQ_LENGTH": "64"},
          rc=0, needle="truncated", setup=lambda t: data(t, "big.jsonl", n=4, rows=[{"messages": [
              {"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 4_000_000}]}])),
        C("bombs", "conversation_of_100k_turns", env={"DATASET": "{t}/turns.jsonl", "MAX_SEQ_LENGTH": "64"},
          rc=0, needle="truncated", setup=lambda t: data(t, "turns.jsonl", n=4, rows=[{"messages": [
              {"role": r, "content": "hi"} for _ in range(50_000) for r in ("user", "assistant")]}])),
        C("bombs", "data_file_larger_than_memory_allows", env={"DATASET": "{t}/d.jsonl"}, needle="split it",
          patch=lambda mp, t: mp.setattr("finetune.data.RAM_PER_FILE_BYTE", 10 ** 12)),  # as if RAM were tiny
        C("bombs", "csv_large_field_is_data", ["train", "--dry-run"], env={"DATASET": "{t}/wide.csv"}, rc=0,
          setup=wide_csv),
    ]
    settings = [C("settings", f"env_{k.lower()}_{v}", env={k: v}, needle=k) for k, v in [
        ("BATCH_SIZE", "abc"), ("BATCH_SIZE", "0"), ("GRAD_ACCUM", "-1"), ("MAX_STEPS", "1.5"), ("EPOCHS", "0"),
        ("LEARNING_RATE", "nan"), ("LEARNING_RATE", "inf"), ("LEARNING_RATE", "2"), ("MAX_SEQ_LENGTH", "8"),
        ("LORA_R", "0"), ("LORA_ALPHA", "-1"), ("LORA_DROPOUT", "1"), ("SEED", "-1"), ("SEED", str(2 ** 64)),
        ("SEED", "99999999999999999999999"), ("VAL_SPLIT", "0.9"), ("WARMUP_RATIO", "2"), ("EVAL_ROWS", "0"),
        ("METHOD", "ppo"), ("LR_SCHEDULER", "cosinee"), ("QUANTIZE", "8bit"), ("DTYPE", "fp8"), ("BACKEND", "jax"),
        ("GROUP_BY_LENGTH", "maybe"), ("NUM_GENERATIONS", "1"), ("TEMPERATURE", "0"), ("BETA", "-0.1"),
        ("REMOTE", "aws"), ("REMOTE_MAX_HOURS", "0"), ("SAVE_TOTAL", "0"), ("LOGGING_STEPS", "0"),
        ("MAX_NEW_TOKENS", "0"), ("REPORT_TO", "wandb"), ("LORA_TYPE", "ia3")]]
    settings += [
        C("settings", "flag_batch_size", ["train", "--dry-run", "--batch-size", "x"], needle="--batch-size"),
        C("settings", "yaml_unknown_key", ["train", "--dry-run", "--config", "{t}/c.yaml"], needle="unknown key",
          setup=lambda t: write(f"{t}/c.yaml", "batchsize: 4\n")),
        C("settings", "yaml_list_top", ["train", "--dry-run", "--config", "{t}/c.yaml"], needle="c.yaml",
          setup=lambda t: write(f"{t}/c.yaml", "- 1\n- 2\n")),
        C("settings", "yaml_dict_value", ["train", "--dry-run", "--config", "{t}/c.yaml"], needle="run_name",
          setup=lambda t: write(f"{t}/c.yaml", "run_name: {a: 1}\n")),
        C("settings", "yaml_is_directory", ["train", "--dry-run", "--config", "{t}"], needle="--config"),
        C("settings", "yaml_missing", ["train", "--dry-run", "--config", "{t}/none.yaml"], needle="none.yaml"),
        C("settings", "column_map_syntax", env={"COLUMN_MAP": "a:b"}, needle="COLUMN_MAP"),
        C("settings", "reward_unknown", env={"METHOD": "grpo", "REWARD": "magic", "DATASET": "sample"}, needle="REWARD"),
        C("settings", "reward_file_missing", env={"METHOD": "grpo", "REWARD": "{t}/r.py:f", "DATASET": "sample"},
          needle="r.py"),
        C("settings", "reward_function_missing", env={"METHOD": "grpo", "REWARD": "{t}/r.py:nope", "DATASET": "sample"},
          needle="nope", setup=lambda t: write(f"{t}/r.py", "def f(completions, **kw):\n    return [0.0]*len(completions)\n")),
        C("settings", "reward_file_syntax_error", env={"METHOD": "grpo", "REWARD": "{t}/r.py:f", "DATASET": "sample"},
          needle="r.py", setup=lambda t: write(f"{t}/r.py", "def f(:\n")),
        C("settings", "reward_file_raises_on_import", env={"METHOD": "grpo", "REWARD": "{t}/r.py:f", "DATASET": "sample"},
          needle="r.py", setup=lambda t: write(f"{t}/r.py", "raise RuntimeError('boom')\n")),
        C("settings", "reward_file_exits_on_import", env={"METHOD": "grpo", "REWARD": "{t}/r.py:f", "DATASET": "sample"},
          needle="r.py", setup=lambda t: write(f"{t}/r.py", "import sys\nsys.exit(3)\n")),
    ]
    early = [
        C("early", "fp16_on_cpu", env={"DTYPE": "fp16"}, needle="DTYPE=fp16"),
        C("early", "fp16_on_cpu_real_run", ["train"], env={"DTYPE": "fp16", "OUTPUT_DIR": "{t}/run"}, needle="DTYPE=fp16",
          left=out_has_no_run),
        C("early", "model_folder_without_weights", ["train"], env={"MODEL": "{t}/noweights", "OUTPUT_DIR": "{t}/run"},
          needle="noweights", setup=model_without_weights, left=out_has_no_run),
        C("early", "model_folder_empty", env={"MODEL": "{t}/empty"}, needle="empty", setup=lambda t: os.mkdir(f"{t}/empty")),
        C("early", "model_is_a_file", env={"MODEL": "{t}/m.bin"}, needle="m.bin", setup=lambda t: write(f"{t}/m.bin", "x")),
        C("early", "adapter_missing", env={"ADAPTER": "{t}/nope"}, needle="ADAPTER"),
        C("early", "adapter_empty_folder", env={"ADAPTER": "{t}/empty"}, needle="ADAPTER",
          setup=lambda t: os.mkdir(f"{t}/empty")),
        C("early", "push_to_hub_not_a_repo_id", env={"PUSH_TO_HUB": "not a repo!"}, needle="PUSH_TO_HUB"),
        C("early", "push_to_hub_three_parts", env={"PUSH_TO_HUB": "a/b/c"}, needle="PUSH_TO_HUB"),
        C("early", "run_name_dotdot", env={"RUN_NAME": "../escape"}, needle="RUN_NAME"),
        C("early", "run_name_slash", env={"RUN_NAME": "a/b"}, needle="RUN_NAME"),
        C("early", "run_name_absolute", env={"RUN_NAME": "/tmp/abs"}, needle="RUN_NAME"),
        C("early", "run_name_dot", env={"RUN_NAME": "."}, needle="RUN_NAME"),
        C("early", "output_dir_is_a_file", env={"OUTPUT_DIR": "{t}/f"}, needle="OUTPUT_DIR",
          setup=lambda t: write(f"{t}/f", "mine")),
        C("early", "output_dir_not_empty", env={"OUTPUT_DIR": "{t}/full"}, needle="OUTPUT_DIR",
          setup=lambda t: write(f"{t}/full/keep.txt", "mine")),
        C("early", "output_dir_under_a_file", env={"OUTPUT_DIR": "{t}/f/run"}, needle="OUTPUT_DIR",
          setup=lambda t: write(f"{t}/f", "mine")),
        C("early", "output_dir_in_proc", env={"OUTPUT_DIR": "/proc/ft-run"}, needle="OUTPUT_DIR"),
        C("early", "cache_in_proc", env={"FINETUNE_CACHE": "/proc/ft-cache", "MODEL": "smollm2-135m-offline"},
          needle="FINETUNE_CACHE"),
        C("early", "cache_is_a_file", env={"FINETUNE_CACHE": "{t}/f", "MODEL": "smollm2-135m-offline"},
          needle="FINETUNE_CACHE", setup=lambda t: write(f"{t}/f", "x")),
        C("early", "resume_missing", env={"RESUME": "{t}/nope"}, needle="RESUME"),
        C("early", "resume_damaged_record", env={"RESUME": "{t}/outputs/broken"}, needle="RESUME", setup=damaged_run),
        C("early", "resume_a_file", env={"RESUME": "{t}/f"}, needle="RESUME", setup=lambda t: write(f"{t}/f", "x")),
        C("early", "chat_negative_temperature", ["chat", "{t}/outputs/good", "--temperature", "-1", "--prompt", "x"],
          needle="--temperature", setup=damaged_run),
        C("early", "chat_zero_tokens", ["chat", "{t}/outputs/good", "--max-new-tokens", "0", "--prompt", "x"],
          needle="--max-new-tokens", setup=damaged_run),
        C("early", "chat_missing_run", ["chat", "{t}/nope", "--prompt", "x"], needle="nope"),
        C("early", "chat_damaged_run", ["chat", "{t}/outputs/broken", "--prompt", "x"], needle="broken", setup=damaged_run),
        C("early", "export_missing_run", ["export", "{t}/nope", "--merge"], needle="nope"),
        C("early", "export_unknown_quant", ["export", "{t}/outputs/good", "--gguf", "q9"], needle="q9", setup=damaged_run),
        C("early", "push_bad_repo", ["push", "{t}/outputs/good", "--repo", "bad repo"], needle="bad repo",
          setup=damaged_run),
        C("early", "push_missing_run", ["push", "{t}/nope", "--repo", "me/x"], needle="nope"),
        C("early", "convert_missing", ["convert", "{t}/nope", "--to", "peft", "--out", "{t}/o"], needle="nope"),
        C("early", "check_data_method_unknown", ["check-data", "sample", "--method", "ppo"], needle="ppo"),
        C("early", "check_data_negative_show", ["check-data", "sample", "--show", "-1"], needle="--show"),
        C("early", "check_data_bad_max_len", ["check-data", "sample", "--max-seq-length", "abc"], needle="--max-seq-length"),
    ]
    files = [
        C("files", "dataset_symlink_loop", env={"DATASET": "{t}/loop.jsonl"}, needle="loop.jsonl",
          setup=symlink("{t}/loop.jsonl", "{t}/loop.jsonl")),
        C("files", "dataset_dangling_link", env={"DATASET": "{t}/gone.jsonl"}, needle="gone.jsonl",
          setup=symlink("{t}/missing.jsonl", "{t}/gone.jsonl")),
        C("files", "dataset_directory_without_train", env={"DATASET": "{t}"}, needle="train"),
        C("files", "dataset_dir_named_jsonl", env={"DATASET": "{t}/x.jsonl"}, needle="x.jsonl",
          setup=lambda t: os.mkdir(f"{t}/x.jsonl")),
        C("files", "dataset_fifo", env={"DATASET": "{t}/pipe.jsonl"}, needle="pipe.jsonl", setup=make_fifo),
        C("files", "dataset_dev_zero", env={"DATASET": "/dev/zero"}, needle="/dev/zero"),
        C("files", "dataset_dev_null", env={"DATASET": "/dev/null"}, needle="/dev/null"),
        C("files", "check_data_dev_zero", ["check-data", "/dev/zero"], needle="/dev/zero"),
        C("files", "check_data_fifo", ["check-data", "{t}/pipe.jsonl"], needle="pipe.jsonl", setup=make_fifo),
        C("files", "dataset_empty", env={"DATASET": "{t}/e.jsonl"}, needle="empty", setup=lambda t: write(f"{t}/e.jsonl", "")),
        C("files", "dataset_whitespace_only", env={"DATASET": "{t}/e.jsonl"}, needle="e.jsonl",
          setup=lambda t: write(f"{t}/e.jsonl", "\n\n  \n")),
        C("files", "dataset_binary", env={"DATASET": "{t}/b.jsonl"}, needle="b.jsonl",
          setup=lambda t: write(f"{t}/b.jsonl", bytes(range(256)) * 4)),
        C("files", "dataset_utf16", env={"DATASET": "{t}/u.jsonl"}, needle="UTF-16",
          setup=lambda t: write(f"{t}/u.jsonl", json.dumps(SFT_ROW).encode("utf-16"))),
        C("files", "dataset_json_scalar", env={"DATASET": "{t}/s.json"}, needle="s.json",
          setup=lambda t: write(f"{t}/s.json", "42")),
        C("files", "dataset_json_rows_are_strings", env={"DATASET": "{t}/s.json"}, needle="s.json",
          setup=lambda t: write(f"{t}/s.json", '["a", "b"]')),
        C("files", "dataset_parquet_corrupt", env={"DATASET": "{t}/p.parquet"}, needle="p.parquet",
          setup=lambda t: write(f"{t}/p.parquet", b"PAR1garbage")),
        C("files", "dataset_csv_header_only", env={"DATASET": "{t}/h.csv"}, needle="h.csv",
          setup=lambda t: write(f"{t}/h.csv", "prompt,completion\n")),
        C("files", "dataset_txt", env={"DATASET": "{t}/a.txt"}, needle="a.txt", setup=lambda t: write(f"{t}/a.txt", "x")),
        C("files", "dataset_unreadable_in_proc", env={"DATASET": "/proc/self/mem"}, needle="/proc/self/mem"),
        C("files", "dataset_one_row", env={"DATASET": "{t}/d.jsonl"}, needle="at least 2 rows",
          setup=lambda t: data(t, n=1)),
        C("files", "dataset_null_content", env={"DATASET": "{t}/d.jsonl"}, needle="d.jsonl:1",
          setup=lambda t: data(t, rows=[{"messages": [{"role": "user", "content": None},
                                                      {"role": "assistant", "content": "x"}]}])),
        C("files", "dataset_numbers_as_text", env={"DATASET": "{t}/d.jsonl"}, needle="d.jsonl:1",
          setup=lambda t: data(t, rows=[{"prompt": 1, "completion": 2}])),
        C("files", "two_train_files", env={"DATASET": "{t}/two"}, needle="train", setup=both_train_files),
        C("files", "validation_and_test", env={"DATASET": "{t}/vt"}, needle="test", setup=val_and_test),
        C("files", "config_symlink_loop", ["train", "--dry-run", "--config", "{t}/l.yaml"], needle="l.yaml",
          setup=symlink("{t}/l.yaml", "{t}/l.yaml")),
        C("files", "config_fifo", ["train", "--dry-run", "--config", "{t}/p.yaml"], needle="p.yaml",
          setup=lambda t: os.mkfifo(f"{t}/p.yaml")),
        C("files", "config_dev_zero", ["train", "--dry-run", "--config", "/dev/zero"], needle="/dev/zero"),
    ]
    writes = [
        C("writes", "tokenizer_save_fails_on_a_full_disk", ["train"], env={"OUTPUT_DIR": "{t}/run", "MAX_STEPS": "1"},
          needle="could not write", patch=full_disk_at_tokenizer_save),
        C("writes", "first_checkpoint_fails_on_a_full_disk", ["train"], env={"OUTPUT_DIR": "{t}/run", "MAX_STEPS": "2",
          "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2"}, needle="could not write", patch=full_disk_at_every_checkpoint,
          left=lambda t: None if not os.path.exists(f"{t}/run") else "a run that saved nothing left its folder"),
        C("writes", "adapter_of_another_model", ["train"], env={"ADAPTER": "{t}/foreign", "OUTPUT_DIR": "{t}/run"},
          needle="trained on another model", setup=foreign_adapter),
        C("writes", "unused_image_column_is_named", env={"DATASET": "{t}/img.jsonl"}, rc=0, needle="images",
          setup=lambda t: data(t, "img.jsonl", rows=[{**SFT_ROW, "images": ["a.png"]}])),
    ]
    grpo = {"METHOD": "grpo", "DATASET": "sample", "REWARD": "{t}/r.py:f", "OUTPUT_DIR": "{t}/run", "MAX_STEPS": "2",
            "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2", "MAX_NEW_TOKENS": "4"}
    signals = [
        C("signals", "sigterm_while_loading_removes_the_run_and_frees_output_dir", ["train"],
          env={"OUTPUT_DIR": "{t}/run"}, rc=143, needle="nothing was trained", patch=signal_at_load),
        C("signals", "sigterm_during_the_final_evaluation_stops_at_once", ["train"],
          env={"OUTPUT_DIR": "{t}/run", "MAX_STEPS": "2", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2"}, rc=143,
          needle="during the final evaluation", patch=signal_in_final_evaluation, keeps_run=True,
          left=run_status("interrupted")),
        C("signals", "reward_that_hangs_times_out", ["train"], env=grpo, needle="did not return within",
          setup=reward("time.sleep(60)"), patch=short_limits),
        C("signals", "reward_that_calls_sys_exit", ["train"], env=grpo, needle="called sys.exit(3)",
          setup=reward("sys.exit(3)")),
        C("signals", "sigterm_inside_a_hanging_reward_stops_after_the_grace", ["train"], env=grpo, rc=130,
          needle="finishing this step", setup=reward(
              "f.calls = getattr(f, 'calls', 0) + 1\n    if f.calls > 1:  # in a training step, not the evaluation\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(30)\n    return [0.0] * len(completions)"),
          patch=lambda mp, t: (short_limits(mp, t), setattr(__import__("finetune.rewards").rewards,
                                                            "REWARD_TIMEOUT_S", 60.0)),
          keeps_run=True, left=run_status("interrupted")),
    ]
    no_token = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "1"}
    commands = [
        C("commands", "misspelled_command", ["trian"], needle="trian"),
        C("commands", "doctor_unknown_flag", ["doctor", "--bogus"], needle="--bogus"),
        C("commands", "jobs_without_a_subcommand", ["jobs"], needle="jobs_command"),
        C("commands", "jobs_status_without_a_token", ["jobs", "status", "abc"], env=no_token, needle="token"),
        C("commands", "push_without_a_token", ["push", "{t}/done", "--repo", "me/x"], env=no_token, needle="token",
          setup=finished_run),
        C("commands", "export_out_is_a_file", ["export", "{t}/done", "--merge", "--out", "{t}/afile"], needle="afile",
          setup=finished_run),
        C("commands", "export_without_what", ["export", "{t}/done"], needle="--merge", setup=finished_run),
        C("commands", "convert_a_run_without_adapter_config", ["convert", "{t}/done", "--to", "mlx", "--out", "{t}/o"],
          needle="adapter_config.json", setup=finished_run),
        C("commands", "chat_on_a_damaged_record", ["chat", "{t}/done", "--prompt", "x"], needle="damaged",
          setup=lambda t: (finished_run(t), write(f"{t}/done/run.json", json.dumps({"model": {"name": "m"}})))),
        C("commands", "chat_on_a_file", ["chat", "{t}/afile", "--prompt", "x"], needle="afile", setup=finished_run),
        C("commands", "runs_on_a_run_with_a_wrong_typed_record", ["runs", "{t}/outputs"], rc=0, needle="damaged",
          setup=lambda t: write(f"{t}/outputs/typed/run.json", json.dumps({"status": 5, "evaluation": "x",
                                                                           "plan": [1], "started": 7}))),
    ]
    records = [
        C("records", "runs_lists_the_healthy_and_names_the_damaged", ["runs", "{t}/outputs"], rc=0, needle="broken",
          setup=damaged_run),
        C("records", "runs_json_with_damaged", ["runs", "{t}/outputs", "--json"], rc=0, needle="broken", setup=damaged_run),
        C("records", "runs_root_missing", ["runs", "{t}/none"], needle="none"),
        C("records", "runs_root_is_file", ["runs", "{t}/f"], needle="f", setup=lambda t: write(f"{t}/f", "x")),
        C("records", "run_json_not_an_object", ["runs", "{t}/outputs"], rc=0, needle="odd",
          setup=lambda t: write(f"{t}/outputs/odd/run.json", "[1, 2]")),
        C("records", "export_damaged_record", ["export", "{t}/outputs/broken", "--merge"], needle="broken",
          setup=damaged_run),
        C("records", "push_damaged_record", ["push", "{t}/outputs/broken", "--repo", "me/x"], needle="broken",
          setup=damaged_run),
    ]
    every = bomb + settings + early + files + writes + signals + commands + records
    for c in every:
        if c.train_env:
            c.env = {**TINY, "DATASET": "{t}/d.jsonl", **c.env}
    return every
