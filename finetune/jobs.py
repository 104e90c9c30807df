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


def _price(flavor: str | None, api) -> float:
    """USD/hour from the live hardware list (the fallback table lacks newer flavors); 0 when not listed."""
    return next((f.usd_per_hour for f in remote.flavors(api)[0] if f.name == flavor), 0.0)


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
    price = _price(job.flavor, api)
    print(f"  flavor {job.flavor} (${price:.2f}/h), elapsed {hms(elapsed)}, cost so far ~${elapsed / 3600 * price:.2f}")
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


def _job_commit(api, repo: str, submission: str) -> str | None:
    """The commit the job pushed (its message names the submission), or None when it pushed nothing."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:  # the job's push creates the repo: none yet means nothing was pushed
        commits = api.list_repo_commits(repo)
    except RepositoryNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001
        raise hub.hub_error(err, f"reading the history of {repo}") from None
    mark = f"{hub.SUBMISSION}={submission}"
    return next((c.commit_id for c in commits if mark in f"{c.title}\n{c.message}"), None)


def pull(args) -> int:
    """Download what the job pushed (its own commit) into a local run directory that chat, export and convert
    accept. A cancelled or failed job: whatever it pushed before it stopped, marked partial, and exit 2."""
    from huggingface_hub import snapshot_download

    api = _api()
    ns = _namespace(api)
    job = _call(f"job {args.job}", api.inspect_job, job_id=args.job, namespace=ns)
    stage, labels = job.status.stage, job.labels or {}
    if stage not in TERMINAL:
        raise UserError(f"job {args.job} is {stage}, nothing to pull yet; wait for it "
                        f"(./run.sh jobs status {args.job})")
    repo = labels.get("finetune-result", "").replace("--", "/")
    if not repo:
        raise UserError(f"job {args.job} was not started by finetune (no result repo label)")
    # Jobs submitted before the submission label existed can only be pulled from main.
    revision = _job_commit(api, repo, labels["finetune-submission"]) if "finetune-submission" in labels else "main"
    stopped = stage != "COMPLETED"
    if revision is None or (stopped and revision == "main"):
        hint = ""
        if stopped:
            tail = list(_call(f"logs of {args.job}", api.fetch_job_logs, job_id=args.job, namespace=ns, tail=5)) \
                if stage == "ERROR" else []
            hint = f" ({TIMEOUT_HINT})" if _timed_out(job) else f"; last lines: {' | '.join(tail)}" if tail else ""
        raise UserError(f"job {args.job} is {stage}, nothing to pull: it pushed nothing to {repo}{hint}")
    out = args.out or os.path.join("outputs", labels.get("finetune-run", args.job))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} already exists; choose another --out (runs are never overwritten)")

    def build(tmp: str) -> None:
        _call(f"downloading {repo}", snapshot_download, repo, revision=revision, local_dir=tmp, token=hub.token())
        record = runs.read_record(tmp)
        if not stopped and (record is None or not os.path.isfile(os.path.join(tmp, "adapter_model.safetensors"))):
            raise UserError(f"{repo} holds no finished run (run.json + adapter) at the job's commit {revision[:12]}")
        if record is not None:
            record.update(run_dir=os.path.abspath(out), pulled={
                "job": job.id, "repo": repo, "revision": revision, "stage": stage, "partial": stopped,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            fsio.write_json(os.path.join(tmp, "run.json"), record)

    fsio.build_dir(out, build)
    if stopped:
        raise UserError(f"job {args.job} is {stage}: pulled only what it pushed before it stopped (partial) into {out}")
    where = f"the job's commit {revision[:12]}" if revision != "main" else "main (an older job: no commit recorded)"
    print(f"pulled {repo} at {where} into {out}: ./run.sh chat {out}")
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
