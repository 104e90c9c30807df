"""The shipped sample dataset (finetune/sample_data.py) and the self-built tiny model (finetune/tiny.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from finetune import sample_data, tiny
from finetune.evaluate import score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- sample data

def test_committed_sample_files_are_reproducible(tmp_path):
    paths = sample_data.write(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["train.jsonl", "validation.jsonl"]
    for p in paths:
        shipped = os.path.join(ROOT, "data", "sample", os.path.basename(p))
        with open(p, "rb") as fresh, open(shipped, "rb") as committed:
            assert fresh.read() == committed.read(), f"{shipped} is stale: run python -m finetune.sample_data"


def test_files_match_generate_and_have_expected_sizes():
    rows = sample_data.generate()
    train = _read_rows(os.path.join(sample_data.DEFAULT_DIR, "train.jsonl"))
    val = _read_rows(os.path.join(sample_data.DEFAULT_DIR, "validation.jsonl"))
    assert len(train) == 1000 and len(val) == 200
    assert train + val == rows
    with open(os.path.join(sample_data.DEFAULT_DIR, "train.jsonl"), "rb") as f:
        raw = f.read()
    assert raw.endswith(b"\n") and b"\r" not in raw


def test_generate_is_deterministic_and_seeded():
    assert sample_data.generate(50, seed=0) == sample_data.generate(50, seed=0)
    assert sample_data.generate(50, seed=0) != sample_data.generate(50, seed=1)
    assert len(sample_data.generate(7)) == 7


def test_train_and_validation_are_disjoint():
    train = _read_rows(os.path.join(sample_data.DEFAULT_DIR, "train.jsonl"))
    val = _read_rows(os.path.join(sample_data.DEFAULT_DIR, "validation.jsonl"))
    train_users = {r["messages"][1]["content"] for r in train}
    val_users = {r["messages"][1]["content"] for r in val}
    assert len(train_users) == 1000 and len(val_users) == 200  # no duplicates within a split either
    assert not train_users & val_users


def test_rows_are_well_formed_and_answers_are_extractable():
    rows = sample_data.generate()
    ages = set()
    for row in rows:
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert msgs[0]["content"] == sample_data.SYSTEM_PROMPT
        answer = msgs[2]["content"]
        assert score(answer, answer) == {"valid_format": True, "exact_match": True}
        obj = json.loads(answer)
        assert list(obj) == ["name", "city", "age"]
        assert answer == json.dumps(obj, separators=(", ", ": ")) and "\n" not in answer
        # The answer must be recoverable from the sentence, otherwise the task is unlearnable.
        sentence = msgs[1]["content"]
        assert obj["name"] in sentence and obj["city"] in sentence and str(obj["age"]) in sentence
        assert 18 <= obj["age"] <= 90
        ages.add(obj["age"])
    assert len(ages) > 60  # ages really vary over the range


def test_dataset_variety():
    rows = sample_data.generate()
    assert len(sample_data.TEMPLATES) >= 15
    assert len(set(sample_data.FIRST_NAMES)) >= 60 and len(set(sample_data.CITIES)) >= 50
    names = {json.loads(r["messages"][2]["content"])["name"] for r in rows}
    cities = {json.loads(r["messages"][2]["content"])["city"] for r in rows}
    assert len(names) >= 200 and len(cities) >= 50
    # Every template is actually used by some row.
    sentences = [r["messages"][1]["content"] for r in rows]
    for template in sample_data.TEMPLATES:
        pattern = re.compile(re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(template)))
        assert any(pattern.fullmatch(s) for s in sentences), template


EXPECTED = '{"name": "Ana Silva", "city": "Lima", "age": 30}'


@pytest.mark.parametrize("generated, valid, exact", [
    (EXPECTED, True, True),
    ('  {"age": 30, "city": "Lima", "name": "Ana Silva"}\n', True, True),  # key order/whitespace free
    ('{"name": "Ana Silva", "city": "Lima", "age": 31}', True, False),     # wrong value
    ('{"name": "Ana Silva", "city": "Cusco", "age": 30}', True, False),
    ('{"name": "Ana Silva", "city": "Lima", "age": "30"}', False, False),  # wrong type
    ('{"name": "Ana Silva", "city": "Lima", "age": 30.0}', False, False),
    ('{"name": "Ana Silva", "city": "Lima", "age": true}', False, False),
    ('{"name": ["Ana"], "city": "Lima", "age": 30}', False, False),
    ('{"name": "Ana Silva", "town": "Lima", "age": 30}', False, False),    # wrong keys
    ('{"name": "Ana Silva", "city": "Lima", "age": 30, "job": "x"}', False, False),
    ('{"name": "Ana Silva", "city": "Lima"}', False, False),
    ('Sure! {"name": "Ana Silva", "city": "Lima", "age": 30}', False, False),  # chatter is not strict
    ('{"name": "Ana Silva", "city": "Lima", "age": 30', False, False),
    ('[1, 2, 3]', False, False),
    ('"just a string"', False, False),
    ("", False, False),
    ("[" * 100000, False, False),  # pathological nesting must not raise
    (None, False, False),
])
def test_score_sample_answers(generated, valid, exact):
    assert score(EXPECTED, generated) == {"valid_format": valid, "exact_match": exact}


def test_score_plain_text_answers_is_exact_match_only():
    assert score("not json", EXPECTED) == {"exact_match": False}
    assert score("Paris  is\nbig", "Paris is big ") == {"exact_match": True}


# ---------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return cache, tiny.ensure(cache)


def test_module_import_is_light():
    code = "import sys, finetune.tiny, finetune.sample_data; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    assert tiny.cache_dir() == str(tmp_path)
    monkeypatch.delenv("FINETUNE_CACHE")
    assert tiny.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "finetune")


def test_ensure_builds_loadable_model(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, path = built
    assert path == os.path.join(cache, tiny.DIR_NAME)
    assert sorted(os.listdir(cache)) == [tiny.DIR_NAME]  # no temp dirs left behind
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "qwen2" and type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (128, 4, 4, 2, 352, 2048)
    assert cfg.tie_word_embeddings and model.dtype == torch.float32
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000
    # It runs: a forward pass with labels gives a finite loss over the full vocabulary.
    enc = tok.apply_chat_template(sample_data.generate(1)[0]["messages"], return_tensors="pt", return_dict=True)
    out = model(input_ids=enc["input_ids"], labels=enc["input_ids"])
    assert out.logits.shape[-1] == cfg.vocab_size and torch.isfinite(out.loss)


def test_ensure_reuses_existing_build(built, monkeypatch):
    cache, path = built
    before = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    monkeypatch.setattr(tiny, "_build", lambda d: pytest.fail("rebuilt an existing model"))
    assert tiny.ensure(cache) == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == before


def test_ensure_survives_losing_a_build_race(built, tmp_path, monkeypatch):
    import shutil

    _, winner = built
    real_build = tiny._build

    def build_then_lose(d):
        real_build(d)
        shutil.copytree(winner, os.path.join(str(tmp_path), tiny.DIR_NAME))  # another process finished first

    monkeypatch.setattr(tiny, "_build", build_then_lose)
    path = tiny.ensure(str(tmp_path))
    assert path == os.path.join(str(tmp_path), tiny.DIR_NAME)
    assert os.listdir(str(tmp_path)) == [tiny.DIR_NAME]  # the loser's temp dir is cleaned up


def test_chat_template_is_qwen_chatml(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[1])
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")


def test_special_tokens(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[1])
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert 900 <= len(tok) <= 1100


def test_tokenizer_round_trips_and_matches_builder(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[1])
    fresh = tiny.build_tokenizer()  # the in-memory wrapper and the saved/auto-loaded one must agree
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in sample_data.generate(200)]
    texts.append("Ünïcödé, emoji 😀, tabs\tand  double  spaces\n\nend")
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert fresh.encode(text, add_special_tokens=False) == ids


def test_builds_are_deterministic(built, tmp_path):
    from safetensors.torch import load_file

    other = tiny.ensure(str(tmp_path))
    a = load_file(os.path.join(built[1], "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        with open(os.path.join(built[1], name), "rb") as f, open(os.path.join(other, name), "rb") as g:
            assert f.read() == g.read(), name


def test_tiny_config_carries_top_level_rope_theta_for_mlx_lm(tiny_model):
    # mlx-lm reads only the top-level key; without it a bare mlx_lm.load runs a different model
    config = json.load(open(os.path.join(tiny_model, "config.json")))
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
