"""Log-probabilities of target tokens through the vocabulary-sized head, chunked over the
sequence: the one implementation behind the LM loss, perplexity, the engine's scoring and the
preference / RL objectives.

Legend: B batch, T positions, C positions per chunk, D model width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.dispatch import matmul


def token_logprobs(
    h_btd: jax.Array,
    w_dv: jax.Array,
    targets_bt: jax.Array,
    *,
    chunk: int = 256,
    matmul_impl: str = "xla",
    scale_v: jax.Array | None = None,
    with_entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """(log p(target), logsumexp of the logits), both fp32 [B, T], without [B, T, V] logits;
    with_entropy=True adds a third fp32 [B, T]: the entropy of the predicted distribution.

      logits_btv = h_btd @ w_dv (fp32 accumulation),  lse_bt = logsumexp_v(logits_btv),
      logp_bt = logits_btv[target_bt] - lse_bt,
      entropy_bt = -sum_v p log p = lse_bt - sum_v softmax(logits)_btv * logits_btv.

    h_btd is the final hidden state (after the last norm) in the compute dtype; w_dv the head
    (`Qwen.head_weight()`, cast to h's dtype by the caller); targets_bt int ids < V. The sequence
    runs `chunk` positions at a time; with more than one chunk each block runs under
    `jax.checkpoint`, so the forward and the backward hold one [B, C, V] block of logits at a
    time (a single chunk keeps its logits anyway: remat would only add FLOPs). `matmul_impl` is
    the model config's (qwen_jax.model.dispatch.matmul); `scale_v` is the per-column fp32 scale
    of a weight-only int8 head (qwen_jax.model.quantize), None for float weights.

    Differentiable in h and w: the gradient of sum(g * logp) is g * (onehot - softmax) per
    position, and lse carries the z-loss gradient. The entropy is computed from the same block
    of logits (no second pass over the head) and is differentiable too (an entropy bonus);
    logp and lse do not depend on the option.
    """
    b, t, d = h_btd.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def one(h_bcd, tgt_bc):
        logits_bcv = matmul(
            "bcd,dv->bcv", h_bcd, w_dv, impl=matmul_impl, out_dtype=jnp.float32, scale=scale_v
        )
        lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
        picked_bc = jnp.take_along_axis(logits_bcv, tgt_bc[..., None], axis=-1)[..., 0]
        out = (picked_bc - lse_bc, lse_bc)
        if with_entropy:
            probs_bcv = jnp.exp(logits_bcv - lse_bc[..., None])
            out += (lse_bc - jnp.sum(probs_bcv * logits_bcv, axis=-1),)
        return out

    if n == 1:
        outs = one(h_btd, targets_bt)
    else:
        # [n, B, C, ...]: map over sequence chunks; each block's logits are recomputed in the
        # backward instead of kept.
        hs = h_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
        ts = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
        outs_nbc = jax.lax.map(lambda xs: jax.checkpoint(one)(*xs), (hs, ts))
        outs = tuple(x.swapaxes(0, 1).reshape(b, n * chunk) for x in outs_nbc)
    return tuple(x[:, :t] for x in outs)
