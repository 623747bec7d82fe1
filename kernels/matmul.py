"""Tiled matmul with fp32 accumulation, and a weight-only int8 matmul dequantised in the kernel.

    matmul(x, w)               y[m, n] = sum_k x[m, k] w[k, n]
    int8_matmul(x, wq, scale)  y[m, n] = scale[n] * sum_k x[m, k] wq[k, n]

x is [..., K] (leading axes are flattened into M), w / wq are [K, N]. The int8 weights travel
from HBM as int8 (a quarter of fp32, half of bf16) and are cast to x's dtype tile by tile inside
the kernel; because the scale is per output channel it factors out of the K sum and is applied
once to the fp32 accumulator. `quantize_int8` makes (wq, scale) with symmetric per-channel
absmax scaling.

One kernel body per backend computes every product, including the backward pass:
  * TPU (Mosaic): grid (M/bm, N/bn, K/bk) with the K axis last ("arbitrary") and an fp32 VMEM
    accumulator, written out at the last K step.
  * GPU (Triton): grid (M/bm, N/bn); each program loops over K with a register accumulator.
Either operand may be stored transposed (`trans_a`: a is [K, M]; `trans_b`: b is [N, K]); the
block index maps and the dot's contracting dims change, nothing is copied. So the custom VJP is
the same kernel: dx = dy @ w^T (trans_b) and dw = x^T @ dy (trans_a).
Shapes that are not multiples of the blocks: the GPU wrapper zero-pads (zeros along K add
nothing; padded rows and columns are sliced off). The TPU body never pads: a per-call pad copies
the whole weight in HBM (the 151936-wide LM head is not a multiple of 512). Its last M / N block
is partial instead (Mosaic drops out-of-bounds writes; rows and columns read past the end only
reach those dropped outputs), K blocks divide K where a multiple of 128 does, and otherwise the
tail of the last K block is zeroed in the kernel (in both operands: 0 * NaN is NaN).
fp32 inputs are multiplied at full fp32 precision (HIGHEST; no TF32 / bf16 passes).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from qwen_jax.kernels.decode_attention import (
    GPU_SMEM_BUDGET_BYTES,
    HLO_INTERPRET,
    TPU_INTERPRET,
    TPU_VMEM_BUDGET_BYTES,
)


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    """Tile of one program: [block_m, block_k] x [block_k, block_n] per step.

    TPU: multiples of 128 (each is clamped to its padded dimension, so small matrices work).
    GPU: powers of two >= 16; num_warps / num_stages go to Triton.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def default_matmul_block_sizes(backend: str, dtype=jnp.bfloat16) -> MatmulBlockSizes:
    """TPU: 512^3 tiles keep the MXU fed in 4 (bf16) to 7 (fp32) MiB of VMEM on every generation.
    GPU: 128x128 tiles; the K step is halved for fp32 so three stages fit shared memory."""
    if backend == "tpu":
        return MatmulBlockSizes(512, 512, 512)
    if backend == "gpu":
        block_k = 32 if jnp.dtype(dtype).itemsize >= 4 else 64
        return MatmulBlockSizes(128, 128, block_k, num_warps=8, num_stages=3)
    raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _dot(a, b, trans_a, trans_b):
    """a [M,K] (or [K,M]) . b [K,N] (or [N,K]) -> fp32 [M,N]; b is cast to a's dtype first."""
    if b.dtype != a.dtype:
        b = b.astype(a.dtype)  # in-kernel dequantisation of int8 weights (exact for |q| <= 127)
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ---------------------------------------------------------------------------------------------


def _tpu_kernel(a_ref, b_ref, *rest, trans_a, trans_b, has_scale, k_len, k_tail):
    scale_ref = rest[0] if has_scale else None
    o_ref, acc_ref = rest[-2], rest[-1]
    k_step = pl.program_id(2)

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    a, b = a_ref[...], b_ref[...]
    if k_tail:  # static: K is not a multiple of the K block; the last block runs past the end
        left = k_len - k_step * (a.shape[0] if trans_a else a.shape[1])
        a_k = lax.broadcasted_iota(jnp.int32, a.shape, 0 if trans_a else 1)
        b_k = lax.broadcasted_iota(jnp.int32, b.shape, 1 if trans_b else 0)
        a = jnp.where(a_k < left, a, jnp.zeros_like(a))
        b = jnp.where(b_k < left, b, jnp.zeros_like(b))
    acc_ref[...] += _dot(a, b, trans_a, trans_b)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _finish():
        out = acc_ref[...]
        if has_scale:
            out = out * scale_ref[...].astype(jnp.float32)  # [1, bn] broadcast over rows
        o_ref[...] = out.astype(o_ref.dtype)


