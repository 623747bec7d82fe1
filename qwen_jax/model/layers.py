"""Stateless layer math shared by the transformer: RMSNorm, SwiGLU, dropout, the LoRA term."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """y = (x * rsqrt(mean(x^2) + eps)).astype(x.dtype) * weight, statistics in fp32 (spec §1.1)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight.astype(x.dtype)


def swiglu(x_btd: jax.Array, project: Callable[[str, jax.Array, str], jax.Array]) -> jax.Array:
    """Qwen v1 MLP: c_proj(w1(x) * silu(w2(x))). w2 is the gate, w1 the linear "up" branch.

    x [B,T,D] -> [B,T,D]. `project(spec, x, name)` applies the layer's projection `name`
    (w1/w2 [D,F], c_proj [F,D]) with whatever it carries: int8 scale, matmul_impl, LoRA adapter
    (qwen_jax.model.block).
    """
    up_btf = project("btd,df->btf", x_btd, "w1")
    gate_btf = project("btd,df->btf", x_btd, "w2")
    return project("btf,fd->btd", up_btf * jax.nn.silu(gate_btf), "c_proj")


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by
    1 / (1 - rate) so the expectation is x. The identity (no op at all) when rng is None or
    rate == 0: inference never passes a key."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def lora_delta(spec: str, x: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """The LoRA term (x @ a) @ b * scaling of the projection written as `spec`.

    `spec` is dispatch.matmul's '<batch><contracted>,<contracted><out>-><batch><out>' for the
    base weight w [*in, *out]; a is [*in, r] and b [r, *out] (e.g. "btd,dnh->btnh": a [D, r],
    b [r, N, H]). Plain XLA einsums whatever the matmul_impl: the rank-r products are small, and
    under a mesh a/b are sharded like their weight's axes, which the single-device kernel refuses.
    """
    lhs, out = spec.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    if "r" in spec:
        raise ValueError(f"lora_delta uses the letter 'r' for the rank; spec {spec!r} has it")
    nc = (len(xs) + len(ws) - len(out)) // 2  # contracted axes: x's last nc, w's first nc
    u = jnp.einsum(f"{xs},{ws[:nc]}r->{xs[:-nc]}r", x, a) * jnp.asarray(scaling, x.dtype)
    return jnp.einsum(f"{xs[:-nc]}r,r{ws[nc:]}->{out}", u, b)
