"""Decode attention (qwen_jax.kernels.decode_attention) against an independent float64 numpy
reference that reads only each sequence's visible cache slice [lo, hi) with
hi = length and lo = max(start, length - window): `start` is the first valid slot of a
left-padded cache (the engine's layout), 0 unless a case has ragged starts.

Both Pallas bodies run here in interpret mode: the TPU body in the TPU simulator, the GPU body in
the generic interpreter. Cache slots outside a sequence's visible range are filled with NaN, so a
kernel that reads (rather than masks) them fails. Both interpreters hand the kernel NaN-filled
output buffers (checked below) and `assert_close` rejects any non-finite value, so an output
block the kernel forgets to write fails (sequence 0 has length 0: its expected zeros cannot be
matched by an unwritten block). The cases, inputs, reference and `check_decode` live in
qwen_jax.testing.kernel_cases; scripts/gpu_check.py runs the same assertions compiled for a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl

from qwen_jax.kernels import decode_attention as da
from qwen_jax.testing.kernel_cases import (
    DECODE_CASES,
    DecodeCase,
    check_decode,
    decode_inputs,
    numpy_decode,
)
from qwen_jax.testing.tolerance import KERNEL_TOL, assert_close


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_kernel_matches_numpy(case, backend):
    check_decode(case, backend=backend, interpret=True)


def test_tpu_head_blocks_match_numpy():
    """GQA with 16 KV heads in two blocks of 8: the head-block index and the per-head slices of
    the [block_s, 8, H] K/V block (a sublane axis of the cache's tile) pick the right heads."""
    case = DecodeCase(b=2, s=300, k=16, g=2, h=128, dtype="float32", window=0, seed=6)
    blocks = da.DecodeBlockSizes(block_s=128, kv_heads_per_block=8)
    check_decode(case, backend="tpu", interpret=True, block_sizes=blocks)


def test_tpu_body_passes_the_cache_as_it_lies():
    """The cache reaches the TPU kernel unreshaped: merging (K, H) into one lane axis is a
    relayout on TPU, a copy of the whole K and V cache per decode step."""
    sds = jax.ShapeDtypeStruct
    fn = lambda q, k, v, n: da.decode_attention(q, k, v, n, backend="tpu")  # noqa: E731
    cache = sds((2, 1024, 4, 128), jnp.bfloat16)
    outer = jax.make_jaxpr(fn)(sds((2, 28, 128), jnp.bfloat16), cache, cache, sds((2,), jnp.int32))
    (jitted,) = outer.eqns  # decode_attention is jitted: its body is one inner jaxpr
    inner = jitted.params["jaxpr"].jaxpr
    (call,) = [e for e in inner.eqns if e.primitive.name == "pallas_call"]
    assert call.invars[-2:] == inner.invars[1:3]  # k and v, untouched


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_reference_matches_numpy(case):
    q, k, v, lengths, starts = decode_inputs(case)
    dt = jnp.dtype(case.dtype)
    out = da.decode_attention_reference(
        *(jnp.asarray(x, dt) for x in (q, k, v)),
        jnp.asarray(lengths),
        window=case.window,
        starts_b=jnp.asarray(starts) if case.starts else None,
    )
    want = numpy_decode(q, k, v, lengths, starts, case.window)
    assert_close(out, want, KERNEL_TOL[case.dtype], str(case))


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