def _tpu_blocks(m, n, k, bs: MatmulBlockSizes):
    """(bm, bn, bk): a dimension no longer than its block is one whole-dimension block (legal
    at any size); a longer one gets the block and a partial last block. K prefers the largest
    multiple of 128 up to block_k that divides K, so no K tail needs masking."""
    for name in ("block_m", "block_n", "block_k"):
        if getattr(bs, name) % 128:
            raise ValueError(
                f"MatmulBlockSizes.{name}={getattr(bs, name)} must be a multiple of 128 on TPU"
            )
    bk = k if k <= bs.block_k else bs.block_k
    if k % 128 == 0:
        bk = max(d for d in range(128, bk + 1, 128) if k % d == 0)
    return min(m, bs.block_m), min(n, bs.block_n), bk


def _matmul_tpu(a, b, scale, *, trans_a, trans_b, out_dtype, bs, interpret):
    k, m = a.shape if trans_a else a.shape[::-1]
    n = b.shape[0] if trans_b else b.shape[1]
    bm, bn, bk = _tpu_blocks(m, n, k, bs)
    item = lambda x: jnp.dtype(x).itemsize  # noqa: E731
    # VMEM tiles are padded: M is a sublane axis unless a is stored transposed (32 rows covers
    # int8/bf16/f32 tiling); a whole-dimension block under 128 still takes 128 lanes.
    pm, pn, pk = _round_up(bm, 128 if trans_a else 32), _round_up(bn, 128), _round_up(bk, 128)
    need = (
        2 * (pm * pk * item(a.dtype) + pk * pn * item(b.dtype) + pn * 4)
        + 2 * pm * pn * item(out_dtype)
        + pm * pn * 4
        + (pk * pn * item(a.dtype) if b.dtype != a.dtype else 0)  # dequantised weight tile
    )
    if need > TPU_VMEM_BUDGET_BYTES:
        raise ValueError(
            f"MatmulBlockSizes(block_m={bm}, block_n={bn}, block_k={bk}) needs "
            f"{need / 2**20:.1f} MiB of VMEM, over the {TPU_VMEM_BUDGET_BYTES / 2**20:.0f} MiB "
            "budget; use smaller blocks"
        )
    if trans_a:
        a_spec = pl.BlockSpec((bk, bm), lambda i, j, kk: (kk, i))
    else:
        a_spec = pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))
    if trans_b:
        b_spec = pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
    else:
        b_spec = pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))
    operands, in_specs = [a, b], [a_spec, b_spec]
    if scale is not None:
        operands.append(scale.reshape(1, n))
        in_specs.append(pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)))
    kernel = functools.partial(
        _tpu_kernel,
        trans_a=trans_a,
        trans_b=trans_b,
        has_scale=scale is not None,
        k_len=k,
        k_tail=k % bk != 0,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=TPU_INTERPRET if interpret is True else interpret,
        name="matmul_tpu",
    )(*operands)


# ---------------------------------------------------------------------------------------------
# GPU (Triton)
# ---------------------------------------------------------------------------------------------


def _gpu_kernel(a_ref, b_ref, *rest, trans_a, trans_b, has_scale, block_k, n_k):
    scale_ref = rest[0] if has_scale else None
    o_ref = rest[-1]
    bm, bn = o_ref.shape

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * block_k, block_k), block_k)
        a = a_ref[ks, :] if trans_a else a_ref[:, ks]
        b = b_ref[:, ks] if trans_b else b_ref[ks, :]
        return acc + _dot(a, b, trans_a, trans_b)

    acc = lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), jnp.float32))
    if has_scale:
        acc = acc * scale_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = acc.astype(o_ref.dtype)


