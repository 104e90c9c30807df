"""`finetune chat RUN_DIR`: talk to a trained adapter, streamed, with the run's chat template.

Runs on the backend the run used where this machine has it (PEFT on torch; mlx-lm with the adapter on MLX),
else on torch with the PEFT adapter every run writes. Multi-turn history; /reset starts over, /exit (or
Ctrl-D) leaves. --prompt answers once, for scripts; --base shows the base model's answer beside the adapter's.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import fields, replace

import backends
from finetune import export, hardware, models, system_prompt
from finetune.config import Config
from finetune.errors import UserError
from finetune.plan import Plan


def load_session(run_dir: str, record: dict):
    """(session with the run's adapter, tokenizer) on the best backend this machine has for the run."""
    hw = hardware.detect()
    known = {f.name for f in fields(Config)}
    cfg = Config(**{k: v for k, v in record["config"].items() if k in known})
    plan = Plan(**{k: v for k, v in record["plan"].items() if k in Plan.__dataclass_fields__})
    backend = backends.get(plan.backend) if plan.backend in backends.names() else None
    if backend is None or backend.available(hw):
        backend = backends.get("torch")
    device = backend.device(hw)
    dtype = plan.dtype if not (plan.dtype == "fp16" and device != "cuda") else "fp32"
    quantize = plan.quantize if device in ("cuda", "mlx") else "none"
    plan = replace(plan, backend=backend.name, device=device, dtype=dtype, quantize=quantize, batch_size=1,
                   grad_accum=1, gradient_checkpointing=False, attention="sdpa")
    model, _ = models.resolve(record["model"]["name"], user_named_it=True)
    models.fetch_weights(model)
    tokenizer = models.load_tokenizer(models.ModelInfo.from_dict({**model.to_dict(), "path": run_dir}))
    adapter = f"{run_dir}/mlx" if backend.name == "mlx" else run_dir
    return backend.load(cfg, plan, model, tokenizer, adapter), tokenizer


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"]


def _answer(session, tokenizer, ids: list[int], max_new_tokens: int, temperature: float, out, base: bool) -> str:
    """Stream one answer to `out`; returns its text."""
    shown, tokens = "", []
    with contextlib.closing(session.stream(ids, max_new_tokens, temperature, adapter=not base)) as stream:
        for token in stream:  # closing(): the backend stops generating as soon as we stop reading
            if token == tokenizer.eos_token_id:
                break
            tokens.append(token)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # a multi-byte character is still incomplete
                out.write(text[len(shown):])
                out.flush()
                shown = text
    out.write("\n")
    return tokenizer.decode(tokens, skip_special_tokens=True)


def main(args, stdin=None, out=None) -> int:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    record = export.load_run(args.run_dir)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens}: expected a whole number >= 1")
    session, tokenizer = load_session(args.run_dir, record)
    system = args.system if args.system is not None else system_prompt.of_record(record)  # --system "" drops it
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        ids = _prompt_ids(tokenizer, history)
        if args.base:
            out.write("[base model] ")
            _answer(session, tokenizer, ids, args.max_new_tokens, args.temperature, out, base=True)
            out.write("[with adapter] ")
        reply = _answer(session, tokenizer, ids, args.max_new_tokens, args.temperature, out, base=False)
        history.append({"role": "assistant", "content": reply})

    if args.prompt is not None:
        turn(args.prompt)
        return 0
    out.write(f"Chatting with {record['run_name']} ({record['model']['name']} + adapter). /reset starts over, "
              "/exit leaves.\n")
    if system and args.system is None:
        out.write(f"(system prompt from the training data: {system!r}; --system \"\" drops it)\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            del history[int(bool(system)):]
            out.write("(history cleared)\n")
            continue
        if line.strip():
            turn(line.rstrip("\n"))


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory (see `./run.sh runs`)")
    parser.add_argument("--prompt", default=None, help="answer this once and exit (for scripts)")
    parser.add_argument("--system", default=None, help="system prompt (default: the one every training row had; "
                        "'' for none)")
    parser.add_argument("--base", action="store_true", help="also show the base model's answer, for comparison")
    from finetune.argtypes import at_least

    parser.add_argument("--max-new-tokens", type=at_least(1), default=256, dest="max_new_tokens")
    parser.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0 = greedy (the default)")
