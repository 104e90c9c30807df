"""In-memory stand-in for the Hugging Face Hub HTTP API, for tests that drive the REAL
`huggingface_hub` 2.4.0 client without network. Standard library only.

    with HubServer() as hub:                       # tokens default to DEFAULT_TOKENS
        api = HfApi(endpoint=hub.url, token="hf_write")
        api.create_repo("alice/m", private=True)
        api.upload_folder(folder_path=d, repo_id="alice/m")
        assert hub.files("alice/m")["config.json"] == b"{}"

Pointing the client here (huggingface_hub.constants.ENDPOINT is read once, at import):
- Subprocess / CLI: env HF_ENDPOINT=hub.url, HF_HOME=<tmp> (no stray ~/.cache token or cache),
  HF_TOKEN=<token> (unset = no Authorization header), HF_HUB_DISABLE_TELEMETRY=1 (else the first
  request also fetches /api/agent-harnesses, answered anyway); HF_HUB_OFFLINE and
  HUGGINGFACE_CO_STAGING unset; with an HTTP(S)_PROXY set, put 127.0.0.1 in NO_PROXY.
- In-process: HfApi(endpoint=hub.url, token=...) covers most calls, except HfApi.list_jobs()
  without namespace= (uses the module-level whoami) and create_repo(exist_ok=True) answered
  401/402/403 (builds RepoUrl without endpoint -> HfUriError). Module-level functions
  (huggingface_hub.whoami, snapshot_download, ...) need this patch as well:
      monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
      monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                          hub.url + "/{repo_id}/resolve/{revision}/{filename}")
      monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.url)
No Xet / LFS: the *server* picks each file's upload mode and answers "regular" for all (.safetensors
and .gguf too), so content comes base64 in the NDJSON commit; downloads carry no X-Xet-Hash.
HF_HUB_DISABLE_XET=1 is optional (with hf_xet installed upload_folder takes its streamed pipeline,
which still only sends preupload + commit). run_uv_job with a LOCAL script first uploads it to a
bucket (/api/buckets, Xet): unsupported here (404); give it a URL or command, or use run_job.
Refusals follow the Hub's status codes and error headers (texts are approximations): unknown token
-> 401 HfHubHTTPError; no token on a repo -> 401 + X-Error-Code RepoNotFound (RepositoryNotFoundError);
read token / foreign namespace on writes -> 403 HfHubHTTPError; unknown job -> 404 JobNotFoundError;
token without Jobs access -> 402 HfHubHTTPError.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
# Per token: name, role ("write"|"read"), orgs (namespaces it may write to), and
# "jobs": True (default) | False (refused: 402 + NO_JOBS_MESSAGE) | (status, message).
DEFAULT_TOKENS = {
    "hf_write": {"name": "alice", "role": "write", "orgs": []},
    "hf_read": {"name": "alice", "role": "read", "orgs": []},
    "hf_nojobs": {"name": "bob", "role": "write", "orgs": [], "jobs": False},
}
NO_JOBS_MESSAGE = ("Jobs require pre-paid credits: add credits or subscribe to PRO (users) / Team or "
                   "Enterprise (organizations) at https://huggingface.co/settings/billing")
NO_AUTH = "Invalid username or password."
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def _hw(name, pretty, cpu, ram, usd_per_hour, gpu=None, vram=None):
    """One flavor shaped like JobHardwareInfo (all accelerator keys are required when present)."""
    micro = round(usd_per_hour * 1e6 / 60)
    acc = gpu and {"type": "gpu", "model": gpu, "quantity": "1", "vram": vram, "manufacturer": "Nvidia"}
    return {"name": name, "prettyName": pretty, "cpu": cpu, "ram": ram, "ephemeralStorage": "50 GB",
            "accelerator": acc, "unitCostMicroUSD": micro, "unitCostUSD": micro / 1e6, "unitLabel": "minute"}


HARDWARE = [_hw("cpu-basic", "CPU Basic", "2 vCPU", "16 GB", 0.01),
            _hw("cpu-upgrade", "CPU Upgrade", "8 vCPU", "32 GB", 0.03),
            _hw("t4-small", "Nvidia T4 - small", "4 vCPU", "15 GB", 0.40, "T4", "16 GB"),
            _hw("a10g-small", "Nvidia A10G - small", "4 vCPU", "15 GB", 1.00, "A10G", "24 GB"),
            _hw("a10g-large", "Nvidia A10G - large", "12 vCPU", "46 GB", 1.50, "A10G", "24 GB"),
            _hw("a100-large", "Nvidia A100 - large", "12 vCPU", "142 GB", 2.50, "A100", "80 GB")]


def _iso(ts: float | None = None) -> str:  # the client's parse_datetime wants 'YYYY-MM-DDTHH:MM:SS.fffZ'
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _id(text: str) -> str:  # stable 24-hex ids, like the Hub's
    return hashlib.md5(text.encode()).hexdigest()[:24]


def git_sha1(data: bytes) -> str:  # the oid the client compares with its local file to skip unchanged ones
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """Answered as {"error": message, **extra} + X-Error-Message / X-Error-Code, which
    hf_raise_for_status() maps to RepositoryNotFoundError, RevisionNotFoundError, ..."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra


