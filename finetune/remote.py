"""Hugging Face Jobs as a launcher (not a backend): plan and price per flavor, submit this same toolkit, watch
it, pull the result back as a run directory.

The planner is pure over a Hardware value, so a Jobs flavor is just another Hardware: the same `plan.make`
that plans for this machine plans for each flavor (VRAM, bf16 support, speed class), and the estimate times
the flavor's price is the cost. A submitted job downloads the local checkout's own files (uploaded with the
data to a private dataset repo, pinned by commit), runs `./run.sh train` there with the settings you set, and
pushes the run directory to a private model repo named from code + data + settings; `jobs pull` downloads the
commit that job made. HF_TOKEN goes to the job only as a secret: never in its command, its environment,
run.json, logs or the uploaded files.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import shlex
import sys
from dataclasses import dataclass

from finetune import hardware, hub
from finetune import plan as planner
from finetune.config import check_repo_id
from finetune.errors import UserError
from finetune.progress import hms

IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"   # what `hf jobs uv run` uses: Python 3.12, pip, bash
SETUP_SECONDS = 15 * 60      # image pull + venv + CUDA torch download + model download, before step 1
TIMEOUT_MARGIN = 1.5         # the job's timeout = (setup + estimate) x this
CODE_FILES = ("run.sh", "setup_environment.sh", "requirements.txt", "requirements-unsloth.txt", "pyproject.toml",
              "README.md")
CODE_DIRS = ("finetune", "backends")
# GPU flavors with prices from the Jobs docs, 2026-11: used when the hardware endpoint cannot be reached.
# (name, GPU, VRAM GB per GPU, compute capability, USD/hour for the whole flavor, GPUs). A multi-GPU flavor runs
# the job with NPROC = its GPUs (torchrun, finetune/launch.py): data-parallel, so it fits what one of its GPUs
# fits and finishes sooner; auto picks one when it is the cheapest within REMOTE_MAX_HOURS.
FALLBACK = (("t4-small", "T4", 16, "7.5", 0.40, 1), ("t4-medium", "T4", 16, "7.5", 0.60, 1),
            ("l4x1", "L4", 24, "8.9", 0.80, 1), ("l4x4", "L4", 24, "8.9", 3.80, 4),
            ("a10g-small", "A10G", 24, "8.6", 1.00, 1), ("a10g-large", "A10G", 24, "8.6", 1.50, 1),
            ("a10g-largex2", "A10G", 24, "8.6", 3.00, 2), ("a10g-largex4", "A10G", 24, "8.6", 5.00, 4),
            ("l40sx1", "L40S", 48, "8.9", 1.80, 1), ("a100-large", "A100", 80, "8.0", 2.50, 1),
            ("a100x4", "A100", 80, "8.0", 10.00, 4), ("a100x8", "A100", 80, "8.0", 20.00, 8),
            ("h200", "H200", 141, "9.0", 5.00, 1), ("h200x2", "H200", 141, "9.0", 10.00, 2),
            ("h200x4", "H200", 141, "9.0", 20.00, 4), ("h200x8", "H200", 141, "9.0", 40.00, 8))
# Compute capability by GPU model (NVIDIA's CUDA GPU list), matched on the live entry's name with spaces and
# case ignored, longest key first ("L40S" before "L4", "A100" before "A10"): the live list gains GPUs before
# the fallback table does. A name matching none is planned as UNKNOWN_CAPABILITY: no bf16, so never a dtype the
# GPU might lack, and the table says so.
CAPABILITY = {"T4": "7.5", "V100": "7.0", "A10G": "8.6", "A10": "8.6", "A40": "8.6", "A6000": "8.6", "A30": "8.0",
              "A100": "8.0", "A800": "8.0", "L4": "8.9", "L40": "8.9", "L40S": "8.9", "RTX6000ADA": "8.9",
              "4090": "8.9", "H100": "9.0", "H800": "9.0", "H200": "9.0", "GH200": "9.0", "B100": "10.0",
              "B200": "10.0", "GB200": "10.0", "B300": "10.3", "RTXPRO6000": "12.0", "5090": "12.0"}
UNKNOWN_CAPABILITY = "7.0"


def _squash(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(name).upper()).removeprefix("NVIDIA")


def capability(gpu: str) -> str | None:
    """The compute capability of a GPU model name as the Jobs API writes it, or None when unknown."""
    name = _squash(gpu)
    return next((CAPABILITY[k] for k in sorted(CAPABILITY, key=len, reverse=True) if _squash(k) in name), None)


@dataclass
class Flavor:
    name: str
    gpu: str
    vram_gb: float
    capability: str
    usd_per_hour: float
    ram_gb: float = 46.0
    known: bool = True   # False: the GPU name is not in CAPABILITY (planned as UNKNOWN_CAPABILITY)
    gpus: int = 1        # vram_gb is per GPU

    def hardware(self) -> hardware.Hardware:
        cc = float(self.capability)
        device = hardware.CudaDevice(f"NVIDIA {self.gpu}", self.vram_gb, self.capability, cc >= 8.0)
        return hardware.Hardware(os="Linux", arch="x86_64", chip=f"HF Jobs {self.name}", ram_total_gb=self.ram_gb,
                                 ram_available_gb=self.ram_gb, swap_total_gb=0, disk_free_gb=50, cpu_cores=8,
                                 cuda_devices=[device] * self.gpus, packages={"torch": "cuda", "bitsandbytes": "yes"})

    @property
    def gpu_text(self) -> str:
        return self.gpu if self.gpus == 1 else f"{self.gpus}x {self.gpu}"


def _fallback() -> list[Flavor]:
    return [Flavor(name, gpu, vram, cc, usd, gpus=n) for name, gpu, vram, cc, usd, n in FALLBACK]


def _gb(text) -> float:
    try:
        return float(str(text).split()[0])
    except (ValueError, IndexError):
        return 0.0


def flavors(api=None) -> tuple[list[Flavor], str]:
    """GPU flavors with live prices, or the fallback table (and which one was used)."""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        return _fallback(), "fallback table (HF_HUB_OFFLINE is set)"
    try:
        from huggingface_hub import HfApi

        live = (api or HfApi()).list_jobs_hardware()
    except Exception as err:  # noqa: BLE001 -- unreachable or refused: the documented table instead
        return _fallback(), f"fallback table (prices endpoint unreachable: {type(err).__name__})"
    out = []
    for h in live:
        acc = h.accelerator
        if acc is None:  # CPU-only
            continue
        gpus = max(1, int(_gb(getattr(acc, "quantity", 1)) or 1))
        per_hour = h.unit_cost_usd * {"minute": 60, "hour": 1, "second": 3600}.get(h.unit_label, 60)
        gpu, cc = str(acc.model), capability(acc.model)
        # the endpoint gives the flavor's VRAM in all (an x2 A100 says 160 GB): the planner wants one GPU's
        out.append(Flavor(h.name, gpu, _gb(acc.vram) / gpus, cc or UNKNOWN_CAPABILITY, per_hour, _gb(h.ram) or 46.0,
                          known=cc is not None, gpus=gpus))
    return (out or _fallback()), "live prices (Jobs hardware endpoint)"


@dataclass
class Quote:
    flavor: Flavor
    plan: planner.Plan | None
    why_not: str | None

    @property
    def hours(self) -> float:
        return (SETUP_SECONDS + (self.plan.est_seconds if self.plan else 0)) / 3600

    @property
    def cost(self) -> float:
        return self.hours * self.flavor.usd_per_hour


def quote(cfg, model, prepared, items_per_draw, options: list[Flavor]) -> list[Quote]:
    out = []
    for f in options:
        try:
            p = planner.make(cfg, f.hardware(), model, "torch", "cuda", len(prepared.train), prepared.mean_tokens,
                             prepared.longest, prepared.sequences_per_item, items_per_draw, prepared.trained_share,
                             prepared.sampled_per_item, world_size=f.gpus)
            out.append(Quote(f, p, None))
        except UserError as err:
            out.append(Quote(f, None, str(err).split(";")[0]))
    return out


def pick(quotes: list[Quote], requested: str, max_hours: float) -> Quote:
    if requested != "auto":
        found = next((q for q in quotes if q.flavor.name == requested), None)
        if found is None:
            raise UserError(f"FLAVOR={requested!r} is not a GPU Jobs flavor; choose one of auto, "
                            + ", ".join(q.flavor.name for q in quotes))
        if found.plan is None:
            raise UserError(f"FLAVOR={requested}: the run does not fit ({found.why_not})")
        return found
    fitting = [q for q in quotes if q.plan and q.hours <= max_hours]
    if not fitting:
        raise UserError(f"no Jobs flavor fits this run within REMOTE_MAX_HOURS={max_hours:g}; raise it, or lower "
                        "MAX_SEQ_LENGTH / pick a smaller MODEL")
    return min(fitting, key=lambda q: (q.cost, q.hours))


def format_quotes(quotes: list[Quote], chosen: Quote | None, source: str) -> str:
    rows = []  # (mark, flavor, GPU, VRAM, $/h, plan, time, cost): widths come from the content (long GPU names)
    for q in quotes:
        f, p = q.flavor, q.plan
        head = ("*" if chosen and q is chosen else " ", f.name, f.gpu_text, f"{f.vram_gb:.0f}G",
                f"{f.usd_per_hour:.2f}")
        if p is None:
            rows.append(head + (f"does not fit: {q.why_not[:60]}", "", ""))
            continue
        setup = f"b{p.batch_size}x{p.grad_accum}{', ckpt' if p.gradient_checkpointing else ''}, {p.dtype}" \
                f"{', 4-bit' if p.quantize == '4bit' else ''}{', FSDP' if p.fsdp else ''}"
        rows.append(head + (setup, hms(q.hours * 3600), "$%.2f" % q.cost))
    header = ("", "flavor", "GPU", "VRAM/GPU", "$/h", "plan", "time", "cost")
    fits = [r for r in rows if r[6]]
    w = [max(len(r[i]) for r in [header] + (fits if i >= 5 else rows)) for i in range(8)]

    def line(r) -> str:
        text = f"{r[0]:<1} {r[1]:<{w[1]}} {r[2]:<{w[2]}} {r[3]:>{w[3]}} {r[4]:>{w[4]}}  "
        return text + (f"{r[5]:<{w[5]}} {r[6]:>{w[6]}} {r[7]:>{w[7]}}" if r[6] or r is header else r[5])

    lines = [f"HF Jobs flavors ({source}; time includes ~{SETUP_SECONDS // 60} min of setup):", line(header)]
    lines += [line(r) for r in rows]
    for q in quotes:
        if not q.flavor.known:
            lines.append(f"  {q.flavor.name}: GPU {q.flavor.gpu!r} has no known compute capability here; planned "
                         f"conservatively as {UNKNOWN_CAPABILITY} (no bf16)")
    if chosen:
        lines.append(f"auto picks {chosen.flavor.name}: the cheapest that fits (* above)")
    return "\n".join(lines)


# ---------------------------------------------------------------- submit
def _checkout_files(root: str) -> list[str]:
    out = [f for f in CODE_FILES if os.path.isfile(os.path.join(root, f))]
    for d in CODE_DIRS:
        for base, dirs, names in os.walk(os.path.join(root, d)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            out += [os.path.relpath(os.path.join(base, n), root) for n in names if not n.endswith(".pyc")]
    return sorted(out)


def hub_requirement(root: str) -> str:
    """The huggingface_hub pin of requirements.txt: the job fetches with the client version this checkout uses."""
    with open(os.path.join(root, "requirements.txt"), encoding="utf-8") as fh:
        found = next((ln.split("#")[0].strip() for ln in fh if re.match(r"huggingface[_-]hub\b", ln.strip())), "")
    if "==" not in found:
        raise UserError("requirements.txt pins no huggingface_hub==VERSION; the job installs exactly that version")
    return found


def job_script(repo: str, revision: str, dataset: str, adapter: str | None, hub_pin: str) -> str:
    """The job's command: fetch this checkout + data at a pinned revision, run the same toolkit, which pushes."""
    fetch = (f"python -m pip install -q {shlex.quote(hub_pin)} && python -c \"from huggingface_hub import "
             f"snapshot_download; snapshot_download({repo!r}, repo_type='dataset', revision={revision!r}, "
             f"local_dir='/workspace/ft')\"")
    env = f"DATASET={shlex.quote(dataset)}" + (f" ADAPTER={shlex.quote(adapter)}" if adapter else "")
    return (f"set -euo pipefail\n{fetch}\ncd /workspace/ft/code && chmod +x run.sh setup_environment.sh\n"
            f"{env} ./run.sh train\n")


