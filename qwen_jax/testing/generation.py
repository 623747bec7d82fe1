"""Engine-level equality: the same greedy tokens and log-probs within ATOL_LOGPROBS."""

from __future__ import annotations

import functools

import numpy as np

from qwen_jax.testing.configs import tiny_serving
from qwen_jax.testing.tolerance import ATOL_LOGPROBS

# Prompts of 9, 2 and 5 tokens: a left-padded batch in a 16-slot bucket (plus a padding row).
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 250, 1], [200, 13], [8, 9, 10, 11, 12]]
DECODE_NEW = 8


def assert_same_generation(got, want, atol: float = ATOL_LOGPROBS) -> None:
    """Same token ids row by row; log-probs within `atol`."""
    for r, w in zip(got, want):
        assert r.token_ids == w.token_ids
        np.testing.assert_allclose(r.logprobs, w.logprobs, atol=atol, rtol=0)


def decode_config(kv_heads: int, impl: str):
    """The decode-dispatch case: `tiny_serving` with `kv_heads` kv heads and attention `impl`."""
    return tiny_serving(num_kv_heads=kv_heads, attention_impl=impl)


@functools.cache
def xla_greedy(kv_heads: int):
    """Greedy generations of the XLA decode path on PROMPTS (seed 3): the reference."""
    from qwen_jax.infer.engine import Engine
    from qwen_jax.model.factory import create_model

    model = create_model(decode_config(kv_heads, "xla"), seed=3)
    return Engine(model).generate(PROMPTS, max_new_tokens=DECODE_NEW)