class HubServer:
    def __init__(self, tokens: dict | None = None, *, log_hold_s: float | None = None, hardware=None):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        # None: a logs stream stays open until the job is terminal (like the Hub): follow=True ends as
        # soon as the job does, follow=False on a live job returns after the client's 5 s read timeout.
        # A number closes streams sooner, but then follow=True polls (2-10 s sleeps) and loses lines
        # logged between its last read and the job's end (it stops once it sees a terminal stage).
        self.log_hold_s = log_hold_s
        self.hardware = HARDWARE if hardware is None else hardware
        self.requests: list[dict] = []  # {method, path, query, headers (lower-case keys), body}
        self.repos: dict[tuple[str, str], dict] = {}  # ("model"|"dataset", "ns/name") -> repo
        self.jobs: dict[str, dict] = {}  # id -> job, job["spec"] is the POST body as sent
        self.url = ""
        self._cond = threading.Condition(threading.RLock())  # guards state, wakes log streams
        self._callbacks: list = []
        self._stopping = False
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads, self._httpd.hub = True, self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- helpers for tests -------------------------------------------------------------------
    def calls(self, method: str | None = None, path: str | None = None) -> list[dict]:
        """Recorded requests, filtered by method and by a substring of the path."""
        return [r for r in self.requests
                if (method is None or r["method"] == method) and (path is None or path in r["path"])]

    def add_repo(self, repo_id: str, files: dict | None = None, *, repo_type: str = "model",
                 private: bool = False) -> str:
        """Create (or replace) a repo with `files` (path -> bytes|str); returns the head commit sha.
        Like the Hub, a new repo starts with a commit holding .gitattributes."""
        with self._cond:
            key = (repo_type, repo_id)
            self.repos[key] = {"id": repo_id, "private": private, "createdAt": _iso(), "commits": []}
            oid = self._commit(key, {".gitattributes": GITATTRIBUTES}, "initial commit")
            files = {k: v.encode() if isinstance(v, str) else v for k, v in (files or {}).items()}
            return self._commit(key, files, "Upload files") if files else oid

    def add_commit(self, repo_id: str, files: dict, title: str = "Upload files", *, repo_type: str = "model") -> str:
        """Another commit on main of an existing repo (someone's later push); returns its sha."""
        with self._cond:
            return self._commit((repo_type, repo_id), {k: v.encode() if isinstance(v, str) else v
                                                       for k, v in files.items()}, title)

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.repos[(repo_type, repo_id)]["commits"][-1]["files"])

    def commits(self, repo_id: str, repo_type: str = "model") -> list[dict]:
        """Oldest first: {oid, title, description, date, files (full snapshot)}."""
        return self.repos[(repo_type, repo_id)]["commits"]

    def on_job_created(self, callback) -> None:
        """callback(job) runs in the POST handler before the answer is built (a set_job_stage() in it
        shows in run_job's JobInfo) and without the lock held. Start a thread for long work."""
        self._callbacks.append(callback)

    def set_job_stage(self, job_id: str, stage: str, message: str | None = None) -> None:
        with self._cond:
            job = self.jobs[job_id]
            job["stage"], job["message"] = stage, message
            if stage == "RUNNING" and not job["startedAt"]:
                job["startedAt"] = _iso()  # the Hub's stream opens with this banner; the client drops it
                job["logs"].append((_iso(), f"===== Job started at {job['startedAt']} ====="))
            if stage in TERMINAL and not job["finishedAt"]:
                job["finishedAt"] = _iso()
            self._cond.notify_all()

    def add_job_log(self, job_id: str, line: str) -> None:
        with self._cond:
            self.jobs[job_id]["logs"].append((_iso(), line))
            self._cond.notify_all()

    # ---- internals ---------------------------------------------------------------------------
    def _commit(self, key, add: dict, title: str, delete=(), description: str = "") -> str:
        commits = self.repos[key]["commits"]
        files = {p: b for p, b in (commits[-1]["files"] if commits else {}).items() if p not in delete}
        files.update(add)
        oid = secrets.token_hex(20)
        commits.append({"oid": oid, "title": title, "description": description, "date": _iso(), "files": files})
        return oid

    def _user(self, headers) -> dict | None:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        if auth[7:] not in self.tokens:  # this message keeps it a plain 401 HfHubHTTPError client-side
            raise HubError(401, "Invalid credentials in Authorization header")
        return {"token": auth[7:], **self.tokens[auth[7:]]}

    @staticmethod
    def _owns(user: dict | None, ns: str) -> bool:
        return user is not None and (ns == user["name"] or ns in user.get("orgs", []))

    def _repo(self, user, kind: str, repo_id: str, write: bool = False) -> dict:
        repo, ns = self.repos.get((kind, repo_id)), repo_id.split("/")[0]
        if repo is None or (repo["private"] and not self._owns(user, ns)) or (write and user is None):
            if user is None:  # the Hub hides private/missing repos: 401 anonymous, 404 authenticated
                raise HubError(401, NO_AUTH, "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        if write and user["role"] != "write":
            raise HubError(403, f"You don't have the rights to write to {repo_id}: this token is read-only")
        if write and not self._owns(user, ns):
            raise HubError(403, "pass `create_pr=1` as a query parameter to create a Pull Request")
        return repo

    @staticmethod
    def _rev(repo: dict, rev: str) -> dict:  # only "main" and commit shas exist here
        for commit in reversed(repo["commits"]):
            if rev in ("main", commit["oid"]):
                return commit
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _job(self, user, ns: str, job_id: str, write: bool = False) -> dict:
        if user is None:
            raise HubError(401, NO_AUTH)
        job = self.jobs.get(job_id)
        if job is None or job["namespace"] != ns or not self._owns(user, ns):
            raise HubError(404, "Job not found")  # a 404 under /api/jobs/ becomes JobNotFoundError
        if write and user["role"] != "write":
            raise HubError(403, "You need a write token to manage jobs")
        return job

    def _job_json(self, job: dict) -> dict:  # the fields JobInfo(**kwargs) reads
        spec = job["spec"]
        out = {"id": job["id"], "createdAt": job["createdAt"], "startedAt": job["startedAt"],
               "finishedAt": job["finishedAt"], "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"),
               "command": spec.get("command"), "arguments": spec.get("arguments", []),
               "environment": spec.get("environment", {}), "flavor": spec.get("flavor"),
               "secrets": {k: None for k in spec.get("secrets") or {}},  # names only, values stay secret
               "status": {"stage": job["stage"], "message": job["message"]},
               "owner": job["owner"], "initiator": {"type": "user", **job["owner"]},
               "durations": {"totalSecs": int(time.time() - job["t0"])}}
        out.update({k: spec[k] for k in ("labels", "volumes", "expose", "network", "timeoutSeconds") if k in spec})
        return out

    def _dispatch(self, h, method: str, path: str, query: dict, body):
        for verbs, pattern, fn in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method in verbs.split("|"):
                user = self._user(h.headers)
                groups = [unquote(g) if g else g for g in m.groups()]  # revision arrives quote(safe="")d
                # Log streams block, and job creation runs test callbacks that may call the server:
                # both take the lock in short sections themselves.
                unlocked = fn in (HubServer._logs, HubServer._jobs_ns)
                with contextlib.nullcontext() if unlocked else self._cond:
                    return fn(self, h, groups, query, body, user)
        raise HubError(404, f"Mock Hub: no route for {method} {path}")

    # ---- endpoints: fn(self, handler, url groups, query, body, user) -> json | (status, bytes, headers)
    def _whoami(self, h, g, q, body, user):
        if user is None:
            raise HubError(401, NO_AUTH)
        paying = user.get("jobs", True) is True
        return {"type": "user", "id": _id(user["name"]), "name": user["name"], "fullname": user["name"].title(),
                "email": f"{user['name']}@example.com", "emailVerified": True, "isPro": paying, "canPay": paying,
                "orgs": [{"type": "org", "name": o, "id": _id(o), "roleInOrg": "write"} for o in user.get("orgs", [])],
                "auth": {"type": "access_token", "accessToken": {
                    "displayName": user["token"], "role": user["role"], "createdAt": _iso(0)}}}

    def _create_repo(self, h, g, q, body, user):
        if user is None:
            raise HubError(401, NO_AUTH)
        kind, ns = body.get("type") or "model", body.get("organization") or user["name"]
        if user["role"] != "write" or not self._owns(user, ns):
            raise HubError(403, f'You don\'t have the rights to create a {kind} under the namespace "{ns}"')
        repo_id = f"{ns}/{body['name']}"
        url = f"{self.url}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        if (kind, repo_id) in self.repos:  # create_repo(exist_ok=True) swallows this 409 but reads "url"
            raise HubError(409, f"You already created this {kind} repo", url=url)
        self.add_repo(repo_id, repo_type=kind, private=body.get("visibility") == "private")
        return {"url": url, "name": repo_id, "id": _id(repo_id)}

    def _info(self, h, g, q, body, user):  # model_info / dataset_info / repo_exists / snapshot_download
        repo = self._repo(user, g[0][:-1], g[1])
        commit = self._rev(repo, g[2] or "main")
        return {"id": repo["id"], "author": repo["id"].split("/")[0], "sha": commit["oid"],
                "private": repo["private"], "gated": False, "disabled": False, "lastModified": commit["date"],
                "createdAt": repo["createdAt"], "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(commit["files"].items())]}

    def _tree(self, h, g, q, body, user):  # list_repo_tree / list_repo_files / snapshot_download
        commit = self._rev(self._repo(user, g[0][:-1], g[1]), g[2])
        recursive = q.get("recursive", ["false"])[0].lower() == "true"
        prefix = g[3].strip("/") + "/" if g[3] else ""
        out: dict[str, dict] = {}
        for path, data in sorted(commit["files"].items()):
            if path.startswith(prefix):
                parts = path[len(prefix):].split("/")
                for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                    d = prefix + "/".join(parts[:i])
                    out[d] = {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                if recursive or len(parts) == 1:
                    out[path] = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": path}
        if prefix and not out:
            raise HubError(404, f"{g[3]} does not exist on {g[2]}", "EntryNotFound")
        return list(out.values())  # a single page: no Link header, so the client stops paginating

    def _commits(self, h, g, q, body, user):  # list_repo_commits: newest first, one page
        repo = self._repo(user, g[0][:-1], g[1])
        self._rev(repo, g[2])
        return [{"id": c["oid"], "title": c["title"], "message": c["description"], "date": c["date"],
                 "authors": [{"user": repo["id"].split("/")[0]}]} for c in reversed(repo["commits"])]

    def _preupload(self, h, g, q, body, user):
        head = self._rev(self._repo(user, g[0][:-1], g[1], write=True), g[2])
        # "regular" for every file keeps LFS and Xet out of the picture; "oid" lets the client drop
        # unchanged files from the commit, as on the Hub.
        return {"commitOid": head["oid"], "files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_sha1(head["files"][f["path"]]) if f["path"] in head["files"] else None}
            for f in body.get("files", [])]}

    def _commit_api(self, h, g, q, body, user):  # NDJSON: header, file, deletedFile, deletedFolder
        kind, repo_id = g[0][:-1], g[1]
        head = self._rev(self._repo(user, kind, repo_id, write=True), g[2])
        if "create_pr" in q:
            raise HubError(400, "Mock Hub: create_pr is not supported")
        add, delete, header = {}, set(), {}
        for op in body:
            key, value = op["key"], op["value"]
            if key == "header":
                header = value
            elif key == "file":
                raw = value["content"]
                add[value["path"]] = base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
            elif key == "deletedFile":
                if value["path"] not in head["files"]:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                delete.add(value["path"])
            elif key == "deletedFolder":
                delete |= {p for p in head["files"] if p.startswith(value["path"].rstrip("/") + "/")}
            else:  # "lfsFile" cannot come: preupload never answers "lfs"
                raise HubError(400, f"Mock Hub: unsupported commit operation {key!r}")
        if header.get("parentCommit") not in (None, head["oid"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        oid = self._commit((kind, repo_id), add, header.get("summary", ""), delete, header.get("description", ""))
        url = f"{self.url}/{'' if kind == 'model' else kind + 's/'}{repo_id}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None}

    def _resolve(self, h, g, q, body, user):  # HEAD (metadata) then GET, for hf_hub_download
        commit = self._rev(self._repo(user, (g[0] or "models")[:-1], g[1]), g[2])
        if g[3] not in commit["files"]:  # X-Repo-Commit lets the client cache the miss (.no_exist)
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit["oid"]})
        data = commit["files"][g[3]]
        headers = {"X-Repo-Commit": commit["oid"], "ETag": f'"{git_sha1(data)}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        if m:  # the client resumes interrupted downloads with a Range request
            start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, data[start:end + 1], headers
        return 200, data, headers

    def _jobs_ns(self, h, g, q, body, user):  # GET: list_jobs, POST: run_job / run_uv_job
        if user is None:
            raise HubError(401, NO_AUTH)
        if not self._owns(user, g[0]):
            raise HubError(403, f"You don't have access to jobs in namespace {g[0]}")
        if h.command == "GET":
            stages, labels = q.get("stage", []), [x.split("=", 1) for x in q.get("label", [])]
            with self._cond:
                return [self._job_json(j) for j in self.jobs.values() if j["namespace"] == g[0]
                        and (not stages or j["stage"] in stages)
                        and all((j["spec"].get("labels") or {}).get(k) == v for k, v in labels)]
        if user["role"] != "write":
            raise HubError(403, "You need a write token to run jobs")
        if (refusal := user.get("jobs", True)) is not True:
            raise HubError(*((402, NO_JOBS_MESSAGE) if refusal is False else refusal))
        job = {"id": secrets.token_hex(12), "namespace": g[0], "spec": body, "token": user["token"],
               "stage": "SCHEDULING", "message": None, "createdAt": _iso(), "startedAt": None,
               "finishedAt": None, "t0": time.time(), "logs": [],
               "owner": {"id": _id(g[0]), "name": g[0], "type": "user" if g[0] == user["name"] else "org"}}
        with self._cond:
            self.jobs[job["id"]] = job
        for callback in self._callbacks:
            callback(job)
        with self._cond:
            return self._job_json(job)

    def _cancel(self, h, g, q, body, user):
        job = self._job(user, g[0], g[1], write=True)
        if job["stage"] not in TERMINAL:
            self.set_job_stage(job["id"], "CANCELED")
        return self._job_json(job)

    def _logs(self, h, g, q, body, user):  # server-sent events, parsed by HfApi._stream_sse_events
        with self._cond:
            job = self._job(user, g[0], g[1])
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()  # HTTP/1.0 without Content-Length: closing the socket ends the stream
        i = max(0, len(job["logs"]) - int(q["tail"][0])) if "tail" in q else 0
        deadline = None if self.log_hold_s is None else time.monotonic() + self.log_hold_s

        def finished():
            return job["stage"] in TERMINAL or self._stopping or (deadline and time.monotonic() >= deadline)
        while True:
            with self._cond:
                while i == len(job["logs"]) and not finished():
                    self._cond.wait(0.2)
                new, i, done = job["logs"][i:], len(job["logs"]), finished()  # every line goes out first
            try:  # the client only reads lines starting with 'data: {'
                for ts, line in new:
                    h.wfile.write(f"data: {json.dumps({'data': line, 'timestamp': ts})}\n\n".encode())
                h.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # follow=False readers hang up after 5 s
                return None
            if done:
                return None


_REPO = r"/api/(models|datasets)/([^/]+/[^/]+)"
_ROUTES = [  # (methods, regex on the raw path, endpoint)
    ("GET", r"/api/whoami-v2", HubServer._whoami),
    ("POST", r"/api/repos/create", HubServer._create_repo),
    ("POST", r"/api/validate-yaml", lambda *a: {"errors": [], "warnings": []}),  # commits touching README.md
    ("GET", r"/api/agent-harnesses", lambda *a: {"standardEnvVars": [], "harnesses": {}}),  # user-agent probe
    ("GET", _REPO + r"(?:/revision/([^/]+))?", HubServer._info),
    ("GET", _REPO + r"/tree/([^/]+)(?:/(.+))?", HubServer._tree),
    ("GET", _REPO + r"/commits/([^/]+)", HubServer._commits),
    ("POST", _REPO + r"/preupload/([^/]+)", HubServer._preupload),
    ("POST", _REPO + r"/commit/([^/]+)", HubServer._commit_api),
    ("GET", r"/api/jobs/hardware", lambda self, *a: self.hardware),
    ("GET|POST", r"/api/jobs/([^/]+)", HubServer._jobs_ns),
    ("GET", r"/api/jobs/([^/]+)/([^/]+)", lambda self, h, g, q, b, u: self._job_json(self._job(u, *g))),
    ("POST", r"/api/jobs/([^/]+)/([^/]+)/cancel", HubServer._cancel),
    ("GET", r"/api/jobs/([^/]+)/([^/]+)/logs", HubServer._logs),
    ("GET|HEAD", r"/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", HubServer._resolve),
]


class _Handler(BaseHTTPRequestHandler):
    server_version = "HubMock/1.0"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        hub: HubServer = self.server.hub
        method, parts = self.command, urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype, body = self.headers.get("Content-Type", ""), raw
        if "ndjson" in ctype:
            body = [json.loads(line) for line in raw.splitlines() if line.strip()]
        elif "json" in ctype and raw:
            body = json.loads(raw)
        hub.requests.append({"method": method, "path": parts.path, "query": query, "body": body,
                             "headers": {k.lower(): v for k, v in self.headers.items()}})
        try:
            result = hub._dispatch(self, method, parts.path, query, body)
        except HubError as e:
            headers = {"X-Error-Message": e.message, **({"X-Error-Code": e.code} if e.code else {}), **e.headers}
            result = (e.status, {"error": e.message, **e.extra}, headers)
        if result is None:  # a streamed answer was already written
            return
        status, payload, headers = result if isinstance(result, tuple) else (200, result, {})
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))  # HEAD too: it is the file size there
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET
