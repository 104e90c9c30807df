"""`finetune check-data` and the validator train shares with it: a corpus of broken and awkward files
(tests/data_corpus/), mapping suggestions, the preview's loss markers, and train refusing bad data
before any model loads. Most cases run in-process through cli.main (fast); a few go through a
subprocess where the exit code and the absence of a traceback are the point."""
from __future__ import annotations

import json
import os
import re

import pytest

from finetune import check_data, check_tokens, cli, data, dataset_checks, shapes
from finetune.config import FIELDS, env_name, resolve
from finetune.errors import UserError
from tests.conftest import ROOT, run_cli

CORPUS = os.path.join("tests", "data_corpus")
TINY = ["--model", "finetune/tiny-qwen2"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a city"},
        {"role": "assistant", "content": "Lisbon"}]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tiny_model):
    """No user overrides leak in; the tiny model is built (into the session cache) for tokenizer cases."""
    for name in FIELDS:
        monkeypatch.delenv(env_name(name), raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


def check(capsys, *args) -> tuple[int, str]:
    code = cli.main(["check-data", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_kto_rows_are_checked_and_every_method_can_be_chosen(capsys):
    report = check_data.scan(os.path.join(CORPUS, "kto_bad_label.jsonl"), "kto")
    assert any(str(p).endswith("kto_bad_label.jsonl:2: 'label' must be true or false (got 'maybe')") for p in report.errors)
    assert cli.main(["check-data", os.path.join(CORPUS, "kto_bad_label.jsonl"), "--method", "kto"]) == 2
    assert "kto_bad_label.jsonl:2: 'label' must be true or false (got 'maybe')" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: --method takes what train can run
        cli.main(["check-data", os.path.join(CORPUS, "kto_bad_label.jsonl"), "--method", "cpo"])
    assert "choose from 'sft', 'dpo', 'orpo', 'kto', 'grpo'" in capsys.readouterr().err


# (file, extra args, exit code, text the report must contain: file + line/row + the problem)
CASES = [
    ("bad_json_line.jsonl", [], 2, "bad_json_line.jsonl:3: not valid JSON"),
    ("empty.jsonl", [], 2, "empty.jsonl: the file is empty"),
    ("whitespace_only.jsonl", [], 2, "whitespace_only.jsonl: no rows found"),
    ("latin1.jsonl", [], 2, "latin1.jsonl:2: not UTF-8 text"),
    ("utf16.jsonl", [], 2, "utf16.jsonl: the file is UTF-16 text; re-save it as UTF-8"),
    ("null_completion.jsonl", [], 2, "null_completion.jsonl:2: 'completion' must be a non-empty string (got null)"),
    ("wrong_types.jsonl", [], 2, "wrong_types.jsonl:2: 'completion' must be a non-empty string (got a number)"),
    ("wrong_types.jsonl", [], 2, "wrong_types.jsonl:3: one of 'prompt'/'completion' is a list of messages"),
    ("missing_field.jsonl", [], 2, "missing_field.jsonl:2: 'completion' must be a non-empty string (got missing)"),
    ("unknown_role.jsonl", [], 2, "unknown_role.jsonl:2: messages[1].role 'bot' is not one of"),
    ("unknown_role.jsonl", [], 2, "unknown_role.jsonl:3: messages[0].role 'human' is not one of system, user, "
                                  "assistant, tool (use 'user')"),
    ("roles_out_of_order.jsonl", [], 2, "roles_out_of_order.jsonl:2: messages[2] is a system message after the first"),
    ("empty_assistant.jsonl", [], 2, "empty_assistant.jsonl:2: messages[1] is an empty assistant turn"),
    ("no_assistant.jsonl", [], 2, "no_assistant.jsonl:2: 'messages' has no non-empty assistant turn"),
    ("conv_completion_no_assistant.jsonl", [], 2, "conv_completion_no_assistant.jsonl:2: 'completion' must contain"),
    ("sharegpt.jsonl", [], 0, "sft   ready          sharegpt: conversations from/value, human -> user"),
    ("sharegpt.jsonl", ["--map", "conversations=messages"], 2, "sharegpt.jsonl:1: 'messages' uses ShareGPT turns"),
    ("sharegpt_bad_role.jsonl", [], 2, "sharegpt_bad_role.jsonl:2: conversations[1].from 'robot' is not a ShareGPT "
                                       "role (human, gpt, system, tool)"),
    ("alpaca.json", [], 0, "sft   ready          alpaca: instruction (+ input) -> user turn, output -> assistant turn"),
    ("alpaca_bad.jsonl", [], 2, "alpaca_bad.jsonl:2: 'output' must be a non-empty string (got null)"),
    ("alpaca_bad.jsonl", [], 2, "alpaca_bad.jsonl:3: 'input' must be a string (got a list)"),
    ("dpo_good_bad.jsonl", ["--method", "dpo"], 2, "dpo_good_bad.jsonl:1: columns prompt, good_response, bad_response "
                                                   "do not fit dpo: rename columns: --map good_response=chosen "
                                                   "--map bad_response=rejected"),
    ("csv_extra_field.csv", [], 2, "csv_extra_field.csv:3: 3 fields, more than the header's 2 columns"),
    ("csv_missing_field.csv", [], 2, "csv_missing_field.csv:3: 1 fields, fewer than the header's 2 columns"),
    ("csv_header_only.csv", [], 2, "csv_header_only.csv: no rows found"),
    ("csv_repeated_header.csv", [], 2, "csv_repeated_header.csv:1: the header repeats column 'prompt'"),
    ("mixed_shapes.jsonl", [], 2, "mixed_shapes.jsonl:2: row shape 'prompt_completion' differs from the first row's"),
    ("not_object.jsonl", [], 2, "not_object.jsonl:3: each row must be an object, got text"),
    ("pretty_printed.jsonl", [], 2, "pretty_printed.jsonl:1: not valid JSON: the file looks like one JSON document"),
    ("broken.json", [], 2, "broken.json:3: not valid JSON (Expecting ',' delimiter"),
    ("corrupt.parquet", [], 2, "corrupt.parquet: not a readable Parquet file"),
    ("notes.txt", [], 2, "notes.txt: unsupported file type '.txt'"),
    ("mapping_clash.jsonl", ["--map", "question=prompt"], 2, "mapping_clash.jsonl:1: has both 'question' and 'prompt'"),
    ("qa_columns.jsonl", ["--map", "query=prompt"], 2, "qa_columns.jsonl: --map maps 'query', but no row has a 'query'"),
    ("all_cut.jsonl", ["--max-seq-length", "32"], 2, "all_cut.jsonl:1: 2 of 2 rows have every trained token past "
                                                     "MAX_SEQ_LENGTH=32, so they leave nothing to train"),
    # awkward but trainable: exit 0, with warnings that still name the row
    ("bom_utf8.jsonl", [], 0, "Result: ready for sft (0 errors, 0 warnings)"),
    ("columnar.json", [], 0, "Result: ready for sft"),
    ("duplicates.jsonl", [], 0, "duplicates.jsonl:3: duplicate of tests/data_corpus/duplicates.jsonl:1"),
    ("trailing_user_turn.jsonl", [], 0, "trailing_user_turn.jsonl:2: the last turn is 'user', not assistant"),
    ("dpo_identical.jsonl", ["--method", "dpo"], 0, "dpo_identical.jsonl:2: 'chosen' and 'rejected' are identical"),
    ("alpaca.json", ["--map", "instruction=prompt", "--map", "output=completion"], 0,
     "alpaca.json: row 2: column 'input' has text in 1 of 3 rows, but sft does not use it"),
    ("alpaca.json", ["--map", "instruction=prompt", "--map", "output=completion"], 0,
     "alpaca.json: row 1: 'prompt' and 'completion' meet with no space or newline in 3 of 3 rows"),
    ("long_rows.jsonl", ["--max-seq-length", "48"], 0, "long_rows.jsonl:2: 2 of 4 rows (50.0%) are longer than "
                                                       "MAX_SEQ_LENGTH=48 after the template and will be truncated"),
    ("long_rows.jsonl", ["--max-seq-length", "48"], 0, "long_rows.jsonl:2: 1 of 4 rows have every trained token past "
                                                       "MAX_SEQ_LENGTH=48, so they are dropped"),
    ("dpo_good_bad.jsonl", ["--method", "dpo", "--map", "good_response=chosen", "--map", "bad_response=rejected"], 0,
     "dpo   ready"),
    ("grpo_prompts.jsonl", ["--method", "grpo"], 0, "grpo  ready          prompt; reward functions can read answer"),
    ("tool_calls.jsonl", [], 2, "tool_calls.jsonl:1: MODEL=finetune/tiny-qwen2: its chat template cannot render tools"),
]


@pytest.mark.parametrize("name,args,code,needle", CASES, ids=[f"{c[0]}{'+' if c[1] else ''}" for c in CASES])
def test_corpus_file_is_reported_with_its_line(capsys, name, args, code, needle):
    got, out = check(capsys, os.path.join(CORPUS, name), *args, *TINY)
    assert got == code, out
    assert needle in out, out
    assert "Traceback" not in out


def test_corpus_has_at_least_20_files_all_covered():
    files = set(os.listdir(os.path.join(ROOT, CORPUS)))
    assert len(files) >= 20 and files == {c[0] for c in CASES} | {"kto_bad_label.jsonl", "qwen2.5_chat_template.jinja"}


@pytest.mark.parametrize("name,needle", [("bad_json_line.jsonl", "bad_json_line.jsonl:3: not valid JSON"),
                                         ("utf16.jsonl", "utf16.jsonl: the file is UTF-16")])
def test_subprocess_exit_2_no_traceback(run_env, name, needle):
    result = run_cli(["check-data", os.path.join(CORPUS, name)], run_env)
    assert result.returncode == 2
    assert needle in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_every_problem_is_listed_not_just_the_first(tmp_path, capsys):
    path = tmp_path / "many.jsonl"
    path.write_text("".join('{"prompt": "p", "completion": null}\n' for _ in range(30)))
    code, out = check(capsys, str(path))
    assert code == 2 and "30 errors" in out and f"{path}:20:" in out and "... and 10 more" in out
    code, out = check(capsys, str(path), "--json")
    report = json.loads(out)
    assert report["ok"] is False and report["counts"]["errors"] == 30
    assert [p["where"] for p in report["problems"]] == [f"{path}:{n}" for n in range(1, 31)]


def test_json_output_for_scripts(capsys):
    code, out = check(capsys, "sample", "--json", *TINY)
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["rows"] == 1200 and report["problems"] == []
    assert report["verdicts"]["sft"]["status"] == "ready" and report["verdicts"]["dpo"]["status"] == "incompatible"
    stats = report["stats"]
    assert stats["tokens"]["p50"] <= stats["tokens"]["p99"] <= stats["tokens"]["max"] < 1024
    assert 0 < stats["trained_share"] < 1 and stats["truncated_rows"] == 0
    assert stats["suggested_max_seq_length"] % 64 == 0 and stats["suggested_max_seq_length"] >= stats["tokens"]["max"]


def test_bad_map_is_a_one_line_error_naming_the_flag(capsys):
    code, out = check(capsys, "sample", "--map", "question", "--json")
    assert code == 2 and json.loads(out)["error"].startswith("--map='question': 'question' is not old=new")
    with pytest.raises(UserError, match=r"COLUMN_MAP='a=x,b=x': two columns are mapped to 'x'"):
        data.parse_column_map("a=x,b=x")
    with pytest.raises(UserError, match=r"column 'a' is mapped twice"):
        data.parse_column_map("a=b,a=c")
    assert data.parse_column_map(" question = prompt , answer=completion,") == {"question": "prompt", "answer": "completion"}


@pytest.mark.parametrize("columns,need,expected", [
    (["instruction", "input", "output"], ("prompt", "completion"), {"instruction": "prompt", "output": "completion"}),
    (["question", "answer"], ("prompt", "completion"), {"question": "prompt", "answer": "completion"}),
    (["query", "response"], ("prompt", "completion"), {"query": "prompt", "response": "completion"}),
    (["input", "target"], ("prompt", "completion"), {"input": "prompt", "target": "completion"}),
    (["prompt", "good_response", "bad_response"], ("prompt", "chosen", "rejected"),
     {"good_response": "chosen", "bad_response": "rejected"}),
    (["question", "preferred", "dispreferred"], ("prompt", "chosen", "rejected"),
     {"question": "prompt", "preferred": "chosen", "dispreferred": "rejected"}),
    (["winner", "loser"], ("chosen", "rejected"), {"winner": "chosen", "loser": "rejected"}),
    (["prompt", "response_a_is_better", "positive", "negative"], ("prompt", "chosen", "rejected"),
     {"positive": "chosen", "negative": "rejected"}),
    (["conversations"], ("messages",), {"conversations": "messages"}),
    (["prompt", "kto_label", "output"], ("prompt", "completion", "label"), {"output": "completion", "kto_label": "label"}),
    (["id", "score"], ("prompt", "completion"), None),
])
def test_mapping_suggestions_for_common_column_names(columns, need, expected):
    assert shapes.suggest_map(columns, need) == expected


def test_verdicts_per_method():
    pref = {"prompt": "q", "chosen": "a", "rejected": "b"}
    verdicts = {m: shapes.verdict(m, list(pref), pref) for m in shapes.METHODS}
    assert verdicts["dpo"]["status"] == verdicts["orpo"]["status"] == "ready"
    assert verdicts["sft"] == {**verdicts["sft"], "status": "needs mapping", "map": {"chosen": "completion"}}
    assert "paired preference data fits dpo/orpo" in verdicts["kto"]["reason"]
    assert verdicts["grpo"]["status"] == "ready" and "no answer column" in verdicts["grpo"]["note"]
    conv = {"chosen": CHAT[1:3], "rejected": CHAT[1:2] + [{"role": "assistant", "content": "Bye"}]}
    assert shapes.verdict("dpo", list(conv), conv)["form"] == "conversational chosen/rejected, implicit prompt"
    assert shapes.row_problems(conv, "x:1", "dpo") == []
    assert "incompatible" == shapes.verdict("kto", ["text"], {"text": "a"})["status"]


def _marked(text: str) -> list[str]:
    return re.findall(re.escape(check_tokens.OPEN) + r"(.*?)" + re.escape(check_tokens.CLOSE), text, re.S)


def test_preview_marks_exactly_assistant_tokens_plus_end_of_turn(tokenizer):
    chat = data.to_example({"messages": CHAT}, "x:1")
    [block] = check_tokens.preview([chat], tokenizer, 1, 1024)
    header, body = block.split("\n", 1)
    assert _marked(body) == ["Hello!<|im_end|>", "Lisbon<|im_end|>"]
    assert body.replace(check_tokens.OPEN, "").replace(check_tokens.CLOSE, "") == \
        tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert header.startswith("--- x:1:") and "trained" in header
    plain = data.to_example({"prompt": "Capital of France?", "completion": " Paris"}, "x:2")
    [block] = check_tokens.preview([plain], tokenizer, 1, 1024)
    assert _marked(block.split("\n", 1)[1]) == [" Paris" + tokenizer.eos_token]


def test_show_renders_rows_through_the_cli(capsys):
    code, out = check(capsys, "sample", "--show", "2", *TINY)
    assert code == 0 and out.count("--- ") == 2
    assert '[[{"name": "David Nguyen", "city": "Zurich", "age": 83}<|im_end|>]]' in out


def test_warns_when_the_template_has_no_trained_end_of_turn_token(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [data.to_example({"messages": CHAT}, "x:1")]
    assert check_tokens.template_warnings(rows, tok) == []
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n{% endfor %}"
    [warning] = check_tokens.template_warnings(rows, tok)
    assert warning.startswith("x:1: 1 of 1 rows have an assistant turn whose trained tokens end without an end-of-turn")


def test_statistics_and_steps_per_epoch(tokenizer, tiny_model):
    from finetune import models

    report = check_data.scan("sample")
    check_tokens.measure(report, tokenizer, 90)
    assert report.stats["truncated_rows"] > 0 and 0 < report.stats["truncated_share"] < 1
    assert any("longer than MAX_SEQ_LENGTH=90" in p.message for p in report.warnings)
    cfg, _ = resolve({}, env={"BACKEND": "torch", "MAX_SEQ_LENGTH": "90"})
    check_tokens.plan_steps(report, cfg, models.resolve("finetune/tiny-qwen2", True)[0])
    per_step = report.stats["batch_size"] * report.stats["grad_accum"]
    assert report.stats["train_rows"] == 1000 and report.stats["steps_per_epoch"] == -(-1000 // per_step)


def test_data_load_applies_the_mapping_and_raises_every_error(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f" A{i}"}) + "\n" for i in range(5)))
    splits = data.load(str(path), 0.2, 0, column_map="question=prompt,answer=completion")
    assert splits.shape == "prompt_completion" and len(splits.rows) == 5
    with pytest.raises(UserError, match=r"qa.jsonl:1: unknown row shape .*--map question=prompt --map answer=completion"):
        data.load(str(path), 0.2, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n{"prompt": "c", "completion": 3}\n')
    with pytest.raises(data.DataError) as err:
        data.load(str(bad), 0.2, 0)
    assert [p.where for p in err.value.problems] == [f"{bad}:2", f"{bad}:3"]
    assert str(err.value).splitlines()[0] == f"{bad}:2: 'completion' must be a non-empty string (got missing)"


def test_check_splits_gives_train_the_same_warnings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a\\n", "completion": "b"}\n' * 3 + '{"prompt": "c\\n", "completion": "d"}\n')
    warnings = dataset_checks.check_splits(data.load(str(path), 0.25, 0))
    assert warnings == [f"{path}:2: duplicate of {path}:1; it is trained twice, drop it",
                        f"{path}:3: duplicate of {path}:1; it is trained twice, drop it"]


def test_train_refuses_bad_data_before_the_model_loads(run_env, tmp_path):
    # A model that cannot exist: reaching model resolution would be a different error.
    result = run_cli(["train", "--dataset", os.path.join(CORPUS, "wrong_types.jsonl"), "--model", "no-such/model",
                      "--output-dir", str(tmp_path / "out")], run_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: tests/data_corpus/wrong_types.jsonl:2: 'completion' must be a non-empty string (got a number)"
    assert "wrong_types.jsonl:3: one of 'prompt'/'completion'" in lines[1] and "check-data" in lines[-1]
    assert "no-such/model" not in result.stderr and not os.path.exists(tmp_path / "out")


def test_train_applies_column_map_and_prints_data_warnings(run_env, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i % 4}?\n", "answer": f"A{i % 4}"}) + "\n" for i in range(8)))
    env = {**run_env, "COLUMN_MAP": "question=prompt,answer=completion", "MODEL": "finetune/tiny-qwen2",
           "BACKEND": "torch"}
    result = run_cli(["train", "--dataset", str(path), "--dry-run"], env)
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}:5: duplicate of {path}:1" in result.stdout and "prompt_completion" in result.stdout


def test_default_model_offline_falls_back_to_the_offline_model_with_banner(run_env, offline_model):
    result = run_cli(["check-data", os.path.join(CORPUS, "duplicates.jsonl")], run_env)
    assert result.returncode == 0, result.stderr
    assert "cannot be reached" in result.stdout and "tokenizer of smollm2-135m-offline" in result.stdout
    banner = [line for line in result.stdout.splitlines() if line.startswith("!")]
    assert len(banner) >= 3 and all(len(line) <= 80 for line in banner)
