"""DPO and GRPO end to end on the tiny model (both backends), chaining from an SFT adapter, and the one-line
errors for bad rows, bad reward files and bad settings. The losses themselves are tested in test_losses.py;
the real-model gains are measured by bench/methods.py (numbers in README)."""
from __future__ import annotations

import json
import os

import pytest

from tests.conftest import run_cli
from finetune.template import Encoded


def tiny(run_env, out, **extra) -> dict:
    return {**run_env, "MODEL": "finetune/tiny-qwen2", "EVAL_ROWS": "4", "EVAL_GENERATIONS": "2",
            "MAX_NEW_TOKENS": "8", "OUTPUT_DIR": str(out), **extra}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, cache_dir):
    from finetune.config import FIELDS, env_name

    out = tmp_path_factory.mktemp("chain") / "sft"
    env = {k: v for k, v in os.environ.items() if k not in {env_name(n) for n in FIELDS}}
    env.update(FINETUNE_CACHE=cache_dir, HF_HUB_OFFLINE="1")
    result = run_cli([], tiny(env, out, MAX_STEPS="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_chained_after_sft(backend, sft_run, run_env, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "dpo"
    result = run_cli([], tiny(run_env, out, METHOD="dpo", ADAPTER=str(sft_run), MAX_STEPS="2", BATCH_SIZE="2",
                              BACKEND=backend, SAVE_STEPS="1", SAVE_TOTAL="5"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.load(open(out / "run.json"))
    assert run["chain"]["from_run"] == json.load(open(sft_run / "run.json"))["run_name"]
    assert run["config"]["beta"] == 0.1 and run["settings"]["beta"]["source"] == "dpo default"
    before, after = run["evaluation"]["before"], run["evaluation"]["after"]
    assert before["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the starting model itself
    assert {"pref_accuracy", "reward_margin"} <= set(after["metrics"]) and after["eval_loss"] != before["eval_loss"]
    start = load_file(str(out / "checkpoints" / "step-0" / "adapter_model.safetensors"))
    sft = load_file(str(sft_run / "adapter_model.safetensors"))
    assert set(start) == set(sft) and all(abs(start[k] - sft[k]).max() < 1e-6 for k in sft)  # started from SFT
    report = open(out / "report.md").read()
    assert "| metric | starting adapter | after training |" in report and "pref_accuracy" in report


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_orpo_trains_from_the_base_model_in_one_stage(backend, run_env, tmp_path):
    """No ADAPTER and no reference: ORPO starts from the base model; its defaults, metrics and report."""
    out = tmp_path / "orpo"
    result = run_cli([], tiny(run_env, out, METHOD="orpo", DATASET="sample", MAX_STEPS="2", BATCH_SIZE="2",
                              GRAD_ACCUM="1", BACKEND=backend, LOGGING_STEPS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.load(open(out / "run.json"))
    assert run["config"]["beta"] == 0.1 and run["settings"]["beta"]["source"] == "orpo default"
    assert run["config"]["learning_rate"] == 5e-5 and not run.get("chain")
    before, after = run["evaluation"]["before"], run["evaluation"]["after"]
    assert {"pref_accuracy", "reward_margin"} <= set(after["metrics"]) and after["eval_loss"] < before["eval_loss"]
    logged = [m for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m]
    assert logged and all(m["loss"] > m["nll"] > 0 and m["odds_ratio_loss"] > 0 for m in logged)
    report = open(out / "report.md").read()
    assert "| eval loss (ORPO: NLL + beta x odds ratio, per pair) |" in report and "| pref_accuracy |" in report


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_kto_trains_on_thumbs_up_and_down_rows(backend, run_env, tmp_path):
    """Unpaired labelled rows (the shipped sample_kto): the loss starts at 0.5 (policy = reference, z0 = 0)."""
    out = tmp_path / "kto"
    result = run_cli([], tiny(run_env, out, METHOD="kto", DATASET="sample", MAX_STEPS="2", BATCH_SIZE="4",
                              GRAD_ACCUM="1", BACKEND=backend, LOGGING_STEPS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.load(open(out / "run.json"))
    assert run["config"]["beta"] == 0.1 and run["settings"]["beta"]["source"] == "kto default"
    before, after = run["evaluation"]["before"], run["evaluation"]["after"]
    assert before["eval_loss"] == pytest.approx(0.5, abs=1e-4) and after["eval_loss"] != before["eval_loss"]
    assert {"label_accuracy", "reward_margin", "kl"} <= set(after["metrics"])
    # step 1: policy = reference, so KTO's part is 0.5 exactly; the thumbs-up NLL (RPO_ALPHA, auto 1.0) comes on top
    assert run["config"]["rpo_alpha"] == 1.0 and run["settings"]["rpo_alpha"]["source"] == "kto default"
    first = next(m for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m)
    assert first["loss"] > 0.5 + 0.1 and first["kl"] == 0.0
    assert "| label_accuracy |" in open(out / "report.md").read()


def test_kto_rows_need_a_label(run_env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "completion": "hello", "label": True}) + "\n"
                   + json.dumps({"prompt": "hi", "completion": "bye", "label": "maybe"}) + "\n")
    result = run_cli([], tiny(run_env, tmp_path / "o", METHOD="kto", DATASET=str(bad), MAX_STEPS="1"))
    assert result.returncode == 2 and "bad.jsonl" in result.stderr and "'label' must be true or false" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_rpo_adds_the_chosen_nll_to_the_dpo_loss(backend, sft_run, run_env, tmp_path):
    """At step 1 the policy is the reference, so plain DPO's loss is log 2 exactly; with RPO_ALPHA the chosen
    answers' NLL (positive) comes on top, and the setting is recorded."""
    losses = {}
    for alpha in ("0", "1"):
        out = tmp_path / f"rpo-{alpha}"
        result = run_cli([], tiny(run_env, out, METHOD="dpo", ADAPTER=str(sft_run), MAX_STEPS="1", BATCH_SIZE="2",
                                  GRAD_ACCUM="1", BACKEND=backend, RPO_ALPHA=alpha, LOGGING_STEPS="1"))
        assert result.returncode == 0, result.stderr[-2000:]
        run = json.load(open(out / "run.json"))
        assert run["config"]["rpo_alpha"] == float(alpha) and run["settings"]["rpo_alpha"]["source"] == "env"
        losses[alpha] = next(m["loss"] for m in map(json.loads, open(out / "metrics.jsonl")) if "loss" in m)
    assert losses["0"] == pytest.approx(0.6931, abs=1e-3)
    assert losses["1"] > losses["0"] + 0.1  # the tiny model's chosen answers cost nats per token


REWARD_FILE = """
def score(prompts, completions, answer, **kwargs):
    return [float(len(c[0]["content"]) < 20) for c in completions]
"""


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grpo_with_a_user_reward_file(backend, run_env, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    out = tmp_path / "grpo"
    result = run_cli([], tiny(run_env, out, METHOD="grpo", REWARD=f"json_format,{tmp_path}/rewards.py:score",
                              MAX_STEPS="2", BATCH_SIZE="4", GRAD_ACCUM="1", NUM_GENERATIONS="2", BACKEND=backend,
                              BETA="0.04"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.load(open(out / "run.json"))
    after = run["evaluation"]["after"]["metrics"]
    assert {"reward", "reward/json_format", f"reward/{tmp_path}/rewards.py:score", "completion_length"} <= set(after)
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("reward" in m and "completion_length" in m for m in logged)
    assert run["config"]["reward"].startswith("json_format,") and run["config"]["beta"] == 0.04


@pytest.mark.parametrize("content,needle", [
    ("import nonexistent_module_xyz\n", "cannot be imported (ModuleNotFoundError"),
    ("def score(prompts):\n    return [1.0]\n", "must accept `completions`"),
    ("def score(prompts, completions, **kw):\n    return ['good' for _ in completions]\n", "every reward must be a finite number"),
    ("def score(prompts, completions, **kw):\n    return [1.0]\n", "one number per completion"),
    ("x = 1\n", "has no function 'score'"),
])
def test_bad_reward_files_are_one_line_errors_before_any_weights_load(content, needle, run_env, tmp_path):
    (tmp_path / "r.py").write_text(content)
    result = run_cli(["--dry-run"], tiny(run_env, tmp_path / "out", METHOD="grpo", REWARD=f"{tmp_path}/r.py:score"))
    assert result.returncode == 2, result.stdout[-1000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_bad_preference_rows_and_settings(run_env, tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}\n'
                   '{"prompt": "Hi", "chosen": "", "rejected": "x"}\n{"prompt": "Hi", "chosen": "Hello"}\n')
    result = run_cli(["--dry-run"], tiny(run_env, tmp_path / "o", METHOD="dpo", DATASET=str(bad)))
    assert result.returncode == 2
    assert f"{bad}:2: 'chosen' must be a non-empty string" in result.stderr and f"{bad}:3:" in result.stderr
    assert "Traceback" not in result.stderr
    for env, needle in (({"NUM_GENERATIONS": "1"}, "NUM_GENERATIONS='1' is not valid"),
                        ({"BETA": "-1"}, "BETA='-1' is not valid"), ({"METHOD": "cpo"}, "METHOD='cpo' is not valid")):
        result = run_cli(["--dry-run"], tiny(run_env, tmp_path / "o", **{"METHOD": "grpo", **env}))
        assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_check_data_and_train_agree_on_the_shipped_samples(run_env):
    for method in ("sft", "dpo", "orpo", "kto", "grpo"):
        checked = run_cli(["check-data", "sample", "--method", method, "--model", "finetune/tiny-qwen2"], run_env)
        assert checked.returncode == 0 and f"Result: ready for {method}" in checked.stdout, checked.stdout[-800:]
        planned = run_cli(["--dry-run"], {**run_env, "METHOD": method, "MODEL": "finetune/tiny-qwen2"})
        assert planned.returncode == 0 and f"method              {method}" in planned.stdout, planned.stderr[-800:]
        # an unset learning rate is the method's own (preference losses need a far smaller one), and says so
        lr = {"sft": "0.0002                           <- default ", "dpo": "2e-05                            <- dpo default",
              "grpo": "5e-05                            <- grpo default",
              "orpo": "5e-05                            <- orpo default",
              "kto": "2e-05                            <- kto default"}[method]
        assert f"learning_rate            {lr}" in planned.stdout, planned.stdout[:3000]


def test_grpo_with_no_eval_generations_trains_and_says_there_is_no_evaluation(run_env, tmp_path):
    # found on the GPU: EVAL_GENERATIONS=0 scored zero completions and the default exact_match reward then
    # refused the data for having "no answer column"
    out = tmp_path / "g0"
    result = run_cli([], tiny(run_env, out, METHOD="grpo", DATASET="data/sample_grpo", EVAL_GENERATIONS="0",
                              MAX_STEPS="1", BATCH_SIZE="2", GRAD_ACCUM="1", NUM_GENERATIONS="2"))
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-1500:]
    run = json.load(open(out / "run.json"))
    assert run["status"] == "completed" and run["evaluation"]["after"]["metrics"] == {}
    assert run["config"]["reward"] == "json_format,exact_match"


def test_kto_rows_mixing_text_and_messages_are_one_line(run_env, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    text = {"prompt": "hi", "completion": "hello", "label": True}
    chat = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
            "label": False}
    (mixed / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (text, chat, text, chat)))
    (mixed / "validation.jsonl").write_text(json.dumps(text) + "\n" + json.dumps({**text, "label": False}) + "\n")
    result = run_cli(["--dry-run"], tiny(run_env, tmp_path / "o", METHOD="kto", DATASET=str(mixed)))
    assert result.returncode == 2 and "use one form per file" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_shard_deals_a_steps_items_to_processes_and_keeps_the_whole_steps_denominator():
    from finetune.methods import Batch, shard

    seqs = [Encoded(list(range(n)), list(range(n))) for n in (5, 9, 3, 7, 2, 8)]  # three DPO pairs
    batch = Batch("dpo", seqs, 3.0, {"ref": [float(i) for i in range(6)]}, group=2, stats={"reward": 1.5})
    parts = [shard(batch, r, 2) for r in range(2)]
    assert all(p.denominator == 3.0 and p.stats == {"reward": 1.5} and p.group == 2 for p in parts)
    got = [s for p in parts for s in p.sequences]
    assert sorted(map(id, got)) == sorted(map(id, seqs))  # every sequence once
    for p in parts:  # pairs stay whole, with their own per-sequence values
        for i in range(0, len(p.sequences), 2):
            k = seqs.index(p.sequences[i])
            assert k % 2 == 0 and p.sequences[i + 1] is seqs[k + 1] and p.per_sequence["ref"][i:i + 2] == [k, k + 1]
    assert [len(p.sequences) for p in parts] == [4, 2]  # by length 9, 8, 7: pairs (5, 9) and (3, 7) to rank 0
    assert shard(batch, 0, 1) is batch
