"""Kernel test cases: problem shapes, inputs, float64 numpy references and the assertions,
shared by tests/test_kernels_*.py and scripts/gpu_check.py (which runs them compiled on a GPU).

Decode: cache slots outside a sequence's visible range are NaN, so a kernel that reads (rather
than masks) them fails; matmul: shapes no block multiple; flash: packed documents, left and right
padding, windows below / across / beyond a block, GQA ratios 1-3. Tolerances: KERNEL_TOL.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels import decode_attention as da
from qwen_jax.kernels import flash_attention_tpu as fa
from qwen_jax.kernels import matmul as mm
from qwen_jax.kernels.flash_attention_common import flash_attention_reference
from qwen_jax.testing.batches import packed_segments
from qwen_jax.testing.tolerance import KERNEL_TOL, assert_close

# ------------------------------------------------------------------------- decode attention

# Small blocks so every case spans several blocks (and, on GPU, several splits).
DECODE_TEST_BLOCKS = {
    "tpu": da.DecodeBlockSizes(block_s=128),
    "gpu": da.DecodeBlockSizes(block_s=32, num_splits=4),
}


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode problem: q [b, k*g, h], cache [b, s, k, h]; window 0 = unlimited.

    starts: rows get ragged first-valid slots (left padding), including empty rows whose
    start equals their length, one of them at start == length == S.
    """

    b: int
    s: int
    k: int
    g: int
    h: int
    dtype: str
    window: int
    seed: int
    starts: bool = False

    def __str__(self):
        name = f"b{self.b}s{self.s}k{self.k}g{self.g}h{self.h}-{self.dtype}-w{self.window}"
        return name + ("-starts" if self.starts else "")


DECODE_CASES = [
    DecodeCase(b=3, s=300, k=2, g=1, h=128, dtype="float32", window=0, seed=0),  # MHA, S % 128 != 0
    DecodeCase(
        b=4, s=256, k=2, g=4, h=64, dtype="float32", window=40, seed=1
    ),  # GQA 4, H=64, window
    DecodeCase(b=2, s=200, k=1, g=7, h=128, dtype="bfloat16", window=0, seed=2),  # Qwen2-7B ratio
    DecodeCase(b=3, s=160, k=2, g=2, h=128, dtype="bfloat16", window=100, seed=3),
    # Left-padded caches: S a multiple of 128 (so start == S would index one block past the end).
    DecodeCase(b=6, s=256, k=2, g=4, h=64, dtype="float32", window=40, seed=4, starts=True),
    DecodeCase(b=6, s=300, k=1, g=2, h=128, dtype="bfloat16", window=0, seed=5, starts=True),
]


def visible_range(length: int, start: int, window: int) -> tuple[int, int]:
    """[lo, hi) of one row, written independently of the kernel's own formula."""
    lo = max(start, length - window) if window else start
    return lo, length


def decode_inputs(case: DecodeCase):
    """Random q/k/v, ragged lengths (always including 0 and S) and starts; invisible slots NaN.

    Returns q, k, v, lengths, starts (all zeros unless case.starts).
    """
    rng = np.random.default_rng(case.seed)
    lengths = rng.integers(1, case.s + 1, size=case.b)
    lengths[0], lengths[-1] = 0, case.s
    starts = np.zeros(case.b, np.int64)
    if case.starts:
        starts = rng.integers(1, np.maximum(lengths, 2))  # 1 <= start < length
        starts[0] = 0
        lengths[1] = case.s // 3
        starts[1] = lengths[1]  # empty: the start reaches the new token's slot + 1
        lengths[2] = starts[2] = case.s  # empty at the very end of the cache
        lengths[3] = case.s // 2
        starts[3] = lengths[3] - 20  # with a window of 40 the start, not the window, bounds lo
    q = rng.standard_normal((case.b, case.k * case.g, case.h))
    k = rng.standard_normal((case.b, case.s, case.k, case.h))
    v = rng.standard_normal((case.b, case.s, case.k, case.h))
    # Round to the case dtype once so the numpy reference sees exactly the kernel's inputs.
    q, k, v = (
        np.asarray(jnp.asarray(x, case.dtype).astype(jnp.float32), np.float64) for x in (q, k, v)
    )
    for bi, (n, st) in enumerate(zip(lengths, starts)):
        lo, hi = visible_range(n, st, case.window)
        k[bi, hi:] = v[bi, hi:] = np.nan
        k[bi, :lo] = v[bi, :lo] = np.nan
    return q, k, v, lengths.astype(np.int32), starts.astype(np.int32)


