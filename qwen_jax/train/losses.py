"""Pure loss functions (formulas in the docstrings); no I/O, no state."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.dispatch import matmul


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

    For each position: logits = h @ w (fp32 accumulation), lse = logsumexp(logits),
      ce = lse - logits[target],  z = z_loss * lse^2  (PaLM's z-loss keeps lse near 0).
    The sequence is processed `chunk` positions at a time under `jax.checkpoint` (when there is
    more than one chunk), so the forward and the backward each hold one [B, chunk, V] block of
    logits at a time. `matmul_impl` is the model config's (qwen_jax.model.dispatch.matmul).

    Returns (sum_t w_t * ce_t, sum_t w_t * z_t, sum_t w_t): sums, so callers can normalise over
    gradient-accumulation microbatches exactly.
    """
    b, t, d = h_btd.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    # [n, B, chunk, ...]: scan over sequence chunks.
    hs = h_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights_bt.astype(jnp.float32).reshape(b, n, chunk).swapaxes(0, 1)

    def one(h_bcd, tgt_bc, wt_bc):
        logits = matmul("bcd,dv->bcv", h_bcd, w_dv, impl=matmul_impl, out_dtype=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt_bc[..., None], axis=-1)[..., 0]
        return jnp.sum(wt_bc * (lse - picked)), jnp.sum(wt_bc * z_loss * lse**2)

    # With several chunks, recompute each block's logits in the backward instead of keeping all
    # of them; a single chunk keeps its logits anyway, so remat would only add FLOPs.
    block = jax.checkpoint(one) if n > 1 else one

    def body(carry, xs):
        ce, z = block(*xs)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ws))
    return ce_sum, z_sum, jnp.sum(ws)
