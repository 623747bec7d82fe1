"""The LM head + cross-entropy with its gradient computed in the forward pass (one pass over
the vocabulary instead of two): the issue-19 lever on the training loss.

Legend: B batch, T positions, C positions per chunk, D model width, V vocabulary.

The current loss (train/losses.py `chunked_cross_entropy` -> model/logprobs.py) already never
holds [B, T, V] logits: it maps over sequence chunks under `jax.checkpoint`, so the backward
recomputes every block of logits: 4 head matmuls per token (forward, recompute, dh, dw). Here
a custom VJP computes each block's logits once and, while they are live, the block's gradient
(softmax - onehot is known in the forward for a scalar objective): 3 head matmuls per token,
dW accumulated in fp32 across chunks, dh kept per position in the compute dtype. The head is
about 17% of a Qwen-1.8B step's FLOPs, so the recompute it removes is about 5% of the step.

Chunks run over sequence positions with the batch axis intact (as logprobs.py does), so a
batch sharded over devices stays sharded in every chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _blocks(x_bt, chunk: int):
    """[B, T, ...] -> [n, B, C, ...] (T padded to a multiple of C with zeros)."""
    b, t = x_bt.shape[:2]
    pad = (-t) % chunk
    if pad:
        x_bt = jnp.pad(x_bt, ((0, 0), (0, pad)) + ((0, 0),) * (x_bt.ndim - 2))
    n = (t + pad) // chunk
    return x_bt.reshape(b, n, chunk, *x_bt.shape[2:]).swapaxes(0, 1)


def _block_stats(h_bcd, w_dv, tgt_bc):
    """fp32 logits [B, C, V] of one block (compute-dtype inputs, fp32 accumulation), their
    logsumexp [B, C] and the target's logit [B, C]."""
    logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    picked_bc = jnp.take_along_axis(logits_bcv, tgt_bc[..., None], axis=-1)[..., 0]
    return logits_bcv, lse_bc, picked_bc


def _forward(h_btd, w_dv, targets_bt, weights_bt, chunk, z_loss, with_grad):
    """(ce sum, z sum) and, with_grad, (dh [B, T, D] in h's dtype, dw [D, V] in w's dtype): the
    gradient of ce + z, computed block by block while each block's logits are live."""
    b, t, d = h_btd.shape
    chunk = min(chunk, t)
    xs = (_blocks(h_btd, chunk), _blocks(targets_bt, chunk), _blocks(weights_bt, chunk))

    def body(carry, x):
        h_bcd, tgt_bc, wt_bc = x
        logits_bcv, lse_bc, picked_bc = _block_stats(h_bcd, w_dv, tgt_bc)
        ce = jnp.sum(wt_bc * (lse_bc - picked_bc))
        z = jnp.sum(wt_bc * z_loss * lse_bc**2)
        if not with_grad:
            return (carry[0] + ce, carry[1] + z), None
        # d(ce + z)/dlogits = w * (softmax - onehot) + w * 2 z_loss lse * softmax.
        probs_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
        coef_bc = wt_bc * (1.0 + 2.0 * z_loss * lse_bc)
        onehot_bcv = jax.nn.one_hot(tgt_bc, w_dv.shape[1], dtype=jnp.float32)
        g_bcv = (coef_bc[..., None] * probs_bcv - wt_bc[..., None] * onehot_bcv).astype(w_dv.dtype)
        dh_bcd = jnp.einsum("bcv,dv->bcd", g_bcv, w_dv, preferred_element_type=jnp.float32)
        dw_dv = carry[2] + jnp.einsum(
            "bcd,bcv->dv", h_bcd, g_bcv, preferred_element_type=jnp.float32
        )
        return (carry[0] + ce, carry[1] + z, dw_dv), dh_bcd.astype(h_btd.dtype)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(w_dv.shape, jnp.float32)) if with_grad else (zero, zero)
    carry, dh_nbcd = jax.lax.scan(body, init, xs)
    if not with_grad:
        return carry, None
    dh_btd = dh_nbcd.swapaxes(0, 1).reshape(b, -1, d)[:, :t]
    return carry[:2], (dh_btd, carry[2].astype(w_dv.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _objective(h_btd, w_dv, targets_bt, weights_bt, chunk, z_loss):
    (ce, z), _ = _forward(h_btd, w_dv, targets_bt, weights_bt, chunk, z_loss, False)
    return ce + z, (ce, z)


def _objective_fwd(h_btd, w_dv, targets_bt, weights_bt, chunk, z_loss):
    (ce, z), grads = _forward(h_btd, w_dv, targets_bt, weights_bt, chunk, z_loss, True)
    return (ce + z, (ce, z)), grads


def _objective_bwd(chunk, z_loss, res, cotangents):
    dh_btd, dw_dv = res
    g = cotangents[0]  # the (ce, z) outputs leave through stop_gradient: no cotangent to add
    return (
        (g * dh_btd).astype(dh_btd.dtype),
        (g * dw_dv).astype(dw_dv.dtype),
        None,  # targets and weights are data: zero cotangents
        None,
    )


_objective.defvjp(_objective_fwd, _objective_bwd)


def fused_cross_entropy(
    h_btd: jax.Array,
    w_dv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    *,
    chunk: int = 256,
    z_loss: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Weighted next-token cross-entropy (+ z-loss), gradient computed in the forward.

    Per position: ce = lse - logits[target], z = z_loss * lse^2, logits = h @ w with fp32
    accumulation of compute-dtype inputs (h_btd [B, T, D] and w_dv [D, V] share one dtype, as
    `Qwen.head_weight().astype(h.dtype)` gives); targets_bt int [B, T]; weights_bt [B, T].

    Returns fp32 scalars (objective = sum w (ce + z), sum w ce, sum w z, sum w): the values of
    `losses.chunked_cross_entropy` (objective = its first two summed). Only the objective is
    differentiable (in h and w); the ce and z sums are metrics, returned through
    stop_gradient. One [B, C, V] fp32 block of logits is live at a time in the forward and
    none in the backward, which only scales the stored dh [B, T, D] and dW [D, V].
    """
    w_bt = weights_bt.astype(jnp.float32)
    obj, (ce, z) = _objective(h_btd, w_dv, targets_bt, w_bt, chunk, float(z_loss))
    return obj, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(z), jnp.sum(w_bt)