def numpy_decode(q, k, v, lengths, starts, window):
    """float64 loop over sequences: softmax over k[b, lo:hi] only. Empty range -> zeros."""
    b, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, n, h))
    for bi in range(b):
        lo, hi = visible_range(lengths[bi], starts[bi], window)
        if hi <= lo:
            continue
        for ni in range(n):
            kk, vv = k[bi, lo:hi, ni // g], v[bi, lo:hi, ni // g]
            s = kk @ q[bi, ni] / np.sqrt(h)
            p = np.exp(s - s.max())
            out[bi, ni] = p @ vv / p.sum()
    return out


def check_decode(case: DecodeCase, *, backend: str, interpret, block_sizes=None) -> None:
    """The assertions shared by the tests and scripts/gpu_check.py."""
    q, k, v, lengths, starts = decode_inputs(case)
    expected = numpy_decode(q, k, v, lengths, starts, case.window)
    dt = jnp.dtype(case.dtype)
    out = da.decode_attention(
        jnp.asarray(q, dt),
        jnp.asarray(k, dt),
        jnp.asarray(v, dt),
        jnp.asarray(lengths),
        window=jnp.int32(case.window),  # traced, as in a layer scan with per-layer windows
        starts_b=jnp.asarray(starts) if case.starts else None,
        block_sizes=block_sizes or DECODE_TEST_BLOCKS[backend],
        backend=backend,
        interpret=interpret,
    )
    assert out.dtype == dt and out.shape == q.shape
    assert_close(out, expected, KERNEL_TOL[case.dtype], f"decode {backend} {case}")
    empty = [bi for bi in range(case.b) if lengths[bi] <= starts[bi]] + [0]
    assert not np.any(np.asarray(out[np.array(empty)], np.float32)), "empty rows must give zeros"


# --------------------------------------------------------------------------------- matmul

# Small tiles: every case spans several blocks along M, N and K.
MATMUL_TEST_BLOCKS = {
    "tpu": mm.MatmulBlockSizes(128, 128, 128),
    "gpu": mm.MatmulBlockSizes(32, 64, 32, num_warps=4, num_stages=2),
}


@dataclasses.dataclass(frozen=True)
class MatmulCase:
    """x [*lead, k] @ w [k, n]."""

    lead: tuple[int, ...]
    k: int
    n: int
    dtype: str
    seed: int

    def __str__(self):
        return f"{'x'.join(map(str, self.lead))}x{self.k}x{self.n}-{self.dtype}"


MATMUL_CASES = [
    MatmulCase(lead=(40,), k=300, n=200, dtype="float32", seed=0),
    MatmulCase(lead=(2, 20), k=256, n=384, dtype="bfloat16", seed=1),
]


def _rounded(rng, shape, dtype, scale=1.0):
    x = rng.standard_normal(shape) * scale
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def check_matmul(case: MatmulCase, *, backend: str, interpret, block_sizes=None) -> None:
    """y = x @ w and its VJP (dx, dw) for a random cotangent c, against float64 numpy."""
    rng = np.random.default_rng(case.seed)
    dt, tol = jnp.dtype(case.dtype), KERNEL_TOL[case.dtype]
    x = _rounded(rng, (*case.lead, case.k), dt)
    w = _rounded(rng, (case.k, case.n), dt, case.k**-0.5)
    c = _rounded(rng, (*case.lead, case.n), dt)
    fn = lambda x, w: mm.matmul(  # noqa: E731
        x,
        w,
        block_sizes=block_sizes or MATMUL_TEST_BLOCKS[backend],
        backend=backend,
        interpret=interpret,
    )
    y, vjp = jax.vjp(fn, jnp.asarray(x, dt), jnp.asarray(w, dt))
    dx, dw = vjp(jnp.asarray(c, dt))
    x2, c2 = x.reshape(-1, case.k), c.reshape(-1, case.n)
    assert y.dtype == dt and dx.dtype == dt and dw.dtype == dt
    assert_close(y, x @ w, tol, f"matmul y {backend} {case}")
    assert_close(dx, c @ w.T, tol, f"matmul dx {backend} {case}")
    assert_close(dw, x2.T @ c2, tol, f"matmul dw {backend} {case}")


def check_int8_matmul(case: MatmulCase, *, backend: str, interpret, block_sizes=None) -> None:
    """y = (x @ wq) * scale and its VJP in x and scale, against float64 numpy."""
    rng = np.random.default_rng(case.seed + 100)
    dt, tol = jnp.dtype(case.dtype), KERNEL_TOL[case.dtype]
    x = _rounded(rng, (*case.lead, case.k), dt)
    wq, scale = mm.quantize_int8(jnp.asarray(rng.standard_normal((case.k, case.n)), jnp.float32))
    c = _rounded(rng, (*case.lead, case.n), dt)
    fn = lambda x, s: mm.int8_matmul(  # noqa: E731
        x,
        wq,
        s,
        block_sizes=block_sizes or MATMUL_TEST_BLOCKS[backend],
        backend=backend,
        interpret=interpret,
    )
    y, vjp = jax.vjp(fn, jnp.asarray(x, dt), scale)
    dx, dscale = vjp(jnp.asarray(c, dt))
    wq64, s64 = np.asarray(wq, np.float64), np.asarray(scale, np.float64)
    x2, c2 = x.reshape(-1, case.k), c.reshape(-1, case.n)
    assert y.dtype == dt and dx.dtype == dt and dscale.dtype == jnp.float32
    assert_close(y, (x @ wq64) * s64, tol, f"int8 y {backend} {case}")
    assert_close(dx, (c * s64) @ wq64.T, tol, f"int8 dx {backend} {case}")
    assert_close(dscale, np.sum(c2 * (x2 @ wq64), axis=0), tol, f"int8 dscale {backend} {case}")


# ------------------------------------------------------------------------ flash attention


@dataclasses.dataclass(frozen=True)
class FlashCase:
    """q [b, t, k*g, h], k/v [b, t, k, h]; window 0 = unlimited."""

    b: int
    t: int
    k: int
    g: int
    h: int
    dtype: str
    window: int
    seed: int
    blocks: bsz.FlashBlockSizes | None = None  # None: the CPU defaults (128 everywhere)

    def __str__(self):
        return f"b{self.b}t{self.t}k{self.k}g{self.g}h{self.h}-{self.dtype}-w{self.window}"


FLASH_MIXED_BLOCKS = bsz.FlashBlockSizes(256, 128, 128, 256, 256, 128)
FLASH_CASES = [
    FlashCase(b=2, t=200, k=2, g=2, h=32, dtype="float32", window=0, seed=0),
    FlashCase(b=1, t=256, k=1, g=2, h=128, dtype="float32", window=50, seed=1),
    FlashCase(
        b=2, t=300, k=2, g=3, h=64, dtype="float32", window=130, seed=2, blocks=FLASH_MIXED_BLOCKS
    ),
    FlashCase(b=2, t=250, k=2, g=1, h=128, dtype="bfloat16", window=0, seed=3),
    FlashCase(
        b=1, t=384, k=1, g=3, h=64, dtype="bfloat16", window=200, seed=4, blocks=FLASH_MIXED_BLOCKS
    ),
]


def flash_inputs(case: FlashCase):
    """q, k, v, segment ids (packed, padded) and an output cotangent, in the case dtype."""
    rng = np.random.default_rng(case.seed)
    dt = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((case.b, case.t, case.k * case.g, case.h)), dt)
    k = jnp.asarray(rng.standard_normal((case.b, case.t, case.k, case.h)), dt)
    v = jnp.asarray(rng.standard_normal((case.b, case.t, case.k, case.h)), dt)
    do = jnp.asarray(rng.standard_normal(q.shape), dt)
    return q, k, v, jnp.asarray(packed_segments(case.b, case.t, rng)), do


