"""Rotary position embedding in the rotate-half (NeoX) layout, with dynamic-NTK base scaling.

Spec §1.2: inverse frequencies in fp32, `emb = concat(freqs, freqs)`, `rot(x) = concat(-x2, x1)`,
`x' = x cos + rot(x) sin`, q/k upcast to fp32 for the rotation. Spec §2.1 (dynamic NTK):
`base' = base * alpha ** (H / (H - 2))` with alpha chosen per sequence at prefill.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, base: float, alpha_b: jax.Array | None = None) -> jax.Array:
    """fp32 inverse frequencies [H/2], or [B, H/2] when a per-row NTK alpha [B] is given."""
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    if alpha_b is None:
        return 1.0 / (jnp.float32(base) ** exponent)
    base_b = jnp.float32(base) * jnp.asarray(alpha_b, jnp.float32) ** (head_dim / (head_dim - 2))
    return 1.0 / (base_b[:, None] ** exponent[None, :])


def ntk_alpha(kv_len: jax.Array, seq_length: int) -> jax.Array:
    """Spec §2.1: alpha = max(2**ceil(log2(L/S) + 1) - 1, 1), elementwise over kv lengths."""
    ratio = jnp.maximum(jnp.asarray(kv_len, jnp.float32), 1.0) / seq_length
    context_value = jnp.log2(ratio) + 1.0
    return jnp.maximum(2.0 ** jnp.ceil(context_value) - 1.0, 1.0)


def rope_angles(
    positions_bt: jax.Array, head_dim: int, base: float, alpha_b: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [B, T, H] in fp32 for integer positions [B, T]."""
    inv = inv_frequencies(head_dim, base, alpha_b)
    inv_b1f = inv[None, None, :] if inv.ndim == 1 else inv[:, None, :]
    freqs_btf = positions_bt.astype(jnp.float32)[..., None] * inv_b1f
    emb_bth = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return jnp.cos(emb_bth), jnp.sin(emb_bth)


def apply_rope(x_btnh: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate [B, T, heads, H] by position; computed in fp32, returned in x's dtype."""
    x = x_btnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
    return out.astype(x_btnh.dtype)


def logn_scale(positions_bt: jax.Array, seq_length: int) -> jax.Array:
    """Spec §2.2 query scale [B, T]: ln(p+1)/ln(S) where p+1 > S, else 1 (fp32)."""
    p1 = positions_bt.astype(jnp.float32) + 1.0
    return jnp.where(p1 > seq_length, jnp.log(p1) / math.log(seq_length), 1.0)