def _matmul_gpu(a, b, scale, *, trans_a, trans_b, out_dtype, bs, interpret):
    k, m = a.shape if trans_a else a.shape[::-1]
    n = b.shape[0] if trans_b else b.shape[1]
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(bs, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"MatmulBlockSizes.{name}={v} must be a power of two >= 16 on GPU")
    # Shrink tiles for small matrices (powers of two, at least 16 for the tensor-core dot).
    bm = min(bs.block_m, max(16, pl.next_power_of_2(m)))
    bn = min(bs.block_n, max(16, pl.next_power_of_2(n)))
    bk = min(bs.block_k, max(16, pl.next_power_of_2(k)))
    item = lambda x: jnp.dtype(x).itemsize  # noqa: E731
    need = bs.num_stages * bk * (bm * item(a.dtype) + bn * item(b.dtype))
    if need > GPU_SMEM_BUDGET_BYTES:
        raise ValueError(
            f"MatmulBlockSizes(block_m={bm}, block_n={bn}, block_k={bk}, "
            f"num_stages={bs.num_stages}) needs {need // 1024} KiB of shared memory, over the "
            f"{GPU_SMEM_BUDGET_BYTES // 1024} KiB per block; use smaller blocks"
        )
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    a = _pad2(a, (kp, mp) if trans_a else (mp, kp))
    b = _pad2(b, (np_, kp) if trans_b else (kp, np_))
    a_spec = (
        pl.BlockSpec((kp, bm), lambda i, j: (0, i))
        if trans_a
        else pl.BlockSpec((bm, kp), lambda i, j: (i, 0))
    )
    b_spec = (
        pl.BlockSpec((bn, kp), lambda i, j: (j, 0))
        if trans_b
        else pl.BlockSpec((kp, bn), lambda i, j: (0, j))
    )
    operands, in_specs = [a, b], [a_spec, b_spec]
    if scale is not None:
        operands.append(_pad1(scale, np_))
        in_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    kernel = functools.partial(
        _gpu_kernel,
        trans_a=trans_a,
        trans_b=trans_b,
        has_scale=scale is not None,
        block_k=bk,
        n_k=kp // bk,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="matmul_gpu",
    )(*operands)
    return out[:m, :n]


def _pad2(x, shape):
    if x.shape == shape:
        return x
    return jnp.pad(x, ((0, shape[0] - x.shape[0]), (0, shape[1] - x.shape[1])))


def _pad1(x, n):
    return x if x.shape[0] == n else jnp.pad(x, (0, n - x.shape[0]))


# ---------------------------------------------------------------------------------------------
# Public wrappers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static settings threaded through the custom VJPs (hashable)."""

    backend: str
    block_sizes: MatmulBlockSizes
    interpret: object


def _kernel(a, b, scale, cfg: _Config, *, out_dtype, trans_a=False, trans_b=False):
    impl = {"tpu": _matmul_tpu, "gpu": _matmul_gpu}[cfg.backend]
    return impl(
        a,
        b,
        scale,
        trans_a=trans_a,
        trans_b=trans_b,
        out_dtype=out_dtype,
        bs=cfg.block_sizes,
        interpret=cfg.interpret,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_2d(x_mk, w_kn, cfg, out_dtype):
    return _kernel(x_mk, w_kn, None, cfg, out_dtype=out_dtype)


def _matmul_2d_fwd(x_mk, w_kn, cfg, out_dtype):
    return _matmul_2d(x_mk, w_kn, cfg, out_dtype), (x_mk, w_kn)


def _matmul_2d_bwd(cfg, out_dtype, res, dy_mn):
    x_mk, w_kn = res
    dy_mn = dy_mn.astype(x_mk.dtype)
    dx = _kernel(dy_mn, w_kn, None, cfg, out_dtype=x_mk.dtype, trans_b=True)  # dy @ w^T
    dw = _kernel(x_mk, dy_mn, None, cfg, out_dtype=w_kn.dtype, trans_a=True)  # x^T @ dy
    return dx, dw


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _int8_matmul_2d(x_mk, wq_kn, scale_n, cfg, out_dtype):
    return _kernel(x_mk, wq_kn, scale_n, cfg, out_dtype=out_dtype)


def _int8_matmul_2d_fwd(x_mk, wq_kn, scale_n, cfg, out_dtype):
    return _int8_matmul_2d(x_mk, wq_kn, scale_n, cfg, out_dtype), (x_mk, wq_kn, scale_n)


def _int8_matmul_2d_bwd(cfg, out_dtype, res, dy_mn):
    x_mk, wq_kn, scale_n = res
    dy32 = dy_mn.astype(jnp.float32)
    # dx[m,k] = sum_n (dy[m,n] scale[n]) wq[k,n]: the same int8 kernel, wq read transposed.
    dys = (dy32 * scale_n.astype(jnp.float32)[None, :]).astype(x_mk.dtype)
    dx = _kernel(dys, wq_kn, None, cfg, out_dtype=x_mk.dtype, trans_b=True)
    # dscale[n] = sum_m dy[m,n] (x @ wq)[m,n], with the unscaled product from the same kernel.
    z = _kernel(x_mk, wq_kn, None, cfg, out_dtype=jnp.float32)
    dscale = jnp.sum(dy32 * z, axis=0).astype(scale_n.dtype)
    dwq = np.zeros(wq_kn.shape, dtype=jax.dtypes.float0)  # integer weights: no tangent space
    return dx, dwq, dscale


_int8_matmul_2d.defvjp(_int8_matmul_2d_fwd, _int8_matmul_2d_bwd)


def _config(backend, block_sizes, interpret, dtype) -> _Config:
    backend = backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    if backend not in ("tpu", "gpu"):
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return _Config(backend, block_sizes or default_matmul_block_sizes(backend, dtype), interpret)


def _flatten(x, w_rows):
    if x.shape[-1] != w_rows:
        raise ValueError(f"x's last axis ({x.shape[-1]}) must equal the weight's K ({w_rows})")
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend", "interpret"))
def matmul(
    x_mk: jax.Array,
    w_kn: jax.Array,
    *,
    out_dtype=None,
    block_sizes: MatmulBlockSizes | None = None,
    backend: str | None = None,
    interpret=False,
) -> jax.Array:
    """Pallas x @ w with fp32 accumulation; x [..., K], w [K, N] -> [..., N].

    Differentiable in x and w (custom VJP through the same kernel). out_dtype defaults to x's.
    backend: "tpu" / "gpu" (default: the running platform; "tpu" on CPU). interpret=True runs
    on CPU (TPU body in the TPU simulator, GPU body in the generic interpreter);
    interpret=HLO_INTERPRET runs the TPU body in the generic interpreter (see its comment).
    """
    if w_kn.ndim != 2:
        raise ValueError(f"w must be [K, N], got shape {w_kn.shape}")
    cfg = _config(backend, block_sizes, interpret, x_mk.dtype)
    out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
    y = _matmul_2d(_flatten(x_mk, w_kn.shape[0]), w_kn, cfg, out_dtype)
    return y.reshape(*x_mk.shape[:-1], w_kn.shape[1])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "backend", "interpret"))
