"""Data: each SFT shape loads; the loss mask covers exactly the assistant tokens plus end-of-turn/EOS."""
from __future__ import annotations

import json
import os

import pytest

from finetune import data
from finetune.errors import UserError
from finetune.template import IGNORE, encode, encode_all, generation_prompt
from tests.conftest import ROOT, run_cli

CORPUS = os.path.join(ROOT, "tests", "data_corpus")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a city"},
        {"role": "assistant", "content": "Lisbon"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def trained_text(enc, tok) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE])


@pytest.mark.parametrize("row,shape", [
    ({"text": "plain words"}, "text"),
    ({"messages": CHAT}, "messages"),
    ({"prompt": "Q: 2+2?", "completion": " 4"}, "prompt_completion"),
    ({"prompt": CHAT[:2], "completion": [CHAT[2]]}, "conversational_prompt_completion"),
])
def test_each_shape_loads(tmp_path, row, shape):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 10)
    splits = data.load(path, val_split=0.2, seed=0)
    assert splits.shape == shape
    assert (len(splits.train), len(splits.validation)) == (8, 2)
    assert splits.validation_source.startswith("carved 2 rows")


@pytest.mark.parametrize("row,want", [
    ({"instruction": "Translate to French", "input": "cat", "output": "chat"},
     [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]),
    ({"instruction": "Name a colour ", "input": "", "output": "blue", "system": "Be brief."},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
      {"role": "assistant", "content": "blue"}]),
    ({"instruction": "Add 2 and 2", "output": "4"},
     [{"role": "user", "content": "Add 2 and 2"}, {"role": "assistant", "content": "4"}]),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}, {"from": "user", "value": "more"},
                        {"from": "assistant", "value": "ok"}]},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
      {"role": "assistant", "content": "ok"}]),
    ({"conversations": CHAT}, CHAT),  # role/content turns inside "conversations"
])
def test_alpaca_and_sharegpt_rows_train_as_messages(tmp_path, row, want, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 5)
    splits = data.load(path, val_split=0.2, seed=0)
    ex = splits.train[0]
    assert ex.messages == want and ex.shape == "messages" and ex.form == ("sharegpt" if "conversations" in row else "alpaca")
    trained = trained_text(encode(ex, tokenizer, 256), tokenizer)  # assistant turns only, as for messages rows
    assert all(m["content"] in trained for m in want if m["role"] == "assistant")
    assert not any(m["content"] in trained for m in want if m["role"] != "assistant")


