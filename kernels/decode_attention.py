"""Decode attention: one new query token per sequence against a KV cache (a ragged batch).

    o[b, n] = softmax_s( q[b, n] . k[b, s, n // G] / sqrt(H) ) . v[b, s, n // G]

over the visible slots  lo[b] <= s < hi[b]  with
    hi[b] = lengths[b],   lo[b] = max(starts[b], hi[b] - window)   (window == 0: lo[b] = starts[b])
The new token has already been written at slot lengths[b] - 1, so this is the model's causal and
window rule (`qwen_jax.model.attention.attention_mask`) with q_slot = lengths[b] - 1. `starts`
(default 0) is the first valid slot of a left-padded cache: the slots before it are padding. A
sequence whose range is empty (lengths[b] == 0, or starts[b] >= lengths[b]) sees no key and its
output is defined as zeros (lengths and starts are clipped to [0, S]). Slots outside the visible
range are never read into the result, so stale or NaN cache entries there cannot leak.

Shapes: q [B, N, H], k/v [B, S, K, H] with N = K * G (GQA; MHA is G == 1), lengths and starts
[B] int32.
Softmax statistics and accumulation are fp32; the output has q's dtype.

Two Pallas bodies, one per backend, behind the single wrapper `decode_attention`:
  * TPU (Mosaic): grid (B, K / kv_heads_per_block, S / block_s); the S axis is a sequential
    reduction with the running max / sum / accumulator in VMEM scratch. K/V blocks are
    [block_s, heads, H] slices of the 4-D cache as it lies in HBM (tiled over its last two axes,
    heads and H); each head is sliced out in VMEM. Merging heads into the lane axis instead
    (k.reshape(B, S, K * H)) is a relayout on TPU: the compiler copied the whole cache every step.
    The K/V block index is clamped to the visible range, so blocks past a sequence's length (or
    before its window) are never fetched from HBM: the pipeline sees an unchanged block index
    and skips the copy.
  * GPU (Triton): grid (B, K, num_splits). Each program loops over the visible blocks of its S
    split with masked loads (nothing outside [lo, hi) is read), and the splits are combined with
    their softmax statistics afterwards. Splitting S keeps all SMs busy at batch 1.
Both bodies run on CPU with `interpret=True`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Finite, so that exp(mask - max) is 0 rather than NaN when a whole row is masked.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Lane width of the fp32 statistics scratch on TPU (one vreg row per query row).
_LANES = 128
# Mosaic's default scoped-VMEM limit on v4 and v5e, the tightest of our targets: a kernel that
# fits it compiles on v4, v5e, v5p and v6e without raising vmem_limit_bytes.
TPU_VMEM_BUDGET_BYTES = 16 * 1024 * 1024
# Shared memory per thread block on H100/H200 (227 KiB usable).
GPU_SMEM_BUDGET_BYTES = 227 * 1024
# What `interpret=True` means for the TPU bodies: the TPU simulator, with every freshly allocated
# buffer (outputs included) filled with NaN so an output block the kernel never writes fails.
TPU_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")
# Any other truthy `interpret` (this value, for one) runs the TPU bodies in pallas_call's HLO
# interpreter: a jitted loop over the grid without the simulator's checks, but also without its
# side effects, so it works under `jax.checkpoint` and with different kernels in flight on
# several (fake) devices at once, where the simulator, whose devices meet at one global barrier
# per kernel, deadlocks. qwen_jax.model.dispatch uses it for the model's matmuls on CPU.
HLO_INTERPRET = "hlo"


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Tiling of the decode kernel.

    block_s: KV cache slots per step. TPU: a multiple of 128 (clamped to S when S is smaller).
        GPU: a power of two >= 16.
    kv_heads_per_block: TPU only; KV heads handled per grid step: a divisor of K that is a
        multiple of 8 or K itself (the heads axis is a sublane axis of the block). None picks
        the smallest such divisor: 8 heads for K = 32 (16 bf16 heads at block_s 512 ran out of
        v5e's scoped VMEM in the AOT compile: the per-head loop is unrolled), all K for GQA.
    num_splits: GPU only; the S axis is cut into this many independent splits (clamped to the
        number of blocks) that run in parallel and are merged with their softmax statistics.
    """

    block_s: int
    kv_heads_per_block: int | None = None
    num_splits: int = 1


