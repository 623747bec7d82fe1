"""Flash attention for training on TPU (Pallas/Mosaic): forward, and backward via custom_vjp.

Semantics are those of qwen_jax.kernels.flash_attention_common (the model's XLA attention):
causal, packed segments (0 = padding), optional layer window (a traced int32 is fine: it rides in
SMEM as a scalar-prefetch operand), GQA, fp32 softmax statistics, scale 1/sqrt(H). LogN query
scaling is applied to q by the model before attention (a per-position linear factor), so it is
already in q here.

Kernels (all take the window from SMEM and skip tiles that causality/window rule out; the
index maps clamp skipped steps onto a neighbouring needed block so no DMA is wasted on them):
  forward  grid (B, N, T/bq, T/bk): online softmax over key tiles; writes o and the row
           log-sum-exp (fp32 [B, N, 1, T] rows, a free reshape of [B, N, T]: the residual stays
           small).
  dK/dV    grid (B, K, T/bk, G, T/bq): a key tile accumulates over the G query heads sharing
           its kv head and over query tiles, in the transposed layout (scores [bk, bq]) where
           lse and di broadcast as rows; no per-query-head dK/dV is ever materialised.
  dQ       grid (B, N, T/bq, T/bk): the forward's loop with ds = p * (dp - di).
di = rowsum(dO * O) is one fused XLA reduction outside the kernels.

Layout: for H % 128 == 0 (every Qwen size) q/k/v stay [B, T, N*H] (a free reshape) and a block
is one head's [rows, H] column slab, so no transposes are added around the kernels; other head
dims use [B, N, T, H] (XLA transposes) because Mosaic blocks need a 128-multiple last dim.
Segment ids travel as [B, 1, T] rows and are turned into columns inside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels.flash_attention_common import (
    MASK_VALUE,
    KernelPlan,
    flash_attention_reference,
    kv_block_range,
    poisoned_call,
    q_block_range,
    run_flash,
    tile_visible,
    visible,
)

__all__ = ["flash_attention", "flash_attention_reference", "vmem_estimates"]

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
LANES = 128


def _precision(dtype):
    # fp32 inputs ask for full-precision MXU passes: the fp32 tolerance is fp32's, not bf16's.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How [B, L, heads, H] arrays are presented to the kernels (see module docstring)."""

    fused: bool

    @staticmethod
    def for_head_dim(h: int) -> _Layout:
        return _Layout(fused=h % LANES == 0)

    def pack(self, x_blhh):
        b, l, heads, h = x_blhh.shape
        if self.fused:
            return x_blhh.reshape(b, l, heads * h)
        return x_blhh.transpose(0, 2, 1, 3)

    def unpack(self, x, heads: int, h: int):
        if self.fused:
            return x.reshape(x.shape[0], x.shape[1], heads, h)
        return x.transpose(0, 2, 1, 3)

    def spec(self, rows: int, h: int, index_map):
        """BlockSpec of one head's [rows, H] tile; index_map returns (batch, head, row block)."""
        if self.fused:

            def fused_map(*grid_and_refs):
                b, head, blk = index_map(*grid_and_refs)
                return (b, blk, head)

            return pl.BlockSpec((None, rows, h), fused_map)

        def split_map(*grid_and_refs):
            b, head, blk = index_map(*grid_and_refs)
            return (b, head, blk, 0)

        return pl.BlockSpec((None, None, rows, h), split_map)


def _row_spec(rows: int, index_map):
    """[B, heads, 1, L] fp32 rows (lse, di); index_map returns (batch, head, row block)."""

    def row_map(*grid_and_refs):
        b, head, blk = index_map(*grid_and_refs)
        return (b, head, 0, blk)

    return pl.BlockSpec((None, None, 1, rows), row_map)


def _seg_spec(rows: int, index_map):
    """[B, 1, L] int32 segment-id rows; index_map returns (batch, row block)."""

    def seg_map(*grid_and_refs):
        b, blk = index_map(*grid_and_refs)
        return (b, 0, blk)

    return pl.BlockSpec((None, 1, rows), seg_map)


def _compiler_params(plan: KernelPlan, semantics):
    return pltpu.CompilerParams(
        dimension_semantics=semantics, vmem_limit_bytes=plan.option("vmem_limit_bytes")
    )


def _col_to_row(x_col):
    # [rows, 1] -> [1, rows] through a lane-broadcast transpose: a plain reshape lowers to a
    # sublane gather, which v4 does not have. (Rows -> columns reshape fine everywhere.)
    rows = x_col.shape[0]
    return jnp.broadcast_to(x_col, (rows, LANES)).T[0:1, :]