def numpy_attention(q, k, v, seg, window):
    """float64 loops: softmax over the visible keys; padding queries average all keys."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    seg = np.asarray(seg)
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros(q.shape)
    for bi in range(b):
        for ti in range(t):
            keys = np.arange(t)
            vis = (keys <= ti) & (seg[bi] == seg[bi, ti]) & (seg[bi] != 0)
            if window:
                vis &= ti - keys < window
            for ni in range(n):
                if not vis.any():  # all-masked row: uniform softmax, like the XLA path
                    out[bi, ti, ni] = v[bi, :, ni // g].mean(0)
                    continue
                s = k[bi, vis, ni // g] @ q[bi, ti, ni] / np.sqrt(h)
                p = np.exp(s - s.max())
                out[bi, ti, ni] = p @ v[bi, vis, ni // g] / p.sum()
    return out


def flash_kernel_and_vjp(q, k, v, seg, do, window, blocks):
    """The TPU kernel (interpret mode) and its VJP at `do`, the window traced."""

    @jax.jit
    def run(q, k, v, seg, do, window):
        def f(q, k, v):
            return fa.flash_attention(
                q, k, v, seg, window=window, block_sizes=blocks, interpret=True
            )

        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    return run(q, k, v, seg, do, jnp.int32(window))  # window traced, as in the layer scan


def flash_reference_and_vjp(q, k, v, seg, do, window):
    """The reference in fp32 from the (possibly bf16-rounded) inputs."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o, vjp = jax.vjp(lambda q, k, v: flash_attention_reference(q, k, v, seg, window=window), *f32)
    return o, vjp(do.astype(jnp.float32))


