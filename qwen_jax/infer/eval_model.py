"""The engine behind qwen_jax.evals' `EvalModel` protocol (greedy generation, next-token scores).

Prompts are text; ChatML markers in them are encoded as special tokens (the evals render chat
prompts as text). Prompts longer than the context are cut from the left, as Qwen's evaluation
scripts do. Requests are served in batches of `batch_size` prompts.
"""

from __future__ import annotations

import os

import numpy as np

from qwen_jax.infer.engine import Engine


class EngineEvalModel:
    """`EvalModel` over an `Engine` and its tokenizer."""

    def __init__(self, engine: Engine, tokenizer, *, batch_size: int = 8):
        if tokenizer is None:
            raise ValueError("evaluation needs a tokenizer (the checkpoint has none)")
        self.engine, self.tok, self.batch_size = engine, tokenizer, batch_size

    def _encode(self, prompts: list[str], keep: int) -> list[list[int]]:
        return [self.tok.encode(p, allowed_special="all")[-keep:] for p in prompts]

    def _batches(self, items: list):
        for i in range(0, len(items), self.batch_size):
            yield items[i : i + self.batch_size]

    def next_token_logprobs(self, prompts: list[str], candidates: list[str]) -> np.ndarray:
        """[P, C] log-probabilities of each single-token candidate after each prompt."""
        cand_ids = []
        for c in candidates:
            ids = self.tok.encode(c, allowed_special=set())
            if len(ids) != 1:
                raise ValueError(f"candidate {c!r} is {len(ids)} tokens {ids}, not one")
            cand_ids.append(ids[0])
        encoded = self._encode(prompts, self.engine.max_context - 1)
        rows = [self.engine.next_token_logprobs(b)[:, cand_ids] for b in self._batches(encoded)]
        return np.concatenate(rows, axis=0) if rows else np.zeros((0, len(candidates)))

    def generate(self, prompts: list[str], *, max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy continuations cut before the first stop string (or the end-of-text token)."""
        special = self.tok.special_ids
        stop_ids = {self.tok.eod_id} | {special[s] for s in stop if s in special}
        stop_strings = [s for s in stop if s not in special]
        keep = max(1, self.engine.max_context - max_new_tokens)
        out: list[str] = []
        for batch in self._batches(self._encode(prompts, keep)):
            results = self.engine.generate(
                batch,
                max_new_tokens=max_new_tokens,
                stop_ids=sorted(stop_ids),
                stop_strings=stop_strings,
                tokenizer=self.tok,
            )
            out += [r.text for r in results]
        return out


def load_eval_model(
    checkpoint: str | os.PathLike, *, batch_size: int = 8, **engine_kwargs
) -> EngineEvalModel:
    """An `EvalModel` for a checkpoint directory (params export or HF), with its tokenizer,
    serving `batch_size` prompts per engine call.

    `engine_kwargs` go to `load_engine` (tokenizer=, dtype=, max_context=, mesh=, int8=, ...).
    `qwen-jax eval run` builds the same adapter from `generate`'s model flags instead
    (qwen_jax.evals.cli.load_model).
    """
    from qwen_jax.infer.load import load_engine

    engine, tok = load_engine(checkpoint, **engine_kwargs)
    return EngineEvalModel(engine, tok, batch_size=batch_size)
