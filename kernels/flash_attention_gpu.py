"""Flash attention for training on GPU (Pallas lowered through Triton): forward and backward.

Semantics are those of qwen_jax.kernels.flash_attention_common (the model's XLA attention):
causal, packed segments (0 = padding), optional layer window (a traced int32 scalar, passed as a
one-element operand), GQA, fp32 softmax statistics, scale 1/sqrt(H). LogN query scaling is
applied to q by the model before attention, so it is already in q here.

Kernels (each program keeps one tile in registers/shared memory and loops over the other axis,
with loop bounds from causality and the window, so skipped tiles cost nothing):
  forward  grid (T/bq, B, N): online softmax over the key tiles in the query tile's band;
           writes o and the fp32 row log-sum-exp [B, N, T].
  dK/dV    grid (T/bk, B, K): a key tile loops over the G query heads of its kv head and over
           the query tiles that can see it, so GQA needs no per-query-head dK/dV buffer.
  dQ       grid (T/bq, B, N): the forward's loop with ds = p * (dp - di).
di = rowsum(dO * O) is one fused XLA reduction outside the kernels.

Triton tiles need power-of-two sizes: blocks are powers of two >= 16, and a head dim that is not
one is zero-padded (zero columns change no score and are sliced off the outputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels.flash_attention_common import (
    MASK_VALUE,
    KernelPlan,
    flash_attention_reference,
    kv_block_range,
    poisoned_call,
    q_block_range,
    run_flash,
    visible,
)

__all__ = ["flash_attention", "flash_attention_reference"]

MIN_BLOCK = 16  # smallest tensor-core tile Triton accepts for tl.dot


def _dot(a, b, *, trans_b: bool = False):
    # fp32 inputs ask for IEEE fp32 dots (no TF32): the fp32 tolerance is fp32's.
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=False if a.dtype == jnp.float32 else None)


def _params(plan: KernelPlan, warps: int):
    return plgpu.CompilerParams(
        num_warps=plan.option("num_warps") or warps, num_stages=plan.option("num_stages", 2)
    )


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(w_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, block_kv):
    bq, h = q_ref.shape
    bk = block_kv
    i = pl.program_id(0)
    window = w_ref[0]
    q = q_ref[...]
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = qs_ref[...][:, None]

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        s = _dot(q, k_ref[keys, :], trans_b=True) * scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
        s = jnp.where(visible(q_pos, k_pos, q_seg, ks_ref[keys][None, :], window), s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # Rows that have only seen masked keys accumulate exp(0) terms until their first visible
        # key makes alpha exactly 0 (see the TPU kernel); rows with none are replaced outside.
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[keys, :]
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    lo, hi = kv_block_range(i * bq, bq, bk, window)
    init = (
        jnp.zeros((bq, h), jnp.float32),
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi + 1, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _forward(q, k, v, q_seg, kv_seg, window, plan: KernelPlan):
    b, l, n, h = q.shape
    g = n // k.shape[2]
    bq, bk = plan.blocks.block_q, plan.blocks.block_kv
    in_specs = [
        pl.BlockSpec((1,), lambda i, b_, n_: (0,)),
        pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0)),
        pl.BlockSpec((None, l, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0)),
        pl.BlockSpec((None, l, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0)),
        pl.BlockSpec((None, bq), lambda i, b_, n_: (b_, i)),
        pl.BlockSpec((None, l), lambda i, b_, n_: (b_, 0)),
    ]
    args = [window.reshape(1), q, k, v, q_seg, kv_seg]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, n, l), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b_, n_: (b_, n_, i)),
    ]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_fwd_kernel, scale=plan.option("scale"), block_kv=bk),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=0,
        poison=plan.interpret,
    )
    o, lse = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(l // bq, b, n),
        in_specs=in_specs + p_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        compiler_params=_params(plan, 4 if h <= 64 else 8),
        interpret=plan.interpret,
        name="flash_attention_fwd",
    )(*args, *p_args)
    return o, lse


# ------------------------------------------------------------------------------ backward


def _dkv_kernel(
    w_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    di_ref,
    qs_ref,
    ks_ref,
    dk_ref,
    dv_ref,
    *,
    scale,
    block_q,
    groups,
):
    bk, h = k_ref.shape
    bq = block_q
    j = pl.program_id(0)
    window = w_ref[0]
    k, v = k_ref[...], v_ref[...]
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[:, None]
    kv_seg = ks_ref[...][:, None]
    num_q_blocks = q_ref.shape[0] // bq
    lo, hi = q_block_range(j * bk, bk, bq, num_q_blocks, window)

    def q_tile(g, i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        # Transposed tile [bk, bq]: lse and di of the query rows broadcast along keys.
        s_t = _dot(k, q, trans_b=True) * scale
        q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[None, :]
        mask = visible(q_pos, k_pos, qs_ref[rows][None, :], kv_seg, window)
        p_t = jnp.where(mask, jnp.exp(s_t - lse_ref[g, rows][None, :]), 0.0)
        dv = dv + _dot(p_t.astype(do.dtype), do)
        dp_t = _dot(v, do, trans_b=True)
        ds_t = p_t * (dp_t - di_ref[g, rows][None, :])
        dk = dk + _dot(ds_t.astype(q.dtype), q)
        return dk, dv

    def head(g, carry):
        return lax.fori_loop(lo, hi + 1, functools.partial(q_tile, g), carry)

    zeros = jnp.zeros((bk, h), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, *, scale, block_kv
):
    bq, h = q_ref.shape
    bk = block_kv
    i = pl.program_id(0)
    window = w_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, di = lse_ref[...][:, None], di_ref[...][:, None]
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = qs_ref[...][:, None]

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = _dot(q, k, trans_b=True) * scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
        mask = visible(q_pos, k_pos, q_seg, ks_ref[keys][None, :], window)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - di)
        return dq + _dot(ds.astype(k.dtype), k)

    lo, hi = kv_block_range(i * bq, bq, bk, window)
    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros((bq, h), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, window, o, lse, do, plan: KernelPlan):
    b, l, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    blocks, scale = plan.blocks, plan.option("scale")
    di = jnp.einsum("blnh,blnh->bnl", o.astype(jnp.float32), do.astype(jnp.float32))
    args = [window.reshape(1), q, k, v, do, lse, di, q_seg, kv_seg]

    # dK/dV: one program per (key tile, batch, kv head); all G query heads of the group.
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    group = pl.BlockSpec((None, l, g, h), lambda j, b_, kk: (b_, 0, kk, 0))
    group_rows = pl.BlockSpec((None, g, l), lambda j, b_, kk: (b_, kk, 0))
    kv_tile = pl.BlockSpec((None, bk, None, h), lambda j, b_, kk: (b_, j, kk, 0))
    in_specs = [
        pl.BlockSpec((1,), lambda j, b_, kk: (0,)),
        group,
        kv_tile,
        kv_tile,
        group,
        group_rows,
        group_rows,
        pl.BlockSpec((None, l), lambda j, b_, kk: (b_, 0)),
        pl.BlockSpec((None, bk), lambda j, b_, kk: (b_, j)),
    ]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, groups=g),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=0,
        poison=plan.interpret,
    )
    dk, dv = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(l // bk, b, kv_heads),
        in_specs=in_specs + p_specs,
        out_specs=[kv_tile, kv_tile],
        input_output_aliases=aliases,
        compiler_params=_params(plan, 4 if bq * bk < 128 * 128 else 8),
        interpret=plan.interpret,
        name="flash_attention_dkv",
    )(*args, *p_args)

    # dQ: one program per (query tile, batch, head).
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    q_tile = pl.BlockSpec((None, bq, None, h), lambda i, b_, n_: (b_, i, n_, 0))
    kv_all = pl.BlockSpec((None, l, None, h), lambda i, b_, n_: (b_, 0, n_ // g, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b_, n_: (b_, n_, i))
    in_specs = [
        pl.BlockSpec((1,), lambda i, b_, n_: (0,)),
        q_tile,
        kv_all,
        kv_all,
        q_tile,
        row_tile,
        row_tile,
        pl.BlockSpec((None, bq), lambda i, b_, n_: (b_, i)),
        pl.BlockSpec((None, l), lambda i, b_, n_: (b_, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_dq_kernel, scale=scale, block_kv=bk),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=0,
        poison=plan.interpret,
    )
    (dq,) = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(l // bq, b, n),
        in_specs=in_specs + p_specs,
        out_specs=[q_tile],
        input_output_aliases=aliases,
        compiler_params=_params(plan, 4 if bq * bk < 128 * 128 else 8),
        interpret=plan.interpret,
        name="flash_attention_dq",
    )(*args, *p_args)
    return dq, dk, dv


# ------------------------------------------------------------------------------- wrapper


def _padded_head(forward, backward, head_dim: int):
    """Wrap forward/backward so they see a power-of-two head dim (zero columns)."""
    hp = max(MIN_BLOCK, pl.next_power_of_2(head_dim))
    if hp == head_dim:
        return forward, backward

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, hp - head_dim)))

    def fwd(q, k, v, *rest):
        o, lse = forward(pad(q), pad(k), pad(v), *rest)
        return o[..., :head_dim], lse

    def bwd(q, k, v, q_seg, kv_seg, window, o, lse, do, plan):
        grads = backward(pad(q), pad(k), pad(v), q_seg, kv_seg, window, pad(o), lse, pad(do), plan)
        return tuple(x[..., :head_dim] for x in grads)

    return fwd, bwd


@functools.cache
def _kernels_for_head_dim(head_dim: int):
    # Cached so the same (hashable) callables reach KernelPlan and jit caches hit.
    return _padded_head(_forward, _backward, head_dim)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "num_warps"))
def flash_attention(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkh: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    window: jax.Array | int = 0,
    kv_segment_ids_bt: jax.Array | None = None,
    block_sizes: bsz.FlashBlockSizes | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
) -> jax.Array:
    """Causal packed flash attention on GPU; q [B,T,N,H], k/v [B,T,K,H] -> o [B,T,N,H].

    Same arguments as `flash_attention_tpu.flash_attention`; blocks must be powers of two >= 16
    (default: `default_block_sizes("gpu")`), capped at the sequence length rounded up to 16.
    `interpret=True` runs the kernels in Pallas interpret mode (CPU), with poisoned outputs.
    """
    blocks = block_sizes or bsz.default_block_sizes("gpu")
    blocks.check_power_of_two(MIN_BLOCK, "Triton tiles")
    blocks = blocks.capped(max(MIN_BLOCK, pl.next_power_of_2(q_btnh.shape[1])))
    head_dim = q_btnh.shape[-1]
    forward, backward = _kernels_for_head_dim(head_dim)
    options = (("scale", head_dim**-0.5), ("num_warps", num_warps))

    def plan_for(blocks, length, kv_length):
        return KernelPlan(forward, backward, blocks, interpret, kv_length, options)

    return run_flash(
        plan_for, q_btnh, k_btkh, v_btkh, segment_ids_bt, kv_segment_ids_bt, window, blocks
    )