def default_decode_block_sizes(backend: str) -> DecodeBlockSizes:
    """Defaults per backend. TPU: large blocks amortise the ~0.35 us per grid step; 512 slots of
    8 bf16 heads (padded to 16 sublanes) are 2 MiB per K/V buffer, so k and v double-buffered
    fill half the VMEM budget. GPU: tiles stay small (the query tile is only 16 rows) and splits
    fill the SMs at small batch."""
    if backend == "tpu":
        return DecodeBlockSizes(block_s=512)
    if backend == "gpu":
        return DecodeBlockSizes(block_s=64, num_splits=16)
    raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")


def _visible_range(lengths_b, window, s_len, starts_b=None):
    """[lo, hi) of visible slots per sequence, both int32 [B]; lo may exceed hi (empty)."""
    hi = jnp.clip(lengths_b.astype(jnp.int32), 0, s_len)
    window = jnp.asarray(window, jnp.int32)
    lo = jnp.where(window > 0, jnp.maximum(hi - window, 0), 0)
    if starts_b is not None:
        lo = jnp.maximum(lo, jnp.clip(starts_b.astype(jnp.int32), 0, s_len))
    return lo, hi


def decode_attention_reference(q_bnh, k_bskh, v_bskh, lengths_b, *, window=0, starts_b=None):
    """Pure-jnp decode attention (see module docstring). q [B,N,H], k/v [B,S,K,H] -> [B,N,H]."""
    b, n, h = q_bnh.shape
    s_len, k_heads = k_bskh.shape[1], k_bskh.shape[2]
    lo, hi = _visible_range(lengths_b, window, s_len, starts_b)
    s = jnp.arange(s_len, dtype=jnp.int32)
    visible_bs = (s[None, :] >= lo[:, None]) & (s[None, :] < hi[:, None])
    q_bkgh = q_bnh.reshape(b, k_heads, n // k_heads, h)
    scores = jnp.einsum(
        "bkgh,bskh->bkgs",
        q_bkgh,
        k_bskh,
        preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    ) * (h**-0.5)
    visible = visible_bs[:, None, None, :]
    scores = jnp.where(visible, scores, _MASK_VALUE)
    probs = jnp.where(visible, jax.nn.softmax(scores, axis=-1), 0.0)
    # where, not multiply: a NaN in an invisible cache slot must not reach the output.
    v_masked = jnp.where(visible_bs[:, :, None, None], v_bskh, 0).astype(jnp.float32)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v_masked, precision=lax.Precision.HIGHEST)
    return out.reshape(b, n, h).astype(q_bnh.dtype)


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic)
# ---------------------------------------------------------------------------------------------