def test_other_file_formats(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "completion": "b"}] * 4))
    (tmp_path / "d.csv").write_text("prompt,completion\nhello,world\nfoo,bar\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "x y"}] * 3), tmp_path / "d.parquet")
    assert data.load(str(tmp_path / "d.json"), 0.25, 0).shape == "prompt_completion"
    assert data.load(str(tmp_path / "d.csv"), 0.5, 0).train[0].prompt in ("hello", "foo")
    assert data.load(str(tmp_path / "d.parquet"), 0.3, 0).shape == "text"


def test_sample_uses_its_validation_file():
    splits = data.load("sample", 0.1, 0)
    assert (len(splits.train), len(splits.validation), splits.validation_source) == (1000, 200, "file")


def test_messages_mask_is_exactly_assistant_turns_plus_end_of_turn(tokenizer):
    ex = data.to_example({"messages": CHAT}, "x:1")
    enc = encode(ex, tokenizer, 1024)
    assert trained_text(enc, tokenizer) == "Hello!<|im_end|>Lisbon<|im_end|>"
    # everything else (system, user turns, role headers, the newline after <|im_end|>) is masked
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(enc.input_ids) == full
    assert enc.labels[-1] == IGNORE and enc.input_ids[-1] != tokenizer.eos_token_id  # trailing "\n"
    assert enc.n_trained == len(tokenizer("Hello!Lisbon")["input_ids"]) + 2


def test_conversational_prompt_completion_trains_only_completion(tokenizer):
    ex = data.to_example({"prompt": CHAT[:4], "completion": [CHAT[4]]}, "x:1")
    assert trained_text(encode(ex, tokenizer, 1024), tokenizer) == "Lisbon<|im_end|>"


def test_prompt_completion_trains_completion_and_eos(tokenizer):
    ex = data.to_example({"prompt": "Capital of France?", "completion": " Paris"}, "x:1")
    enc = encode(ex, tokenizer, 1024)
    assert trained_text(enc, tokenizer) == " Paris<|im_end|>"
    assert enc.labels[-1] == tokenizer.eos_token_id


def test_text_trains_everything_plus_eos(tokenizer):
    enc = encode(data.to_example({"text": "just text"}, "x:1"), tokenizer, 1024)
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_drops_rows_with_nothing_left_to_train(tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    rows = [data.to_example(long_prompt, "x:1"), data.to_example({"messages": CHAT}, "x:2")]
    kept, warnings = encode_all(rows, tokenizer, 64)
    assert len(kept) == 1 and all(len(r.input_ids) <= 64 for r in kept)
    assert any("dropped" in w for w in warnings) and any("truncated" in w for w in warnings)


def test_generation_prompt_ends_where_the_answer_starts(tokenizer):
    ids, expected = generation_prompt(data.to_example({"messages": CHAT}, "x:1"), tokenizer)
    assert expected == "Lisbon"
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("content,needle", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "d.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "d.jsonl:1: messages[0].role 'bot' is not one of"),
    ('{"question": "a", "reply": "b"}\n', "d.jsonl:1: unknown row shape (columns: question, reply)"),
    ('{"prompt": "a", "completion": null}\n', "d.jsonl:1: 'completion' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
     "d.jsonl:1: 'messages' has no non-empty assistant turn"),
    ('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', "d.jsonl:2: row shape 'prompt_completion' differs"),
    ("", "d.jsonl: the file is empty"),
])
def test_malformed_files_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        data.load(str(path), 0.1, 0)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_non_utf8_and_missing_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        data.load(str(path), 0.1, 0)
    with pytest.raises(UserError, match="DATASET=./nope.jsonl: file not found"):
        data.load("./nope.jsonl", 0.1, 0)


def test_pad_batch_never_trains_padding():
    from finetune.template import Encoded, pad_batch

    rows = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8])]
    ids, labels, mask = pad_batch(rows, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad_batch(rows, pad_id=0, width=5)[0].shape == (2, 5)


@pytest.mark.parametrize("form", ["alpaca", "sharegpt"])
def test_alpaca_and_sharegpt_files_train_with_no_flags(tmp_path, run_env, form):
    from tests.conftest import run_cli

    rows = [{"instruction": f"Say {w}", "input": "" if i % 2 else "loudly", "output": w} if form == "alpaca" else
            {"conversations": [{"from": "human", "value": f"Say {w}"}, {"from": "gpt", "value": w}]}
            for i, w in enumerate("one two three four five six seven eight nine ten".split())]
    path = write_jsonl(tmp_path / f"{form}.jsonl", rows)
    out = tmp_path / "run"
    result = run_cli([], {**run_env, "MODEL": "finetune/tiny-qwen2", "DATASET": path, "MAX_STEPS": "1",
                          "BATCH_SIZE": "2", "EVAL_ROWS": "2", "EVAL_GENERATIONS": "0", "OUTPUT_DIR": str(out)})
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.load(open(out / "run.json"))
    assert run["status"] == "completed" and run["data"]["shape"] == f"messages, from {form} rows"


def test_the_rows_shared_system_prompt_is_found_for_every_method_shape():
    from finetune import system_prompt
    from finetune.data import Example
    from finetune.methods.dpo import PairRows
    from finetune.methods.grpo import PromptRow

    sys_msg = {"role": "system", "content": "Answer in JSON."}
    chat = [Example(messages=[sys_msg, {"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}])
            for i in range(3)]
    assert system_prompt.shared(chat) == ("Answer in JSON.", 1)
    assert system_prompt.shared([PairRows(chat[0], chat[1], "x:1")]) == ("Answer in JSON.", 1)
    assert system_prompt.shared([PromptRow([sys_msg, {"role": "user", "content": "q"}], {}, "x:1")])[0] == "Answer in JSON."
    mixed = chat + [Example(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])]
    assert system_prompt.shared(mixed) == (None, 2) and "2 different" in system_prompt.line(None, 2)
    assert system_prompt.shared([Example(text="plain")]) == (None, 1) and system_prompt.line(None, 1) is None


@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory):
    """The tiny model with Qwen2.5's chat template, which renders `tools` and tool calls (the tiny one drops them)."""
    import shutil

    from transformers import AutoTokenizer

    folder = str(tmp_path_factory.mktemp("tool-model") / "qwen-tools")
    shutil.copytree(tiny_model, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = open(os.path.join(CORPUS, "qwen2.5_chat_template.jinja")).read()
    tok.save_pretrained(folder)
    return folder


def test_tool_calling_rows_train_the_calls_and_answers_not_the_tool_results(tool_model, tokenizer):
    from transformers import AutoTokenizer

    from finetune import template
    from finetune.data import load_file

    examples, problems = load_file(os.path.join(CORPUS, "tool_calls.jsonl"))
    assert not [p for p in problems if p.level == "error"], problems
    assert all(ex.form == "tool-calling" and ex.tools for ex in examples)  # tools given as a list or as JSON text
    tok = AutoTokenizer.from_pretrained(tool_model)
    enc = template.encode(examples[0], tok, 1024)
    trained = tok.decode([t for t in enc.labels if t != template.IGNORE])
    whole = tok.decode(enc.input_ids)
    assert '"name": "get_weather"' in whole and "Current weather in a city" in whole  # the schema reached the model
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in trained
    assert "It is 21 C in Paris." in trained
    assert "temp_c" not in trained and "Weather in Paris?" not in trained  # tool results and the question: context
    with pytest.raises(UserError, match="cannot render tools.*Qwen/Qwen2.5"):
        template.check_tools(tokenizer, "finetune/tiny-qwen2")  # the tiny template silently drops tool calls


def test_tool_calling_file_trains_and_check_data_names_the_form(tool_model, run_env, tmp_path):
    path = os.path.join(CORPUS, "tool_calls.jsonl")
    checked = run_cli(["check-data", path, "--model", tool_model], run_env)
    assert checked.returncode == 0 and "tool-calling: messages with assistant tool_calls" in checked.stdout, checked.stdout
    env = {**run_env, "MODEL": tool_model, "DATASET": path, "MAX_STEPS": "2", "EVAL_GENERATIONS": "0",
           "EVAL_ROWS": "1", "OUTPUT_DIR": str(tmp_path / "run")}
    done = run_cli([], env)
    assert done.returncode == 0, done.stderr[-1500:]
    refused = run_cli([], {**env, "MODEL": "finetune/tiny-qwen2", "OUTPUT_DIR": str(tmp_path / "run2")})
    assert refused.returncode == 2 and "cannot render tools" in refused.stderr and not (tmp_path / "run2").exists()
