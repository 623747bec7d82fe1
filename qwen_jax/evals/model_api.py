"""What the benchmarks need from a model, and how they phrase chat prompts.

The benchmarks only see `EvalModel`; the inference engine provides the adapter
(`qwen_jax.infer.eval_model`: `EngineEvalModel`, `load_eval_model`). Tests use small fakes that
satisfy the same protocol. ChatML and its stop tokens are the tokenizer's
(`qwen_jax.tokenizer.chatml`), shared with `qwen-jax chat`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM, render


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


def chat_prompt(query: str, system: str = DEFAULT_SYSTEM) -> str:
    """A single-turn ChatML prompt ending with the open assistant turn (spec 5.1 `make_context`),
    as text: `qwen_jax.tokenizer.chatml.render` with the generation prompt.

    (Qwen's `make_context` encodes the user text with special tokens disallowed; the text
    protocol cannot say which markers are structural, so `EngineEvalModel` encodes every
    marker in the prompt as a special token.)
    """
    return render([{"role": "user", "content": query}], system, add_generation_prompt=True)