def _tpu_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, block_s, n_heads, head_dim
):
    """One (b, head block, S block) step. q/o [heads, G, H], k/v [block_s, heads, H]."""
    b, s_blk = pl.program_id(0), pl.program_id(2)
    lo, hi = lo_ref[b], hi_ref[b]
    start = s_blk * block_s

    @pl.when(s_blk == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, _MASK_VALUE)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when((start < hi) & (start + block_s > lo))
    def _step():
        slot_row = start + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        slot_col = start + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0)
        valid_row = (slot_row >= lo) & (slot_row < hi)
        valid_col = (slot_col >= lo) & (slot_col < hi)
        for j in range(n_heads):  # static: heads share the fetched K/V block
            q = q_ref[j]  # [G, H]
            k = k_ref[:, j, :]  # [block_s, H]: a strided sublane load in VMEM
            v = v_ref[:, j, :]
            # Slots past the array end (last partial block) hold undefined data: zero them.
            v = jnp.where(valid_col, v, jnp.zeros_like(v))
            s = lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            ) * (head_dim**-0.5)
            s = jnp.where(valid_row, s, _MASK_VALUE)  # [G, block_s]
            m_prev = m_sc[j][:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            p = jnp.where(valid_row, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_new = alpha * l_sc[j][:, :1] + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            acc_sc[j] = alpha * acc_sc[j] + pv
            m_sc[j] = jnp.broadcast_to(m_new, m_sc.shape[1:])
            l_sc[j] = jnp.broadcast_to(l_new, l_sc.shape[1:])

    @pl.when(s_blk == pl.num_programs(2) - 1)
    def _finish():
        for j in range(n_heads):
            l = l_sc[j][:, :1]
            safe_l = jnp.where(l > 0, l, 1.0)
            o_ref[j] = jnp.where(l > 0, acc_sc[j] / safe_l, 0.0).astype(o_ref.dtype)


def _sublanes(dtype) -> int:
    """Rows of one VMEM tile of `dtype` (8 x 32-bit rows, packed: 16 bf16, 32 int8)."""
    return 32 // jnp.dtype(dtype).itemsize


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tpu_heads_per_block(k_heads, requested):
    if requested is not None:
        if k_heads % requested or (requested % 8 and requested != k_heads):
            raise ValueError(
                f"DecodeBlockSizes.kv_heads_per_block={requested} must divide K={k_heads} and "
                "be a multiple of 8 or K itself (heads are the K/V block's sublane axis)"
            )
        return requested
    for d in range(8, k_heads, 8):
        if k_heads % d == 0:
            return d
    return k_heads


def _tpu_vmem_bytes(block_s, heads, g, head_dim, kv_dtype, q_dtype):
    """VMEM of one grid step, with each tile's sublane and lane padding."""
    lanes = _round_up(head_dim, 128)
    kv_tile = _round_up(heads, _sublanes(kv_dtype)) * lanes * jnp.dtype(kv_dtype).itemsize
    kv = 2 * 2 * block_s * kv_tile  # k, v; 2 buffers; one [heads, H] tile row per slot
    qo = 2 * 2 * heads * _round_up(g, _sublanes(q_dtype)) * lanes * jnp.dtype(q_dtype).itemsize
    scratch = heads * _round_up(g, 8) * (2 * _LANES + lanes) * 4
    return kv + qo + scratch


def _decode_tpu(q_bnh, k_bskh, v_bskh, lo_b, hi_b, bs: DecodeBlockSizes, interpret):
    b, n, h = q_bnh.shape
    s_len, k_heads = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k_heads
    if bs.block_s % 128:
        raise ValueError(f"DecodeBlockSizes.block_s={bs.block_s} must be a multiple of 128 on TPU")
    block_s = min(bs.block_s, s_len)
    heads = _tpu_heads_per_block(k_heads, bs.kv_heads_per_block)
    need = _tpu_vmem_bytes(block_s, heads, g, h, k_bskh.dtype, q_bnh.dtype)
    if need > TPU_VMEM_BUDGET_BYTES:
        raise ValueError(
            f"DecodeBlockSizes(block_s={block_s}, kv_heads_per_block={heads}) needs "
            f"{need / 2**20:.1f} MiB of VMEM, over the {TPU_VMEM_BUDGET_BYTES / 2**20:.0f} MiB "
            "budget; use a smaller block_s or kv_heads_per_block"
        )
    n_s = pl.cdiv(s_len, block_s)

    def kv_index(bi, hi_blk, si, lo_ref, hi_ref):
        # Clamp to the blocks this sequence sees: an unchanged index means no new DMA. An empty
        # range may start at lo == S (starts == S): keep that block index inside the array.
        first = jnp.minimum(lo_ref[bi] // block_s, n_s - 1)
        last = jnp.maximum(pl.cdiv(hi_ref[bi], block_s) - 1, first)
        return bi, jnp.clip(si, first, last), hi_blk, 0

    q_spec = pl.BlockSpec((None, heads, g, h), lambda bi, hb, si, lo, hi: (bi, hb, 0, 0))
    kv_spec = pl.BlockSpec((None, block_s, heads, h), kv_index)
    kernel = functools.partial(_tpu_kernel, block_s=block_s, n_heads=heads, head_dim=h)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, k_heads, g, h), q_bnh.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, k_heads // heads, n_s),
            in_specs=[q_spec, kv_spec, kv_spec],
            out_specs=q_spec,
            scratch_shapes=[
                pltpu.VMEM((heads, g, _LANES), jnp.float32),
                pltpu.VMEM((heads, g, _LANES), jnp.float32),
                pltpu.VMEM((heads, g, h), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=TPU_INTERPRET if interpret is True else interpret,
        name="decode_attention_tpu",
    )(
        lo_b,
        hi_b,
        q_bnh.reshape(b, k_heads, g, h),  # small; the cache is passed as it lies in HBM
        k_bskh,
        v_bskh,
    )
    return out.reshape(b, n, h)


# ---------------------------------------------------------------------------------------------
# GPU (Triton)
# ---------------------------------------------------------------------------------------------


def _gpu_kernel(
    lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, block_s, split_len, head_dim
):
    """One (b, kv head, split) program. q [Gp, H], k/v [S, H] (strided views), outputs for the
    split: o [Gp, H] unnormalised fp32, m and l [Gp] softmax max and sum."""
    split = pl.program_id(2)
    lo = jnp.maximum(lo_ref[...], split * split_len)
    hi = jnp.minimum(hi_ref[...], (split + 1) * split_len)
    first = lo // block_s
    n_blocks = jnp.where(hi > lo, pl.cdiv(hi, block_s) - first, 0)
    q = q_ref[...]
    gp = q.shape[0]
    # Triton's default for fp32 dots is TF32 (~1e-3 relative): ask for IEEE fp32 instead, so
    # the fp32 tolerance measures fp32 (the first H200 run failed at 5e-4 without this).
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry):
        acc, m_prev, l_prev = carry
        start = (first + i) * block_s
        slot = start + lax.broadcasted_iota(jnp.int32, (block_s,), 0)
        valid = (slot >= lo) & (slot < hi)
        load_mask = jnp.broadcast_to(valid[:, None], (block_s, head_dim))
        # Masked loads: slots outside [lo, hi) (and past the array end) are never read.
        k = pltriton.load(k_ref.at[pl.ds(start, block_s), :], mask=load_mask, other=0.0)
        v = pltriton.load(v_ref.at[pl.ds(start, block_s), :], mask=load_mask, other=0.0)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
        )
        s = jnp.where(valid[None, :], s * (head_dim**-0.5), _MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=prec,
            preferred_element_type=jnp.float32,
        )
        return alpha[:, None] * acc + pv, m_new, alpha * l_prev + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((gp, head_dim), jnp.float32),
        jnp.full((gp,), _MASK_VALUE, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _decode_gpu(q_bnh, k_bskh, v_bskh, lo_b, hi_b, bs: DecodeBlockSizes, interpret):
    b, n, h = q_bnh.shape
    s_len, k_heads = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k_heads
    block_s = bs.block_s
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"DecodeBlockSizes.block_s={block_s} must be a power of two >= 16 on GPU")
    if h < 16 or h & (h - 1):
        raise ValueError(f"head dim H={h} must be a power of two >= 16 for the GPU kernel")
    # Triton tiles are powers of two and tensor-core dots need >= 16 rows: pad the query group.
    # Decode is memory bound, so the padded rows cost nothing that matters.
    gp = max(16, pl.next_power_of_2(g))
    # k/v tiles (2 stages) + the fp32 score and accumulator tiles must fit shared memory.
    need = 2 * 2 * block_s * h * jnp.dtype(k_bskh.dtype).itemsize + 4 * gp * (block_s + h)
    if need > GPU_SMEM_BUDGET_BYTES:
        raise ValueError(
            f"DecodeBlockSizes.block_s={block_s} needs {need // 1024} KiB of shared memory, over "
            f"the {GPU_SMEM_BUDGET_BYTES // 1024} KiB per block; use a smaller block_s"
        )
    splits = max(1, min(bs.num_splits, pl.cdiv(s_len, block_s)))
    split_len = pl.cdiv(pl.cdiv(s_len, splits), block_s) * block_s
    q_bkgh = q_bnh.reshape(b, k_heads, g, h)
    if gp != g:
        q_bkgh = jnp.pad(q_bkgh, ((0, 0), (0, 0), (0, gp - g), (0, 0)))

    scalar = pl.BlockSpec((None,), lambda bi, ki, si: (bi,))
    kv_spec = pl.BlockSpec((None, s_len, None, h), lambda bi, ki, si: (bi, 0, ki, 0))
    kernel = functools.partial(_gpu_kernel, block_s=block_s, split_len=split_len, head_dim=h)
    acc, m, l = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((b, k_heads, splits, gp, h), jnp.float32),
            jax.ShapeDtypeStruct((b, k_heads, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, k_heads, splits, gp), jnp.float32),
        ],
        grid=(b, k_heads, splits),
        in_specs=[
            scalar,
            scalar,
            pl.BlockSpec((None, None, gp, h), lambda bi, ki, si: (bi, ki, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, gp, h), lambda bi, ki, si: (bi, ki, si, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0)),
            pl.BlockSpec((None, None, None, gp), lambda bi, ki, si: (bi, ki, si, 0)),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_gpu",
    )(lo_b, hi_b, q_bkgh, k_bskh, v_bskh)
    # Merge the splits: rescale each by exp(m_split - m_max). Empty splits have l == 0, acc == 0.
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_max)
    l_tot = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * acc, axis=2)
    o = jnp.where(l_tot[..., None] > 0, o / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
    return o[:, :, :g].reshape(b, n, h).astype(q_bnh.dtype)


def _default_backend() -> str:
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend", "interpret"))
def decode_attention(
    q_bnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    lengths_b: jax.Array,
    *,
    window: jax.Array | int = 0,
    starts_b: jax.Array | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    backend: str | None = None,
    interpret=False,
) -> jax.Array:
    """Pallas decode attention; q [B,N,H], k/v [B,S,K,H], lengths [B] int32 -> o [B,N,H].

    window: int or traced int32 scalar, 0 = unlimited. starts_b: [B] int32 first valid slot of
    each row (a left-padded cache), None = 0. backend: "tpu" or "gpu" (default: the
    running platform; "tpu" on CPU). interpret: True runs the kernel on CPU (the TPU body in
    the TPU simulator, the GPU body in the generic interpreter), or pass interpret params.
    """
    b, n, h = q_bnh.shape
    if k_bskh.shape != v_bskh.shape or k_bskh.shape[0] != b or k_bskh.shape[3] != h:
        raise ValueError(f"k {k_bskh.shape} / v {v_bskh.shape} do not match q {q_bnh.shape}")
    if n % k_bskh.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of KV heads K={k_bskh.shape[2]}")
    if lengths_b.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {lengths_b.shape}")
    if starts_b is not None and starts_b.shape != (b,):
        raise ValueError(f"starts must have shape ({b},), got {starts_b.shape}")
    backend = backend or _default_backend()
    block_sizes = block_sizes or default_decode_block_sizes(backend)
    lo_b, hi_b = _visible_range(lengths_b, window, k_bskh.shape[1], starts_b)
    impl = {"tpu": _decode_tpu, "gpu": _decode_gpu}.get(backend)
    if impl is None:
        raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
    return impl(q_bnh, k_bskh, v_bskh, lo_b, hi_b, block_sizes, interpret)


def decode_attention_flops(b: int, n: int, s: int, h: int) -> float:
    """FLOPs of a full-length decode step (two matmuls), for throughput reporting."""
    return 4.0 * b * n * s * h


__all__ = [
    "DecodeBlockSizes",
    "decode_attention",
    "decode_attention_flops",
    "decode_attention_reference",
    "default_decode_block_sizes",
]