# Small tiles so every case spans several tiles in both loops; fwd/bwd tiles differ on purpose.
GPU_SMALL_BLOCKS = bsz.FlashBlockSizes(32, 16, 16, 32, 32, 16)
GPU_FLASH_CASES = [
    # head dim 24 is padded to 32 inside; length 100 is padded to 128
    FlashCase(
        b=2, t=100, k=2, g=2, h=24, dtype="float32", window=0, seed=10, blocks=GPU_SMALL_BLOCKS
    ),
    FlashCase(
        b=1, t=96, k=1, g=3, h=32, dtype="bfloat16", window=20, seed=11, blocks=GPU_SMALL_BLOCKS
    ),
]


def check_gpu_flash(case: FlashCase, *, interpret: bool) -> None:
    """The GPU flash kernel's forward and q/k/v gradients against the fp32 reference.

    The one GPU flash-attention check: tests/test_kernels_flash_gpu.py runs it interpreted on
    CPU and compiled on a GPU, scripts/gpu_check.py compiled on the GPU. The reference runs at
    full fp32 precision (no TF32 on a GPU; on CPU this is the default anyway).
    """
    from qwen_jax.kernels import flash_attention_gpu as fg

    q, k, v, seg, do = flash_inputs(case)

    @jax.jit
    def run(q, k, v, seg, do, window):
        def f(q, k, v):
            return fg.flash_attention(
                q, k, v, seg, window=window, block_sizes=case.blocks, interpret=interpret
            )

        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    o, grads = run(q, k, v, seg, do, jnp.int32(case.window))
    with jax.default_matmul_precision("float32"):
        o_ref, grads_ref = flash_reference_and_vjp(q, k, v, seg, do, case.window)
    tol = KERNEL_TOL[case.dtype]
    assert o.dtype == q.dtype and o.shape == q.shape
    assert_close(o, o_ref, tol, f"gpu forward {case}")
    for name, got, want in zip("dq dk dv".split(), grads, grads_ref):
        assert_close(got, want, tol, f"gpu {name} {case}")