def submit(cfg, sources: dict, record_plan: Quote, model_name: str, settings_env: dict, api=None) -> dict:
    """Upload checkout + data, start the job; returns what `jobs` commands need."""
    from huggingface_hub import HfApi

    from finetune import data as data_mod
    from finetune import methods

    secret = hub.token()
    api = api or HfApi(token=secret)
    try:
        user = api.whoami()["name"]
    except Exception as err:  # noqa: BLE001
        raise hub.hub_error(err, "checking the token") from None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [(os.path.join(root, f), f"code/{f}") for f in _checkout_files(root)]
    method = methods.get(cfg.method)
    spec = method.SAMPLE_DIR if cfg.dataset == "sample" else cfg.dataset
    dataset = cfg.dataset
    if os.path.exists(spec):
        train_src, val_src, _ = data_mod.locate(spec)
        for src in [train_src] + ([val_src] if val_src else []):
            files.append((src, f"data/{os.path.basename(src)}"))
        dataset = "/workspace/ft/data" if val_src or os.path.isdir(spec) else f"/workspace/ft/data/{os.path.basename(train_src)}"
    adapter = None
    if cfg.adapter:
        for name in os.listdir(cfg.adapter):
            if os.path.isfile(os.path.join(cfg.adapter, name)) and name.endswith((".safetensors", ".json", ".jinja")):
                files.append((os.path.join(cfg.adapter, name), f"adapter/{name}"))
        adapter = "/workspace/ft/adapter"
    digest = hashlib.sha256()
    for path, name in files:
        digest.update(name.encode())
        digest.update(open(path, "rb").read())
    for path, name in files:  # the token must not leave the machine inside any file
        if secret.encode() in open(path, "rb").read():
            raise UserError(f"refusing to upload {path}: it contains your Hugging Face token")
    data_repo = f"{user}/finetune-job-{digest.hexdigest()[:10]}"
    # The result repo is named from code + data + what the job runs with (settings, model, flavor; the token is a
    # secret, never a setting), so different settings never share one. The same inputs again reuse it, which
    # is safe: a push adds a commit and deletes nothing, and `jobs pull` downloads the commit its own job made
    # (its push names hub.SUBMISSION in the commit message), so an earlier job's results stay pullable by its id.
    runs_with = {**settings_env, "model": model_name, "flavor": record_plan.flavor.name}
    digest.update(repr(sorted(runs_with.items())).encode())
    run_name = cfg.run_name or f"{model_name.split('/')[-1].lower()}-{cfg.method}-{digest.hexdigest()[:8]}"
    result_repo = check_repo_id(cfg.push_to_hub or f"{user}/{run_name}", "PUSH_TO_HUB")
    submission = secrets.token_hex(8)
    hub_pin = hub_requirement(root)
    from huggingface_hub import CommitOperationAdd

    try:
        api.create_repo(data_repo, repo_type="dataset", private=True, exist_ok=True)
        commit = api.create_commit(data_repo, repo_type="dataset", commit_message="finetune job: code + data",
                                   operations=[CommitOperationAdd(path_in_repo=n, path_or_fileobj=p) for p, n in files])
        env = {**settings_env, "PUSH_TO_HUB": result_repo, "RUN_NAME": run_name, "OUTPUT_DIR": f"/workspace/{run_name}",
               "FLAVOR": "auto", "NPROC": str(record_plan.flavor.gpus),  # several GPUs: the job starts torchrun
               "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", hub.SUBMISSION: submission,
               hardware.EXPECT_CUDA: "1"}  # priced for a GPU: without a usable one the job stops, never trains on CPU
        env.pop("REMOTE", None)
        timeout = int((SETUP_SECONDS + record_plan.plan.est_seconds) * TIMEOUT_MARGIN)
        script = job_script(data_repo, commit.oid, dataset, adapter, hub_pin)
        job = api.run_job(image=IMAGE, command=["bash", "-c", script],
                          env=env, secrets={"HF_TOKEN": secret}, flavor=record_plan.flavor.name, timeout=timeout,
                          labels={"finetune": "1", "finetune-result": result_repo.replace("/", "--"),
                                  "finetune-run": run_name, "finetune-submission": submission})
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise hub.hub_error(err, "submitting the job") from None
    return {"job": job.id, "url": job.url, "result_repo": result_repo, "data_repo": data_repo, "timeout_s": timeout,
            "flavor": record_plan.flavor.name, "run_name": run_name}