def int8_matmul(
    x_mk: jax.Array,
    wq_kn: jax.Array,
    scale_n: jax.Array,
    *,
    out_dtype=None,
    block_sizes: MatmulBlockSizes | None = None,
    backend: str | None = None,
    interpret=False,
) -> jax.Array:
    """Weight-only int8 matmul: (x @ wq) * scale; x [..., K], wq int8 [K, N], scale [N].

    The weight tile is cast to x's dtype inside the kernel. Differentiable in x and scale.
    """
    if wq_kn.dtype != jnp.int8 or wq_kn.ndim != 2:
        raise ValueError(f"wq must be int8 [K, N], got {wq_kn.dtype} {wq_kn.shape}")
    if scale_n.shape != (wq_kn.shape[1],):
        raise ValueError(f"scale must have shape ({wq_kn.shape[1]},), got {scale_n.shape}")
    cfg = _config(backend, block_sizes, interpret, x_mk.dtype)
    out_dtype = jnp.dtype(out_dtype or x_mk.dtype)
    y = _int8_matmul_2d(_flatten(x_mk, wq_kn.shape[0]), wq_kn, scale_n, cfg, out_dtype)
    return y.reshape(*x_mk.shape[:-1], wq_kn.shape[1])


def quantize_int8(w_kn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel quantisation: w ~= wq * scale.

    w [K, N] float -> (wq int8 [K, N] in [-127, 127], scale fp32 [N] = max_k |w[:, n]| / 127).
    An all-zero column gets scale 1 (its wq is 0), so nothing divides by zero.
    """
    w32 = w_kn.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=0)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    wq = jnp.clip(jnp.round(w32 / scale[None, :]), -127, 127).astype(jnp.int8)
    return wq, scale


def matmul_reference(x_mk, w_kn, *, out_dtype=None):
    """Pure-jnp x @ w with fp32 accumulation at full precision; x [..., K], w [K, N]."""
    y = jnp.matmul(x_mk, w_kn, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x_mk.dtype)


def int8_matmul_reference(x_mk, wq_kn, scale_n, *, out_dtype=None):
    """Pure-jnp (x @ float(wq)) * scale in fp32; x [..., K], wq int8 [K, N], scale [N]."""
    y = jnp.matmul(
        x_mk.astype(jnp.float32), wq_kn.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    return (y * scale_n.astype(jnp.float32)).astype(out_dtype or x_mk.dtype)


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of one [M,K] x [K,N] product."""
    return 2.0 * m * n * k


__all__ = [
    "HLO_INTERPRET",
    "MatmulBlockSizes",
    "default_matmul_block_sizes",
    "int8_matmul",
    "int8_matmul_reference",
    "matmul",
    "matmul_flops",
    "matmul_reference",
    "quantize_int8",
]
