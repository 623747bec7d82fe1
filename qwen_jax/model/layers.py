"""Stateless layer math shared by the transformer: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.dispatch import matmul


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = (x * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight, statistics in fp32 (spec §1.1)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def swiglu(
    x_btd: jax.Array,
    w1_df: jax.Array,
    w2_df: jax.Array,
    c_proj_fd: jax.Array,
    *,
    impl: str = "xla",
    scales: tuple[jax.Array | None, ...] = (None, None, None),
) -> jax.Array:
    """Qwen v1 MLP: c_proj(w1(x) * silu(w2(x))). w2 is the gate, w1 the linear "up" branch.

    x [B,T,D], w1/w2 [D,F], c_proj [F,D] -> [B,T,D]; `impl` is the config's matmul_impl;
    `scales` ([F], [F], [D]) go with int8 weights (qwen_jax.model.quantize).
    """
    s1, s2, s3 = scales
    up_btf = matmul("btd,df->btf", x_btd, w1_df, impl=impl, scale=s1)
    gate_btf = matmul("btd,df->btf", x_btd, w2_df, impl=impl, scale=s2)
    return matmul("btf,fd->btd", up_btf * jax.nn.silu(gate_btf), c_proj_fd, impl=impl, scale=s3)