def settings_env(cfg, sources: dict) -> dict:
    """The settings you set (not the planner's choices: the job plans for its own GPU), as env vars."""
    from finetune.config import FIELDS, env_name

    skip = {"dataset", "adapter", "output_dir", "run_name", "push_to_hub", "remote", "flavor", "resume", "remote_max_hours",
            "nproc"}
    return {env_name(k): str(getattr(cfg, k)) for k, s in sources.items()
            if s != "default" and k in FIELDS and not FIELDS[k].metadata["cli_only"] and k not in skip
            and getattr(cfg, k) is not None}


def confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError("nothing was submitted: add --yes to submit without asking (stdin is not a terminal)")
    return input(question + " [y/N] ").strip().lower() in ("y", "yes")


def train(cfg, sources: dict) -> int:
    """`train --remote hf-jobs`: the local checks and plan, the per-flavor preview, then (with yes) the job."""
    from finetune import workload

    method, rows, start, model, fallback, tokenizer, prepared = workload.inspect(cfg, sources)
    options, source = flavors()
    quotes = quote(cfg, model, prepared, method.items_per_draw(cfg), options)
    chosen = pick(quotes, cfg.flavor, cfg.remote_max_hours)
    print(f"Data: {rows.source} -> {len(prepared.train)} train items ({rows.shape}), checked here")
    print(format_quotes(quotes, chosen, source))
    if cfg.dry_run:  # the chosen flavor's plan, per GPU (a multi-GPU flavor: per process)
        print(planner.format_plan(chosen.plan).replace("Plan", f"Plan on {chosen.flavor.name}", 1))
    timeout = int((SETUP_SECONDS + chosen.plan.est_seconds) * TIMEOUT_MARGIN)
    print(f"Job: {chosen.flavor.name}, timeout {hms(timeout)} (estimate x {TIMEOUT_MARGIN:g}), "
          f"about ${chosen.cost:.2f}")
    if cfg.dry_run:
        return 0
    if not confirm(f"Submit to HF Jobs on {chosen.flavor.name} (about ${chosen.cost:.2f})?", cfg.yes):
        print("Not submitted.")
        return 0
    job = submit(cfg, sources, chosen, model.name, settings_env(cfg, sources))
    print(f"Submitted job {job['job']} on {job['flavor']}: {job['url']}\n"
          f"  watch: ./run.sh jobs status {job['job']}   ./run.sh jobs logs {job['job']} --follow\n"
          f"  result: pushed to {job['result_repo']}; then ./run.sh jobs pull {job['job']}")
    return 0
