"""ChatML (spec §5.1): rendering, inference prompts and the SFT loss mask.

Every turn is the token sequence
    <|im_start|> enc(role) enc("\\n") enc(content) <|im_end|> enc("\\n")
with the pieces tokenized separately and concatenated, as Qwen's finetune.py and
make_context do. Content is encoded with specials disabled (`allowed_special=set()`): a user
who types `<|im_end|>` gets plain tokens, never a turn boundary.

SFT labels (Qwen finetune.py `preprocess`; we return per-token loss weights, 1 = supervised):
    system / user turn:  [im_start, IGN...IGN (role, \\n, content), im_end, \\n]
    assistant turn:      [im_start, IGN (role), IGN (\\n), content..., im_end, \\n]
i.e. the structural <|im_start|>, <|im_end|> and trailing newline of *every* turn and the
assistant's content are learned; role names, their newline, system and user content are not.
The model predicts token i from tokens < i, so weight i scores predicting ids[i].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qwen_jax.tokenizer.base import ENDOFTEXT, IM_END, IM_START, Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen-Chat stops at <|im_end|> or <|im_start|> (spec §5.1); <|endoftext|> ends any generation.
STOP_TOKENS = (IM_END, IM_START, ENDOFTEXT)
ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def split_system(messages: Sequence[Message], system: str) -> tuple[str, list[Message]]:
    """A leading system message overrides `system`; the rest must be user/assistant turns."""
    turns = list(messages)
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for m in turns:
        if m["role"] not in ("user", "assistant"):
            raise ValueError(
                f"unexpected role {m['role']!r} (roles after the first: user, assistant)"
            )
    return system, turns


def render(
    messages: Sequence[Message], system: str = DEFAULT_SYSTEM, *, add_generation_prompt=False
) -> str:
    """The ChatML text of a conversation (system turn first; optionally the open assistant
    header `<|im_start|>assistant\\n` that generation continues from)."""
    system, turns = split_system(messages, system)
    parts = [f"{IM_START}system\n{system}{IM_END}\n"]
    parts += [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in turns]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def _chatml_ids(tok: Tokenizer) -> tuple[int, int, list[int]]:
    if tok.im_start_id is None or tok.im_end_id is None:
        raise ValueError(f"tokenizer {tok.name} has no {IM_START}/{IM_END} tokens")
    return tok.im_start_id, tok.im_end_id, tok.encode("\n", allowed_special=set())


def turn_tokens(tok: Tokenizer, role: str, content: str) -> tuple[list[int], list[int]]:
    """(ids, loss_weights) of one complete turn, weights per the module docstring."""
    im_start, im_end, nl = _chatml_ids(tok)
    head = tok.encode(role, allowed_special=set()) + nl
    body = tok.encode(content, allowed_special=set())
    ids = [im_start, *head, *body, im_end, *nl]
    learn_body = 1 if role == "assistant" else 0
    weights = [1] + [0] * len(head) + [learn_body] * len(body) + [1] * (1 + len(nl))
    return ids, weights


def sft_example(
    tok: Tokenizer, messages: Sequence[Message], system: str = DEFAULT_SYSTEM
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and their loss weights (0/1), spec §5.1 layout."""
    system, turns = split_system(messages, system)
    ids, weights = turn_tokens(tok, "system", system)
    for m in turns:
        i, w = turn_tokens(tok, m["role"], m["content"])
        ids += i
        weights += w
    return ids, weights


def stop_ids(tok: Tokenizer) -> list[int]:
    """Token ids of STOP_TOKENS in `tok` (what a chat generation stops at)."""
    im_start, im_end, _ = _chatml_ids(tok)
    return [im_end, im_start, tok.eod_id]


def assistant_header(tok: Tokenizer) -> list[int]:
    """`<|im_start|>assistant\\n`, the point generation continues from."""
    im_start, _, nl = _chatml_ids(tok)
    return [im_start, *tok.encode("assistant", allowed_special=set()), *nl]


def build_prompt(
    tok: Tokenizer,
    messages: Sequence[Message],
    *,
    system: str = DEFAULT_SYSTEM,
    max_window_tokens: int = 6144,
) -> list[int]:
    """Inference prompt: system turn, as much history as fits, the final user turn, then
    `<|im_start|>assistant\\n`.

    History is dropped from the oldest turn (a user turn together with the assistant reply that
    follows it) until the *whole* prompt is at most `max_window_tokens`. (Qwen's make_context
    budgets only system + history, with a strict `<`; counting everything is what callers
    that must fit a context window need.) Raises if system + final query alone do not fit.
    """
    system, turns = split_system(messages, system)
    if not turns or turns[-1]["role"] != "user":
        raise ValueError("build_prompt needs a conversation that ends with a user message")
    fixed = turn_tokens(tok, "system", system)[0]
    query = turn_tokens(tok, "user", turns[-1]["content"])[0] + assistant_header(tok)
    history = [turn_tokens(tok, m["role"], m["content"])[0] for m in turns[:-1]]
    roles = [m["role"] for m in turns[:-1]]
    total = len(fixed) + len(query) + sum(map(len, history))
    if len(fixed) + len(query) > max_window_tokens:
        raise ValueError(
            f"system prompt + query take {len(fixed) + len(query)} tokens, more than "
            f"max_window_tokens={max_window_tokens}"
        )
    start = 0
    while total > max_window_tokens:
        total -= len(history[start])
        start += 1
        while start < len(history) and roles[start] != "user":  # keep turns paired
            total -= len(history[start])
            start += 1
    return fixed + [t for turn in history[start:] for t in turn] + query


def preference_tokens(
    tok: Tokenizer, prompt: Sequence[Message], response: str, system: str = DEFAULT_SYSTEM
) -> tuple[list[int], int]:
    """Reward-model input: the prompt conversation plus one assistant reply, ending at that
    reply's `<|im_end|>` (the token the reward is read from). Returns (ids, prompt_length)."""
    system, turns = split_system(prompt, system)
    ids = turn_tokens(tok, "system", system)[0]
    for m in turns:
        ids += turn_tokens(tok, m["role"], m["content"])[0]
    ids += assistant_header(tok)
    prompt_len = len(ids)
    ids += tok.encode(response, allowed_special=set()) + [tok.im_end_id]
    return ids, prompt_len
