"""Reliability round 2 (issue 22): every hostile input in tests/hostile_cases.py ends with its exit code, one clear
`error:` line naming what to fix, no traceback, and nothing left behind (no new file, no temp folder). The table
runs in-process (a subprocess per case would spend the suite's two minutes importing torch); signals, hangs and
broken pipes need a real process and are below the table."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest

from tests.conftest import ROOT
from tests.hostile_cases import TINY, C, cases, data

CASES = cases()
HANG_S = 20  # far above any case's time here; a case still running then is a hang


def tree(path: str) -> set[str]:
    out = set()
    for root, dirs, names in os.walk(path):
        out.update(os.path.relpath(os.path.join(root, n), path) for n in dirs + names)
    return out


def invoke(case: C, t: str, tmp: str, monkeypatch, capsys) -> tuple[object, str, str]:
    from finetune import cli
    from finetune.config import FIELDS, env_name

    for name in FIELDS:
        monkeypatch.delenv(env_name(name), raising=False)
    for key, value in {**case.env, "TMPDIR": tmp}.items():
        monkeypatch.setenv(key, value.format(t=t))
    monkeypatch.setattr(tempfile, "tempdir", None)
    if case.patch:
        case.patch(monkeypatch, t)
    monkeypatch.chdir(t)

    def hung(*_):
        raise TimeoutError(f"still running after {HANG_S} s: it hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        rc = cli.main([a.format(t=t) for a in case.argv])
    except SystemExit as exc:
        rc = exc.code
    except BaseException:  # noqa: BLE001 -- a traceback is exactly what this suite exists to catch
        rc = "traceback:\n" + traceback.format_exc()[-3000:]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}-{c.id}" for c in CASES])
def test_hostile_input(case: C, tmp_path, monkeypatch, capsys, tiny_model):
    t, tmp = str(tmp_path / "case"), str(tmp_path / "tmp")
    os.makedirs(t)
    os.makedirs(tmp)
    data(t)
    if case.setup:
        case.setup(t)
    before = tree(t)
    rc, out, err = invoke(case, t, tmp, monkeypatch, capsys)
    assert rc == case.rc, f"exit {rc!r}, expected {case.rc}\nstdout: {out[-1500:]}\nstderr: {err[-1500:]}"
    assert "Traceback" not in out + err
    if case.rc == 2:
        errors = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("error ")] if case.report else \
            [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, err
        assert case.needle.lower() in errors[0].lower(), errors[0]
        assert len(errors[0]) < 600, "an error line is a line, not a dump"
    else:
        assert case.needle.lower() in (out + err).lower(), out + err
    after = {p for p in tree(t) if not (case.keeps_run and (p == "run" or p.startswith("run/")))}
    assert after == before, f"left behind: {sorted(after - before)}; removed: {sorted(before - after)}"
    assert os.listdir(tmp) == [], f"temp files left: {os.listdir(tmp)}"
    problem = case.left(t) if case.left else None
    assert problem is None, problem


def test_resume_from_another_directory_finds_the_run_data_and_refuses_changed_data(tmp_path, monkeypatch, capsys,
                                                                                   tiny_model):
    """DATASET was relative: the run records it absolute, with a fingerprint of its files."""
    import json

    t, elsewhere = str(tmp_path / "case"), str(tmp_path / "elsewhere")
    os.makedirs(elsewhere)
    os.makedirs(t)
    data(t)
    env = {**TINY, "DATASET": "d.jsonl", "OUTPUT_DIR": "run", "MAX_STEPS": "2", "EVAL_GENERATIONS": "0", "EVAL_ROWS": "2"}
    rc, out, err = invoke(C("x", "x", ["train"], env=env), t, str(tmp_path), monkeypatch, capsys)
    assert rc == 0, err
    record_path = os.path.join(t, "run", "run.json")
    record = json.load(open(record_path))
    assert record["config"]["dataset"] == os.path.join(t, "d.jsonl") and len(record["data"]["fingerprint"]) == 64
    record["status"] = "interrupted"  # as if stopped in its last step
    json.dump(record, open(record_path, "w"))
    with open(os.path.join(t, "d.jsonl"), "a") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]}) + "\n")
    resume = C("x", "x", ["train", "--resume", os.path.join(t, "run")], env=TINY)
    rc, out, err = invoke(resume, elsewhere, str(tmp_path), monkeypatch, capsys)
    assert rc == 2 and "changed since the run started" in err and "Traceback" not in err
    assert json.load(open(record_path))["status"] == "interrupted"  # a refusal changes nothing


def test_run_records_are_strict_json_even_with_a_diverged_loss(tmp_path):
    import json

    from finetune import fsio, outputs

    fsio.write_json(str(tmp_path / "r.json"), {"loss": float("nan"), "grad": [float("inf"), 1.0]})
    outputs.write_metrics(str(tmp_path / "m.jsonl"), [{"loss": float("-inf")}])

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert strict((tmp_path / "r.json").read_text()) == {"loss": None, "grad": [None, 1.0]}
    assert strict((tmp_path / "m.jsonl").read_text()) == {"loss": None}


def test_check_data_into_head_ends_quietly(run_env, tiny_model):
    """`check-data | head` closes the pipe early: no BrokenPipe traceback, the shell's SIGPIPE status."""
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "check-data", "sample", "--model", "finetune/tiny-qwen2",
                             "--show", "200"], cwd=ROOT,
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
