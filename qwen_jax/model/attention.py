"""Causal multi-head / grouped-query attention with segment, padding and window masks.

The XLA attention math and the two mask rules. Which implementation runs (this XLA path, the
Pallas flash kernel, the Pallas decode kernel) is decided in `qwen_jax.model.dispatch` only.

Without a KV cache (training, scoring), masking is expressed in *slot* coordinates: key slot s
(0..S-1) is visible to a query whose slot is q_slot when
    s <= q_slot                      (causal)
    q_slot - s < window              (layer-wise window; window == 0 means unlimited)
    kv_segment[s] == q_segment       (packed documents never attend across; 0 marks padding)
so the same code serves packed training batches (q_slot = arange(T), segment ids per document),
left-padded batches (padding has segment 0).

With a KV cache (qwen_jax.model.cache) each row b has a first valid slot starts[b], and key slot s
is visible to a query at slot q_slot of that row when
    starts[b] <= s <= q_slot         (left padding, causal)
    q_slot - s < window              (as above)
`cache_mask`; each row has its own q_slot, so rows at different lengths share one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a fully masked row (a padding query) gives a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    q_slot_bt: jax.Array,
    q_segment_bt: jax.Array,
    kv_segment_bs: jax.Array,
    window: jax.Array | int = 0,
) -> jax.Array:
    """Boolean visibility [B, T, S] (True = attend). See the module docstring for the rule."""
    s = jnp.arange(kv_segment_bs.shape[1], dtype=jnp.int32)
    q = q_slot_bt[:, :, None].astype(jnp.int32)
    visible = s[None, None, :] <= q
    window = jnp.asarray(window, jnp.int32)
    visible &= (window <= 0) | (q - s[None, None, :] < window)
    visible &= q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    visible &= kv_segment_bs[:, None, :] != 0
    return visible


def xla_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    mask_bts: jax.Array,
) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v with the softmax in fp32; GQA by grouping query heads.

    q [B,T,N,H], k/v [B,S,K,H], mask [B,T,S] bool -> [B,T,N,H] in q's dtype.
    """
    b, t, n, h = q_btnh.shape
    s, k_heads = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k_heads
    # The G query heads of a kv head and the T queries fold into one row axis M = G*T: two plain
    # batched matmuls per kv head. XLA:CPU runs the grouped 5-D einsums ("btkgh,bskh->bkgts")
    # about 2x slower, for MHA (G = 1) as well.
    q_bkmh = q_btnh.reshape(b, t, k_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, -1, h)
    scores = jnp.einsum("bkmh,bskh->bkms", q_bkmh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k_heads, g, t, s) * (h**-0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype).reshape(b, k_heads, g * t, s)
    out = jnp.einsum("bkms,bskh->bkmh", probs, v_bskh)
    return out.reshape(b, k_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def cache_mask(
    q_slot_bt: jax.Array,
    starts_b: jax.Array,
    kv_len: int,
    window: jax.Array | int = 0,
) -> jax.Array:
    """Boolean visibility [B, T, S] against a KV cache of S = kv_len slots: starts[b] <= s <=
    q_slot[b, t] and (window == 0 or q_slot - s < window). See the module docstring."""
    s = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    q = q_slot_bt[:, :, None].astype(jnp.int32)
    window = jnp.asarray(window, jnp.int32)
    visible = (starts_b.astype(jnp.int32)[:, None, None] <= s) & (s <= q)
    return visible & ((window <= 0) | (q - s < window))
