"""Causal multi-head / grouped-query attention with segment, padding and window masks.

One function, `attention`, is the model's only entry point; `impl` picks the XLA einsum path here
or a Pallas kernel (qwen_jax.kernels) through `qwen_jax.model.attention_dispatch`.

Masking is expressed in *slot* coordinates: key slot s (0..S-1) is visible to a query whose slot is
q_slot when
    s <= q_slot                      (causal)
    q_slot - s < window              (layer-wise window; window == 0 means unlimited)
    kv_segment[s] == q_segment       (packed documents never attend across; 0 marks padding)
so the same code serves packed training batches (q_slot = arange(T), segment ids per document),
left-padded batches (padding has segment 0), and decoding against a KV cache (q_slot = cache index).
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
    k_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k_heads, n // k_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n, h)


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_slot_bt: jax.Array,
    q_segment_bt: jax.Array,
    kv_segment_bs: jax.Array,
    window: jax.Array | int = 0,
    impl: str = "xla",
) -> jax.Array:
    """Masked attention; returns [B,T,N,H]. `impl` in {"xla", "pallas"}."""
    if impl == "xla":
        mask = attention_mask(q_slot_bt, q_segment_bt, kv_segment_bs, window)
        return xla_attention(q_btnh, k_bskh, v_bskh, mask)
    if impl == "pallas":
        from qwen_jax.model import attention_dispatch

        return attention_dispatch.pallas_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            q_slot_bt=q_slot_bt,
            q_segment_bt=q_segment_bt,
            kv_segment_bs=kv_segment_bs,
            window=window,
        )
    raise ValueError(f"unknown attention impl {impl!r}; expected 'xla' or 'pallas'")
