"""What the benchmarks need from a model, and the one place chat prompts are rendered.

The benchmarks only see `EvalModel`; the inference engine provides the adapter
(`load_eval_model`). Tests use small fakes that satisfy the same protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen-Chat stops at <|im_end|> or <|im_start|> (spec 5.1); <|endoftext|> ends any generation.
CHAT_STOP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")


@runtime_checkable
class EvalModel(Protocol):
    """A model under evaluation. Decoding is greedy, as in every protocol of the report."""

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> np.ndarray:
        """Log-probabilities [P, C] of each candidate as the next token after each prompt.

        Each candidate must encode to exactly one token (" A" with its leading space is one
        token for MMLU, "A" for C-Eval). Prompts longer than the model's context are cut from
        the left (Qwen's scripts keep the last 2048 tokens).
        """
        ...

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy continuation of each prompt, cut before the first occurrence of any string in
        `stop` (the stop string itself is not returned); the end-of-text token also ends it.
        Special-token text in a prompt (ChatML markers) must be encoded as special tokens.
        """
        ...


def chat_prompt(query: str, system: str = SYSTEM_PROMPT) -> str:
    """A single-turn ChatML prompt ending with the open assistant turn (spec 5.1 `make_context`).

    The text form is what the adapter tokenizes. (Qwen's `make_context` encodes the user text
    with special tokens disallowed; the adapter must do the same so a question containing
    "<|im_end|>" cannot close its turn.) Replace the body with `qwen_jax.tokenizer.chatml`'s
    renderer once that module exists; it must produce the same string.
    """
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{query}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def load_eval_model(checkpoint_dir: str | Path) -> EvalModel:
    """The `EvalModel` adapter over the inference engine for a checkpoint directory."""
    from qwen_jax.infer.eval_model import load_eval_model as load

    return load(checkpoint_dir)
