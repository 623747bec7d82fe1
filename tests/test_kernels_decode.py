"""Decode attention (qwen_jax.kernels.decode_attention) against an independent float64 numpy
reference that reads only each sequence's visible cache slice [lo, hi) with
hi = length and lo = max(start, length - window): `start` is the first valid slot of a
left-padded cache (the engine's layout), 0 unless a case has ragged starts.

Both Pallas bodies run here in interpret mode: the TPU body in the TPU simulator, the GPU body in
the generic interpreter. Cache slots outside a sequence's visible range are filled with NaN, so a
kernel that reads (rather than masks) them fails. Both interpreters hand the kernel NaN-filled
output buffers (checked below) and `assert_close` rejects any non-finite value, so an output
block the kernel forgets to write fails (sequence 0 has length 0: its expected zeros cannot be
matched by an unwritten block). scripts/gpu_check.py imports `CASES` / `check_decode` and runs the
same assertions compiled for a real GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from qwen_jax.kernels import decode_attention as da

TOL = {"float32": 1e-5, "bfloat16": 2e-2}
# Small blocks so every case spans several blocks (and, on GPU, several splits).
TEST_BLOCKS = {
    "tpu": da.DecodeBlockSizes(block_s=128),
    "gpu": da.DecodeBlockSizes(block_s=32, num_splits=4),
}


def assert_close(actual, expected, rel: float, what: str = "") -> None:
    """Max-norm relative error: max|a - e| <= rel * max|e|. Non-finite values always fail."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: {np.sum(~np.isfinite(actual))} non-finite values"
    assert np.isfinite(expected).all(), f"{what}: reference has non-finite values"
    scale = max(np.max(np.abs(expected)), 1e-30)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"


@dataclasses.dataclass(frozen=True)
class Case:
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


CASES = [
    Case(b=3, s=300, k=2, g=1, h=128, dtype="float32", window=0, seed=0),  # MHA, S % 128 != 0
    Case(b=4, s=256, k=2, g=4, h=64, dtype="float32", window=40, seed=1),  # GQA 4, H=64, window
    Case(b=2, s=200, k=1, g=7, h=128, dtype="bfloat16", window=0, seed=2),  # Qwen2-7B ratio
    Case(b=3, s=160, k=2, g=2, h=128, dtype="bfloat16", window=100, seed=3),
    # Left-padded caches: S a multiple of 128 (so start == S would index one block past the end).
    Case(b=6, s=256, k=2, g=4, h=64, dtype="float32", window=40, seed=4, starts=True),
    Case(b=6, s=300, k=1, g=2, h=128, dtype="bfloat16", window=0, seed=5, starts=True),
]


def visible_range(length: int, start: int, window: int) -> tuple[int, int]:
    """[lo, hi) of one row, written independently of the kernel's own formula."""
    lo = max(start, length - window) if window else start
    return lo, length


def make_inputs(case: Case):
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


def check_decode(case: Case, *, backend: str, interpret, block_sizes=None) -> None:
    """The assertions shared by the tests and scripts/gpu_check.py."""
    q, k, v, lengths, starts = make_inputs(case)
    expected = numpy_decode(q, k, v, lengths, starts, case.window)
    dt = jnp.dtype(case.dtype)
    out = da.decode_attention(
        jnp.asarray(q, dt),
        jnp.asarray(k, dt),
        jnp.asarray(v, dt),
        jnp.asarray(lengths),
        window=jnp.int32(case.window),  # traced, as in a layer scan with per-layer windows
        starts_b=jnp.asarray(starts) if case.starts else None,
        block_sizes=block_sizes or TEST_BLOCKS[backend],
        backend=backend,
        interpret=interpret,
    )
    assert out.dtype == dt and out.shape == q.shape
    assert_close(out, expected, TOL[case.dtype], f"decode {backend} {case}")
    empty = [bi for bi in range(case.b) if lengths[bi] <= starts[bi]] + [0]
    assert not np.any(np.asarray(out[np.array(empty)], np.float32)), "empty rows must give zeros"


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_decode_kernel_matches_numpy(case, backend):
    check_decode(case, backend=backend, interpret=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_numpy(case):
    q, k, v, lengths, starts = make_inputs(case)
    dt = jnp.dtype(case.dtype)
    out = da.decode_attention_reference(
        *(jnp.asarray(x, dt) for x in (q, k, v)),
        jnp.asarray(lengths),
        window=case.window,
        starts_b=jnp.asarray(starts) if case.starts else None,
    )
    want = numpy_decode(q, k, v, lengths, starts, case.window)
    assert_close(out, want, TOL[case.dtype], str(case))


def test_assert_close_rejects_nan_and_error():
    ref = np.ones((2, 3))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.where(np.eye(2, 3) > 0, np.nan, 1.0), ref, 1.0)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(ref * (1 + 2e-5), ref, 1e-5)


@pytest.mark.parametrize("interpret", [da.TPU_INTERPRET, True], ids=["tpu", "gpu"])
def test_interpreters_poison_unwritten_output(interpret):
    """The premise of the poisoning argument: output the kernel never writes comes back NaN.

    Only the last of three blocks is written. In the TPU simulator, as on a TPU, the VMEM output
    buffer is reused between grid steps, so a skipped write after the first step would show the
    previous block's (wrong, hence still failing) values; a fresh buffer is NaN.
    """

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == pl.num_programs(0) - 1)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((24, 128), jnp.float32)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(3,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        interpret=interpret,
    )(x)
    assert np.all(np.isnan(np.asarray(out[:8]))) and np.all(np.asarray(out[16:]) == 1)


def _shapes(b, s, k, g, h, dtype):
    sds = jax.ShapeDtypeStruct
    return (
        sds((b, k * g, h), dtype),
        sds((b, s, k, h), dtype),
        sds((b, s, k, h), dtype),
        sds((b,), jnp.int32),
    )


def test_oversized_and_illegal_blocks_fail_clearly():
    shapes = _shapes(1, 65536, 1, 1, 128, jnp.bfloat16)

    def run(backend, **block):
        fn = lambda q, k, v, n: da.decode_attention(  # noqa: E731
            q, k, v, n, backend=backend, block_sizes=da.DecodeBlockSizes(**block)
        )
        return jax.eval_shape(fn, *shapes)

    with pytest.raises(ValueError, match=r"block_s=65536.*VMEM"):
        run("tpu", block_s=65536)
    with pytest.raises(ValueError, match=r"block_s=1024.*shared memory"):
        run("gpu", block_s=1024)
    with pytest.raises(ValueError, match="block_s=100 must be a multiple of 128"):
        run("tpu", block_s=100)
    with pytest.raises(ValueError, match="block_s=48 must be a power of two"):
        run("gpu", block_s=48)
    with pytest.raises(ValueError, match="kv_heads_per_block=3"):
        run("tpu", block_s=128, kv_heads_per_block=3)


def test_gpu_kernel_lowers_to_triton():
    """The GPU body lowers for CUDA on this CPU host (Triton IR; PTX compilation needs a GPU)."""
    fn = lambda q, k, v, n: da.decode_attention(q, k, v, n, window=8, backend="gpu")  # noqa: E731
    for dtype in (jnp.bfloat16, jnp.float32):
        exported = export.export(
            jax.jit(fn),
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*_shapes(4, 1000, 4, 7, 128, dtype))
        assert "xla.gpu.triton" in exported.mlir_module()
