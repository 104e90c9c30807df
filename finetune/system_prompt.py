"""The system prompt the training rows were written under. A model learns its task under that prompt, so chat,
the Ollama Modelfile, the model card and the report use it by default: without it the chat template adds its own
default (SmolLM2's "You are a helpful AI assistant...") and the adapter answers a question it was not taught."""
from __future__ import annotations


def _messages(item) -> list | None:
    """The messages of one training item of any method: an SFT Example, a DPO pair's chosen row, a KTO row's
    example, a GRPO prompt given as messages."""
    for value in (item, getattr(item, "chosen", None), getattr(item, "example", None)):
        found = getattr(value, "messages", None)
        if isinstance(found, list):
            return found
    prompt = getattr(item, "prompt", None)
    return prompt if isinstance(prompt, list) else None


def shared(items: list) -> tuple[str | None, int]:
    """(the system prompt every item starts with, or None; how many different ones there are, "none" counting as
    one). Plain-text rows have no system prompt."""
    seen: set = set()
    for item in items:
        msgs = _messages(item) or []
        first = msgs[0] if msgs and isinstance(msgs[0], dict) else {}
        seen.add(first.get("content") if first.get("role") == "system" else None)
    if len(seen) == 1:
        return next(iter(seen)), 1
    return None, len(seen)


def line(prompt: str | None, distinct: int) -> str | None:
    """What the run prints about it, or None when the rows have none."""
    if prompt:
        short = prompt if len(prompt) <= 100 else prompt[:97] + "..."
        return f"System prompt: every row has the same one, used by default in chat and the Modelfile: {short!r}"
    if distinct > 1:
        return (f"warning: the rows have {distinct} different system prompts (or some none); chat uses none by "
                "default: pass the one you want with --system")
    return None


def of_record(record: dict) -> str | None:
    return (record.get("data") or {}).get("system_prompt")