def _cost(matmuls: int, q, l: int, arrays) -> pl.CostEstimate:
    """Causal-triangle cost of `matmuls` [L, L, H] products per head, for XLA's scheduler."""
    b, _, n, h = q.shape
    pairs = b * n * l * l // 2
    return pl.CostEstimate(
        flops=2 * matmuls * pairs * h,
        transcendentals=pairs,
        bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays),
    )


def _iota(shape, dim, start):
    return start + lax.broadcasted_iota(jnp.int32, shape, dim)


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(
    w_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, scale
):
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)
    window = w_ref[0]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(tile_visible(i * bq, bq, j * bk, bk, window))
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(
            q, k, NT, preferred_element_type=jnp.float32, precision=_precision(q.dtype)
        )
        mask = visible(
            _iota((bq, bk), 0, i * bq),
            _iota((bq, bk), 1, j * bk),
            qs_ref[...].reshape(bq, 1),
            ks_ref[...],
            window,
        )
        s = jnp.where(mask, s * scale, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        # A row that has seen only masked keys so far has m == MASK_VALUE and accumulates
        # exp(0) = 1 terms; its first visible key (the diagonal at the latest) makes alpha
        # exactly 0 and wipes them. Rows with no visible key at all (padding) keep
        # m == MASK_VALUE; `flash_core` recognises them by their lse and replaces them.
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + lax.dot_general(
            p.astype(v.dtype),
            v,
            NN,
            preferred_element_type=jnp.float32,
            precision=_precision(v.dtype),
        )
        m_scr[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_scr[...]  # > 0: every row's diagonal tile runs, adding exp(0) = 1 at least
        o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(m_scr[...] + jnp.log(l))


def _forward(q, k, v, q_seg, kv_seg, window, plan: KernelPlan):
    b, l, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    bq, bk = plan.blocks.block_q, plan.blocks.block_kv
    lay = _Layout.for_head_dim(h)

    def kv_block(i, j, w):
        lo, hi = kv_block_range(i * bq, bq, bk, w[0])
        return jnp.minimum(jnp.maximum(j, lo), hi)

    in_specs = [
        lay.spec(bq, h, lambda b_, n_, i, j, w: (b_, n_, i)),
        lay.spec(bk, h, lambda b_, n_, i, j, w: (b_, n_ // g, kv_block(i, j, w))),
        lay.spec(bk, h, lambda b_, n_, i, j, w: (b_, n_ // g, kv_block(i, j, w))),
        _seg_spec(bq, lambda b_, n_, i, j, w: (b_, i)),
        _seg_spec(bk, lambda b_, n_, i, j, w: (b_, kv_block(i, j, w))),
    ]
    args = [window.reshape(1), lay.pack(q), lay.pack(k), lay.pack(v)]
    args += [q_seg[:, None, :], kv_seg[:, None, :]]
    out_shape = [
        jax.ShapeDtypeStruct(args[1].shape, q.dtype),
        jax.ShapeDtypeStruct((b, n, 1, l), jnp.float32),
    ]
    out_specs = [
        lay.spec(bq, h, lambda b_, n_, i, j, w: (b_, n_, i)),
        _row_spec(bq, lambda b_, n_, i, j, w: (b_, n_, i)),
    ]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_fwd_kernel, scale=h**-0.5),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=1,
        poison=plan.interpret,
    )
    o, lse = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, n, l // bq, l // bk),
            in_specs=in_specs + p_specs,
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, h), jnp.float32),
            ],
        ),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(plan, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=plan.interpret,
        name="flash_attention_fwd",
        cost_estimate=_cost(2, q, l, args + out_shape),
    )(*args, *p_args)
    return lay.unpack(o, n, h), lse.reshape(b, n, l)


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
    dk_scr,
    dv_scr,
    *,
    scale,
):
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    window = w_ref[0]

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    @pl.when(tile_visible(i * bq, bq, j * bk, bk, window))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        # Transposed tile: keys on sublanes, queries on lanes, so lse/di [1, bq] broadcast.
        s_t = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32, precision=prec)
        mask = visible(
            _iota((bk, bq), 1, i * bq),
            _iota((bk, bq), 0, j * bk),
            qs_ref[...],
            ks_ref[...].reshape(bk, 1),
            window,
        )
        p_t = jnp.where(mask, jnp.exp(s_t * scale - lse_ref[...]), 0.0)
        dv_scr[...] += lax.dot_general(
            p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32, precision=prec
        )
        dp_t = lax.dot_general(v, do, NT, preferred_element_type=jnp.float32, precision=prec)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_scr[...] += lax.dot_general(
            ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32, precision=prec
        )

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _dq_kernel(
    w_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, dq_scr, *, scale
):
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)
    window = w_ref[0]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    @pl.when(tile_visible(i * bq, bq, j * bk, bk, window))
    def _step():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32, precision=prec)
        mask = visible(
            _iota((bq, bk), 0, i * bq),
            _iota((bq, bk), 1, j * bk),
            qs_ref[...].reshape(bq, 1),
            ks_ref[...],
            window,
        )
        p = jnp.where(mask, jnp.exp(s * scale - lse_ref[...].reshape(bq, 1)), 0.0)
        dp = lax.dot_general(do, v, NT, preferred_element_type=jnp.float32, precision=prec)
        ds = p * (dp - di_ref[...].reshape(bq, 1))
        dq_scr[...] += lax.dot_general(
            ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32, precision=prec
        )

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _backward(q, k, v, q_seg, kv_seg, window, o, lse, do, plan: KernelPlan):
    b, l, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    blocks = plan.blocks
    lay = _Layout.for_head_dim(h)
    scale = h**-0.5
    di = jnp.einsum("blnh,blnh->bnl", o.astype(jnp.float32), do.astype(jnp.float32))[:, :, None]
    qx, kx, vx, dox = (lay.pack(x) for x in (q, k, v, do))
    w1 = window.reshape(1)
    lse = lse.reshape(b, n, 1, l)
    q_rows, k_rows = q_seg[:, None, :], kv_seg[:, None, :]

    # dK/dV: grid (B, K, key block j, group member g_, query block i).
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    nq = l // bq

    def q_block(j, i, w):
        lo, hi = q_block_range(j * bk, bk, bq, nq, w[0])
        return jnp.minimum(jnp.maximum(i, lo), hi)

    def q_tile(b_, kk, j, g_, i, w):
        return (b_, kk * g + g_, q_block(j, i, w))

    def kv_tile(b_, kk, j, g_, i, w):
        return (b_, kk, j)

    args = [w1, qx, kx, vx, dox, lse, di, q_rows, k_rows]
    in_specs = [
        lay.spec(bq, h, q_tile),
        lay.spec(bk, h, kv_tile),
        lay.spec(bk, h, kv_tile),
        lay.spec(bq, h, q_tile),
        _row_spec(bq, q_tile),
        _row_spec(bq, q_tile),
        _seg_spec(bq, lambda b_, kk, j, g_, i, w: (b_, q_block(j, i, w))),
        _seg_spec(bk, lambda b_, kk, j, g_, i, w: (b_, j)),
    ]
    out_shape = [jax.ShapeDtypeStruct(kx.shape, k.dtype), jax.ShapeDtypeStruct(vx.shape, v.dtype)]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_dkv_kernel, scale=scale),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=1,
        poison=plan.interpret,
    )
    dk, dv = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kv_heads, l // bk, g, nq),
            in_specs=in_specs + p_specs,
            out_specs=[lay.spec(bk, h, kv_tile), lay.spec(bk, h, kv_tile)],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        ),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(
            plan, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=plan.interpret,
        name="flash_attention_dkv",
        cost_estimate=_cost(4, q, l, args + out_shape),
    )(*args, *p_args)

    # dQ: grid (B, N, query block i, key block j).
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq

    def kv_block(i, j, w):
        lo, hi = kv_block_range(i * bq, bq, bk, w[0])
        return jnp.minimum(jnp.maximum(j, lo), hi)

    def q_tile2(b_, n_, i, j, w):
        return (b_, n_, i)

    def kv_tile2(b_, n_, i, j, w):
        return (b_, n_ // g, kv_block(i, j, w))

    in_specs = [
        lay.spec(bq, h, q_tile2),
        lay.spec(bk, h, kv_tile2),
        lay.spec(bk, h, kv_tile2),
        lay.spec(bq, h, q_tile2),
        _row_spec(bq, q_tile2),
        _row_spec(bq, q_tile2),
        _seg_spec(bq, lambda b_, n_, i, j, w: (b_, i)),
        _seg_spec(bk, lambda b_, n_, i, j, w: (b_, kv_block(i, j, w))),
    ]
    out_shape = [jax.ShapeDtypeStruct(qx.shape, q.dtype)]
    kernel, p_specs, p_args, aliases = poisoned_call(
        functools.partial(_dq_kernel, scale=scale),
        out_shape=out_shape,
        num_inputs=len(args),
        num_scalar_prefetch=1,
        poison=plan.interpret,
    )
    (dq,) = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, n, l // bq, l // bk),
            in_specs=in_specs + p_specs,
            out_specs=[lay.spec(bq, h, q_tile2)],
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        input_output_aliases=aliases,
        compiler_params=_compiler_params(plan, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=plan.interpret,
        name="flash_attention_dq",
        cost_estimate=_cost(3, q, l, args + out_shape),
    )(*args, *p_args)
    return lay.unpack(dq, n, h), lay.unpack(dk, kv_heads, h), lay.unpack(dv, kv_heads, h)


# ------------------------------------------------------------------------------- wrapper


def vmem_estimates(blocks: bsz.FlashBlockSizes, head_dim: int, itemsize: int) -> dict:
    """Approximate VMEM bytes of each kernel: double-buffered tiles, scratch, fp32 temporaries.

    Returns {kernel: (bytes, names of the blocks that set its size)}. Layout padding is included
    (a [rows, 1] fp32 column occupies [rows, 128]); it is an estimate for failing early with a
    named block, not an exact account of Mosaic's allocation.
    """
    h = -(-head_dim // LANES) * LANES
    col = LANES * 4  # bytes per row of a [rows, 1] fp32 column

    def tiles(q_rows, k_rows, n_q_tiles, n_k_tiles):
        return 2 * (n_q_tiles * q_rows + n_k_tiles * k_rows) * h * itemsize

    def rows(n, r):  # [1, r] rows and segment ids, padded to 8 sublanes, double-buffered
        return 2 * n * 8 * r * 4

    bq, bk = blocks.block_q, blocks.block_kv
    fwd = tiles(bq, bk, 2, 2) + rows(3, max(bq, bk)) + bq * (h * 4 + 2 * col) + 4 * bq * bk * 4
    bq, bk = blocks.block_q_dkv, blocks.block_kv_dkv
    dkv = tiles(bq, bk, 2, 4) + rows(4, max(bq, bk)) + 2 * bk * h * 4 + 5 * bq * bk * 4
    bq, bk = blocks.block_q_dq, blocks.block_kv_dq
    dq = tiles(bq, bk, 3, 2) + rows(4, max(bq, bk)) + bq * h * 4 + 5 * bq * bk * 4 + 2 * bq * col
    return {
        "forward": (fwd, ("block_q", "block_kv")),
        "dkv": (dkv, ("block_q_dkv", "block_kv_dkv")),
        "dq": (dq, ("block_q_dq", "block_kv_dq")),
    }


def _check_vmem(blocks: bsz.FlashBlockSizes, chip: str, head_dim: int, itemsize: int) -> int:
    """Raise a ValueError naming the block that overflows `chip`'s VMEM; return the limit."""
    limit = bsz.VMEM_BYTES[chip] * 3 // 4  # leave Mosaic room for its own internal scratch
    for kernel, (need, names) in vmem_estimates(blocks, head_dim, itemsize).items():
        if need > limit:
            big = max(names, key=lambda name: getattr(blocks, name))
            raise ValueError(
                f"FlashBlockSizes.{big}={getattr(blocks, big)} is too large for TPU {chip}: the "
                f"{kernel} kernel needs ~{need / 2**20:.1f} MiB of VMEM with "
                + ", ".join(f"{nm}={getattr(blocks, nm)}" for nm in names)
                + f" (head dim {head_dim}), over the {limit / 2**20:.0f} MiB budget; "
                f"lower {big}"
            )
    return limit


def _plan_for(interpret: bool, chip: str, head_dim: int, itemsize: int):
    def plan_for(blocks: bsz.FlashBlockSizes, length: int, kv_length: int) -> KernelPlan:
        options = ()
        if chip in bsz.TPU_CHIPS and not interpret:
            options = (("vmem_limit_bytes", _check_vmem(blocks, chip, head_dim, itemsize)),)
        return KernelPlan(_forward, _backward, blocks, interpret, kv_length, options)

    return plan_for


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
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
) -> jax.Array:
    """Causal packed flash attention on TPU; q [B,T,N,H], k/v [B,T,K,H] -> o [B,T,N,H].

    segment_ids_bt [B,T] int (0 = padding; `kv_segment_ids_bt` defaults to the same ids),
    `window` an int32 scalar (0 = unlimited; may be traced). Block sizes default to the target
    chip's (`block_sizes.default_block_sizes`); they are capped at the 128-rounded sequence
    length, and the sequence is padded to a multiple of every block. `interpret=True` runs the
    kernels in Pallas interpret mode (CPU), with poisoned outputs.
    """
    chip = bsz.current_chip()
    blocks = block_sizes or bsz.default_block_sizes("cpu" if interpret else chip)
    blocks.check_multiple_of(LANES, "TPU tiles: the sequence axis is a lane axis of the score tile")
    blocks = blocks.capped(-(-q_btnh.shape[1] // LANES) * LANES)
    plan_for = _plan_for(interpret, chip, q_btnh.shape[-1], q_btnh.dtype.itemsize)
    return run_flash(
        plan_for, q_btnh, k_btkh, v_btkh, segment_ids_bt, kv_segment_ids_bt, window, blocks
    )
