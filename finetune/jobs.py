"""`finetune jobs list | status JOB | logs JOB [--follow] | cancel JOB | pull JOB`: watch and control the
training jobs `train --remote hf-jobs` submitted, with the real huggingface_hub Jobs API."""
from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone

from finetune import fsio, hub, remote, runs
from finetune.errors import UserError
from finetune.progress import hms

STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss ([0-9.]+|-)")
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")


def _api():
    from huggingface_hub import HfApi

    return HfApi(token=hub.token())


def _call(action: str, fn, *args, **kwargs):
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) == 404:
            raise UserError(f"{action}: no such job (check the id with `./run.sh jobs list`)") from None
        raise hub.hub_error(err, action) from None
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise hub.hub_error(err, action) from None


def _namespace(api) -> str:
    return _call("checking the token", api.whoami)["name"]


def _price(flavor: str | None) -> float:
    return next((f[4] for f in remote.FALLBACK if f[0] == flavor), 0.0)


def _elapsed(job) -> float:
    if job.started_at is None:
        return 0.0
    end = job.finished_at or datetime.now(timezone.utc)
    return max(0.0, (end - job.started_at).total_seconds())


def last_progress(lines: list[str]) -> str | None:
    for line in reversed(lines):
        m = STEP_LINE.search(line)
        if m:
            return f"step {m.group(1)}/{m.group(2)}, loss {m.group(3)}"
    return None


def list_jobs(args) -> int:
    api = _api()
    ns = _namespace(api)
    found = [j for j in _call("listing jobs", api.list_jobs, namespace=ns) if (j.labels or {}).get("finetune")]
    if not found:
        print("no finetune jobs")
        return 0
    for j in found:
        result = (j.labels or {}).get("finetune-result", "").replace("--", "/")
        created = j.created_at.strftime("%Y-%m-%d %H:%M") if j.created_at else "?"
        print(f"{j.id}  {j.status.stage:<10} {j.flavor or '?':<12} {created}  -> {result}")
    return 0


TIMEOUT_HINT = ("it ran past its timeout (the estimate x 1.5): submit again with a faster --flavor, or fewer "
                "MAX_STEPS / a smaller MODEL")


def _timed_out(job) -> bool:
    return job.status.stage == "ERROR" and "timeout" in (job.status.message or "").lower().replace(" ", "")


def status(args) -> int:
    api = _api()
    ns = _namespace(api)
    job = _call(f"job {args.job}", api.inspect_job, job_id=args.job, namespace=ns)
    elapsed = _elapsed(job)
    lines = list(_call(f"logs of {args.job}", api.fetch_job_logs, job_id=args.job, namespace=ns, tail=200))
    print(f"job {job.id}: {job.status.stage}{' (' + job.status.message + ')' if job.status.message else ''}")
    print(f"  flavor {job.flavor}, elapsed {hms(elapsed)}, cost so far ~${elapsed / 3600 * _price(job.flavor):.2f}")
    print(f"  progress: {last_progress(lines) or 'no training step logged yet'}")
    result = (job.labels or {}).get("finetune-result", "").replace("--", "/")
    if result:
        print(f"  result repo: {result}" + ("  (./run.sh jobs pull " + job.id + ")" if job.status.stage == "COMPLETED" else ""))
    if job.status.stage == "ERROR":
        print("  last log lines:\n" + "\n".join("    " + x for x in lines[-10:]))
        if _timed_out(job):
            print(f"  {TIMEOUT_HINT}")
    return 0


def logs(args) -> int:
    api = _api()
    ns = _namespace(api)
    for line in _call(f"logs of {args.job}", api.fetch_job_logs, job_id=args.job, namespace=ns, follow=args.follow):
        print(line, flush=True)
    return 0


def cancel(args) -> int:
    api = _api()
    ns = _namespace(api)
    _call(f"cancelling {args.job}", api.cancel_job, job_id=args.job, namespace=ns)
    print(f"cancel sent for job {args.job}")
    return 0


def pull(args) -> int:
    """Download the job's pushed run into a local run directory that chat, export and convert accept."""
    from huggingface_hub import snapshot_download

    api = _api()
    ns = _namespace(api)
    job = _call(f"job {args.job}", api.inspect_job, job_id=args.job, namespace=ns)
    stage = job.status.stage
    if stage != "COMPLETED":
        tail = list(_call(f"logs of {args.job}", api.fetch_job_logs, job_id=args.job, namespace=ns, tail=5)) \
            if stage == "ERROR" else []
        hint = f"; last lines: {' | '.join(tail)}" if tail else "; wait for it (./run.sh jobs status " + args.job + ")"
        if _timed_out(job):
            hint = f" ({TIMEOUT_HINT})"
        raise UserError(f"job {args.job} is {stage}, nothing to pull{hint}")
    labels = job.labels or {}
    repo = labels.get("finetune-result", "").replace("--", "/")
    if not repo:
        raise UserError(f"job {args.job} was not started by finetune (no result repo label)")
    out = args.out or os.path.join("outputs", labels.get("finetune-run", args.job))
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out} already exists; choose another --out (runs are never overwritten)")

    def build(tmp: str) -> None:
        _call(f"downloading {repo}", snapshot_download, repo, local_dir=tmp, token=hub.token())
        record = runs.read_record(tmp)
        if record is None or not os.path.isfile(os.path.join(tmp, "adapter_model.safetensors")):
            raise UserError(f"{repo} holds no finished run (run.json + adapter); the job may have failed before pushing")
        record.update(run_dir=os.path.abspath(out), pulled={"job": job.id, "repo": repo, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        fsio.write_json(os.path.join(tmp, "run.json"), record)

    fsio.build_dir(out, build)
    print(f"pulled {repo} into {out}: ./run.sh chat {out}")
    return 0


COMMANDS = {"list": list_jobs, "status": status, "logs": logs, "cancel": cancel, "pull": pull}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="jobs_command", required=True)
    sub.add_parser("list", help="your finetune jobs")
    for name, text in (("status", "stage, elapsed time, cost so far, last step and loss"), ("cancel", "stop a job"),
                       ("pull", "download a finished job's run directory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job")
        if name == "pull":
            p.add_argument("--out", default=None, help="local run directory (default outputs/<run name>)")
    p = sub.add_parser("logs", help="the job's log")
    p.add_argument("job")
    p.add_argument("--follow", action="store_true", help="keep streaming until the job ends")


def main(args) -> int:
    return COMMANDS[args.jobs_command](args)
