"""`finetune push RUN_DIR --repo user/name`: put a run on the Hugging Face Hub, with a model card made from it.

The real `huggingface_hub` client does the talking (HF_ENDPOINT redirects it; tests point it at a local
server). The token comes from HF_TOKEN or `hf auth login`; it is never printed, logged or written: uploads are
staged from an allow-list of files, and run.json is scanned for it before it leaves the machine.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from finetune import export, outputs
from finetune.config import check_repo_id
from finetune.errors import UserError

# Set by the Jobs launcher in the job's environment: the push names it in its commit message, so `jobs pull`
# downloads the commit that job made, not whatever `main` holds by then.
SUBMISSION = "FINETUNE_SUBMISSION"
WHAT = ("adapter", "merged", "gguf")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
                 "run.json", "report.md", "loss.png", "metrics.jsonl")


def token() -> str:
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return found


def hub_error(err: Exception, action: str) -> UserError:
    """A client exception as one line with what to do; never includes the token."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, RepositoryNotFoundError) or status == 401:
        return UserError(f"{action}: the Hub refused the token (401); check HF_TOKEN or run `hf auth login`")
    if status == 403:
        return UserError(f"{action}: the token has no write access there (403); use a write token for that namespace")
    if status == 402:
        detail = _server_message(err)
        return UserError(f"{action}: refused by the Hub (402: {detail}); see https://huggingface.co/settings/billing")
    if isinstance(err, HfHubHTTPError) and status:
        return UserError(f"{action}: the Hub answered {status} ({_server_message(err)})")
    return UserError(f"{action}: the Hub at {endpoint} cannot be reached ({type(err).__name__}); check your "
                     "network or HF_ENDPOINT")


def _server_message(err: Exception) -> str:
    response = getattr(err, "response", None)
    try:
        return str(response.json().get("error", ""))[:200] or str(err).splitlines()[0][:200]
    except Exception:  # noqa: BLE001 -- not JSON: the first line of the client's message
        return str(err).splitlines()[0][:200]


def model_card(record: dict, repo: str, what: str) -> str:
    """README.md: base model, data, settings, the before/after table, and how to load the result."""
    cfg, model = record["config"], record["model"]
    base_id = "HuggingFaceTB/SmolLM2-135M-Instruct" if model.get("source") == "offline" else model["name"]
    evaluation = record.get("evaluation") or {}
    table = ""
    if "after" in evaluation:
        report = outputs.report_text(record, evaluation["before"], evaluation["after"])
        table = report.split("## Before / after (held-out rows)", 1)[1].split("## Use the adapter", 1)[0].strip()
    tags = ["finetune", "lora", cfg["method"]] + (["gguf"] if what == "gguf" else [])
    lines = ["---", f"base_model: {base_id}", "library_name: " + ("peft" if what == "adapter" else "transformers"),
             "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {repo.split('/')[-1]}", "",
             f"A {cfg['method'].upper()} {cfg['lora_type'].upper()} fine-tune of `{base_id}`, trained with "
             f"[finetune](https://github.com/) on `{record['data']['source']}` ({record['data']['train_rows']} rows).",
             "", "## Settings", "",
             f"- {outputs.lora_words(cfg)}, dropout {cfg['lora_dropout']:g}, all linear layers",
             f"- {record['result']['steps'] if record.get('result') else cfg['max_steps']} steps x batch "
             f"{cfg['batch_size']} x accumulation {cfg['grad_accum']}, lr {cfg['learning_rate']:g} "
             f"{outputs.schedule_words(cfg, record.get('result') or {})}",
             f"- {record['plan']['backend']} on {record['plan']['device']}, {record['plan']['dtype']}"]
    if table:
        lines += ["", "## Before / after (held-out rows)", "", table]
    lines += ["", "## Use it", ""]
    system = (record.get("data") or {}).get("system_prompt")
    if system:
        lines += ["Every training row began with this system prompt; send it as the first message:", "", "```text",
                  system, "```", ""]
    if what == "adapter":
        lines += ["PEFT:", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_id!r}), {repo!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({repo!r})", "```", "",
                  "mlx-lm (the `mlx/` folder holds the same adapter in mlx-lm's format):", "", "```bash",
                  f"hf download {repo} --local-dir adapter",
                  f"mlx_lm.generate --model {base_id} --adapter-path adapter/mlx --prompt \"...\"", "```"]
    elif what == "merged":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({repo!r})", "```"]
    lines += ["", "llama.cpp / Ollama: export a GGUF (`./run.sh export RUN_DIR --gguf q4_k_m`), then",
              "`llama-cli -m model.gguf` or `ollama create my-model -f Modelfile.q4_k_m`."]
    return "\n".join(lines) + "\n"


def _stage(run_dir: str, record: dict, repo: str, what: str, secret: str) -> str:
    stage = tempfile.mkdtemp(prefix="finetune-push-")
    try:
        _fill_stage(stage, run_dir, record, repo, what, secret)
    except BaseException:  # a refusal or a failed copy leaves no temp folder behind
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _fill_stage(stage: str, run_dir: str, record: dict, repo: str, what: str, secret: str) -> None:
    if what == "adapter":
        for name in ADAPTER_FILES:
            if os.path.isfile(os.path.join(run_dir, name)):
                shutil.copy2(os.path.join(run_dir, name), stage)
        if os.path.isdir(os.path.join(run_dir, "mlx")):
            shutil.copytree(os.path.join(run_dir, "mlx"), os.path.join(stage, "mlx"))
    elif what == "merged":
        merged = os.path.join(run_dir, "merged")
        if not os.path.isfile(os.path.join(merged, "config.json")):
            export.merge(run_dir, merged)
        shutil.copytree(merged, stage, dirs_exist_ok=True)
    else:
        gguf_dir = os.path.join(run_dir, "gguf")
        files = [f for f in os.listdir(gguf_dir)] if os.path.isdir(gguf_dir) else []
        if not any(f.endswith(".gguf") for f in files):
            raise UserError(f"{run_dir} has no GGUF export yet; run `./run.sh export {run_dir} --gguf q4_k_m` first")
        for f in files:
            if not f.startswith("."):
                shutil.copy2(os.path.join(gguf_dir, f), stage)
    with open(os.path.join(stage, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(model_card(record, repo, what))
    for root_dir, _, names in os.walk(stage):  # the token must not leave the machine inside any file
        for name in names:
            with open(os.path.join(root_dir, name), "rb") as fh:
                if secret.encode() in fh.read():
                    raise UserError(f"refusing to push: {name} contains your Hugging Face token; remove it first")


def push_run(run_dir: str, repo: str, what: str = "adapter", private: bool = False) -> str:
    """Create the repo (if needed) and upload; returns the repo URL."""
    from huggingface_hub import HfApi

    check_repo_id(repo)
    if what not in WHAT:
        raise UserError(f"--what {what!r} is not valid: choose one of {', '.join(WHAT)}")
    record = export.load_run(run_dir)
    secret = token()
    stage = _stage(run_dir, record, repo, what, secret)
    api = HfApi(token=secret)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        mark = os.environ.get(SUBMISSION)
        api.upload_folder(folder_path=stage, repo_id=repo, repo_type="model",
                          commit_message=f"finetune: {what} of {record['run_name']}",
                          commit_description=f"{SUBMISSION}={mark}" if mark else None)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- every client/network error becomes one line
        raise hub_error(err, f"pushing to {repo}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(f"Pushed the {what} of {record['run_name']} to {url}")
    return str(url)
