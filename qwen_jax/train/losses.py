"""Pure loss functions (formulas in the docstrings); no I/O, no state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.logprobs import token_logprobs


def chunked_cross_entropy(
    h_btd: jax.Array,
    w_dv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    *,
    chunk: int = 256,
    z_loss: float = 0.0,
    matmul_impl: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted next-token cross-entropy without materialising [B, T, V] fp32 logits.

    For each position (qwen_jax.model.logprobs.token_logprobs, chunked over the sequence):
      ce = -log p(target) = lse - logits[target],  z = z_loss * lse^2
    (PaLM's z-loss keeps lse near 0). `matmul_impl` is the model config's.

    Returns (sum_t w_t * ce_t, sum_t w_t * z_t, sum_t w_t), fp32 scalars: sums, so callers can
    normalise over gradient-accumulation microbatches exactly.
    """
    logp_bt, lse_bt = token_logprobs(h_btd, w_dv, targets_bt, chunk=chunk, matmul_impl=matmul_impl)
    w_bt = weights_bt.astype(jnp.float32)
    return jnp.sum(w_bt * -logp_bt), jnp.sum(w_bt * z_loss * lse_bt**2), jnp.sum(w_bt)
