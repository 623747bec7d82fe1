"""Structured jsonl records: what kind a record is, its canonical form, and why one is bad.

The corpus reader (`sources.CorpusSource`) calls `canonical(kind, obj)` on every jsonl record
of an sft / preference / prompt task, where the file and line are known: a bad record is
skipped and counted under its `BadRecord.reason` (and the read fails past the task's
`max_bad_fraction`). The preprocessors then see only canonical records:

  sft         {"messages": [turn, ...], "system": str}
  preference  {"prompt": [turn, ...], "chosen": str, "rejected": str, "system": str}
  prompt      {"prompt": [turn, ...], "system": str, "answer"?: str}

where a turn is {"role": "user" | "assistant", "content": str}. Accepted input formats:

  sft         OpenAI-style {"messages": [{"role", "content"}, ...]} (roles system / user /
              assistant; a system message only first), or ShareGPT-style
              {"conversations": [{"from", "value"}, ...]} with `SHAREGPT_ROLES`, or TRL's
              prompt-completion {"prompt": str | [turn, ...], "completion": str | [turn, ...]};
              each with an optional top-level "system" (a leading system message wins).
  preference  {"prompt": str | [turn, ...]} or {"messages": [turn, ...]}, plus "chosen" and
              "rejected", each a string or (TRL's conversational format) a list of turns whose
              last is the assistant reply: turns before it (the same in both) extend the prompt.
  prompt      {"prompt": str | [turn, ...], "answer"?}.
Role names are case-insensitive. Without "system", the system prompt is
`chatml.DEFAULT_SYSTEM`. An empty system prompt is kept as given (some datasets train with
one); an empty user or assistant message is bad, and so is every other `BadRecord.reason`:
bad_json, not_an_object, no_messages, bad_message, unknown_role, misplaced_system,
non_string_content, empty_message, no_assistant_turn, no_prompt, no_chosen_rejected,
prompt_mismatch, chosen_equals_rejected, no_user_turn.
"""

from __future__ import annotations

from collections.abc import Mapping

from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM

# ShareGPT "from" values -> ChatML roles (FastChat's names plus the assistant names of
# ShareGPT dumps scraped from other chat products).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
OPENAI_ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record the reader skips: `reason` is a short counter name, str() says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def detect_kind(obj) -> str | None:
    """The task kind a record's keys suggest: chosen+rejected -> preference (checked first: a
    preference record may carry its prompt as "messages"), messages / conversations /
    completion -> sft, text -> lm, prompt -> prompt; None when nothing matches."""
    if not isinstance(obj, Mapping):
        return None
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if "messages" in obj or "conversations" in obj or "completion" in obj:
        return "sft"
    if "text" in obj:
        return "lm"
    if "prompt" in obj:
        return "prompt"
    return None


def _content(value, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("non_string_content", f"{where}: content is {type(value).__name__}")
    return value


def _turns(raw, where: str, *, role_key: str, content_key: str, roles: Mapping[str, str]):
    """Validated [{"role", "content"}] from a list of message objects."""
    if not isinstance(raw, list) or not raw:
        raise BadRecord("no_messages", f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(m, Mapping) or role_key not in m or content_key not in m:
            raise BadRecord(
                "bad_message", f"{at}: expected an object with {role_key!r} and {content_key!r}"
            )
        role = roles.get(m[role_key].lower()) if isinstance(m[role_key], str) else None
        if role is None:
            raise BadRecord(
                "unknown_role", f"{at}: unknown role {m[role_key]!r} (known: {sorted(roles)})"
            )
        if role == "system" and i > 0:
            raise BadRecord("misplaced_system", f"{at}: a system message must come first")
        content = _content(m[content_key], at)
        if role != "system" and not content.strip():
            raise BadRecord("empty_message", f"{at}: empty {role} message")
        out.append({"role": role, "content": content})
    return out


def _system(obj: Mapping, turns: list[dict]) -> tuple[str, list[dict]]:
    system = obj.get("system", DEFAULT_SYSTEM)
    if system is None:
        system = DEFAULT_SYSTEM
    system = _content(system, "system")
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    return system, turns


def _openai(raw, where: str) -> list[dict]:
    roles = {r: r for r in OPENAI_ROLES}
    return _turns(raw, where, role_key="role", content_key="content", roles=roles)


def sft(obj: Mapping) -> dict:
    if "messages" in obj:
        system, turns = _system(obj, _openai(obj["messages"], "messages"))
    elif "conversations" in obj:
        raw = obj["conversations"]
        turns = _turns(
            raw, "conversations", role_key="from", content_key="value", roles=SHAREGPT_ROLES
        )
        system, turns = _system(obj, turns)
    elif "completion" in obj:  # TRL's prompt-completion format
        system, turns = _prompt(obj)
        reply = obj["completion"]
        if not isinstance(reply, list):
            reply = [{"role": "assistant", "content": reply}]
        reply = _openai(reply, "completion")
        if reply[0]["role"] == "system":
            raise BadRecord("misplaced_system", "completion: a system message after the prompt")
        turns += reply
    else:
        raise BadRecord("no_messages", 'no "messages", "conversations" or "completion" field')
    if not any(t["role"] == "assistant" for t in turns):
        raise BadRecord("no_assistant_turn", "conversation has no assistant turn")
    return {"messages": turns, "system": system}


def _prompt(obj: Mapping) -> tuple[str, list[dict]]:
    if "prompt" in obj:
        raw = obj["prompt"]
        if isinstance(raw, str):
            if not raw.strip():
                raise BadRecord("empty_message", "prompt: empty user message")
            return _system(obj, [{"role": "user", "content": raw}])
        return _system(obj, _openai(raw, "prompt"))
    if "messages" in obj:
        return _system(obj, _openai(obj["messages"], "messages"))
    raise BadRecord("no_prompt", 'no "prompt" or "messages" field')


def _reply(raw, key: str) -> tuple[list[dict], str]:
    """(turns before the reply, reply text) of a chosen/rejected value."""
    if isinstance(raw, list):
        turns = _openai(raw, key)
        if turns[-1]["role"] != "assistant":
            raise BadRecord("no_assistant_turn", f"{key}: the last message is not the assistant's")
        return turns[:-1], turns[-1]["content"]
    text = _content(raw, key)
    if not text.strip():
        raise BadRecord("empty_message", f"{key}: empty assistant reply")
    return [], text


def preference(obj: Mapping) -> dict:
    if "chosen" not in obj or "rejected" not in obj:
        raise BadRecord("no_chosen_rejected", 'a preference record needs "chosen" and "rejected"')
    lead, chosen = _reply(obj["chosen"], "chosen")
    lead_rejected, rejected = _reply(obj["rejected"], "rejected")
    if lead != lead_rejected:
        raise BadRecord("prompt_mismatch", "chosen and rejected continue different prompts")
    if "prompt" in obj or "messages" in obj:
        system, prompt = _prompt(obj)
        if lead and lead[0]["role"] == "system":
            raise BadRecord("misplaced_system", "a system message after the prompt")
        prompt += lead
    else:  # TRL's implicit-prompt format: the shared turns of chosen/rejected are the prompt
        system, prompt = _system(obj, lead)
    if not prompt:
        raise BadRecord("no_prompt", 'no "prompt" or "messages" field')
    if chosen == rejected:
        raise BadRecord("chosen_equals_rejected", "chosen and rejected replies are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}


def prompt(obj: Mapping) -> dict:
    system, turns = _prompt(obj)
    if not turns or turns[-1]["role"] != "user":
        raise BadRecord("no_user_turn", "the prompt does not end with a user message")
    out = {"prompt": turns, "system": system}
    if "answer" in obj:
        out["answer"] = str(obj["answer"])
    return out


_CANONICAL = {"sft": sft, "preference": preference, "prompt": prompt}


def canonical(kind: str, obj) -> dict:
    """The canonical record (module docstring) of `obj` for a task of `kind`; BadRecord if it
    cannot be one."""
    if not isinstance(obj, Mapping):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    return _CANONICAL[kind](obj)
