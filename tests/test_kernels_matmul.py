"""Tiled matmul and weight-only int8 matmul (qwen_jax.kernels.matmul) against float64 numpy.

Forward and backward (the custom VJP runs the same kernel with transposed operands) in interpret
mode for both Pallas bodies; shapes are not multiples of the blocks, so the GPU wrapper's padding,
the TPU body's partial last blocks and masked K tail (it never pads: the jaxpr test below), and
several blocks along every axis are exercised. Interpreter outputs start as NaN (see
test_kernels_decode.py) and `assert_close` rejects non-finite values. The cases and checks live
in qwen_jax.testing.kernel_cases; scripts/gpu_check.py runs them compiled for a real GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.extend.core import jaxprs_in_params

from qwen_jax.kernels import matmul as mm
from qwen_jax.testing.kernel_cases import (
    MATMUL_CASES,
    MatmulCase,
    check_int8_matmul,
    check_matmul,
)
from qwen_jax.testing.tolerance import assert_close


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", MATMUL_CASES, ids=str)
def test_matmul_and_grads_match_numpy(case, backend):
    check_matmul(case, backend=backend, interpret=True)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", MATMUL_CASES, ids=str)
def test_int8_matmul_and_grads_match_numpy(case, backend):
    check_int8_matmul(case, backend=backend, interpret=True)


# M spans 3 blocks (the last partial), K = 384 is a multiple of 128 but not of block_k = 256
# (the TPU body picks the dividing K block 128), N = 200 ends in a partial block.
TPU_EDGE_BLOCKS = mm.MatmulBlockSizes(128, 128, 256)
TPU_EDGE_CASE = MatmulCase(lead=(300,), k=384, n=200, dtype="float32", seed=5)


def test_tpu_partial_blocks_match_numpy():
    check_matmul(TPU_EDGE_CASE, backend="tpu", interpret=True, block_sizes=TPU_EDGE_BLOCKS)
    check_int8_matmul(TPU_EDGE_CASE, backend="tpu", interpret=True, block_sizes=TPU_EDGE_BLOCKS)


def test_tpu_body_never_pads_or_slices():
    """At the LM head's shape (151936 columns: no multiple of 512) the TPU forward and
    backward are bare kernel calls: a pad of the weight would copy all of it in HBM per call."""
    sds = jax.ShapeDtypeStruct

    def step(x, w, wq, scale):
        def loss(x, w, scale):
            y = mm.matmul(x, w, backend="tpu") + mm.int8_matmul(x, wq, scale, backend="tpu")
            return jnp.sum(y.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(x, w, scale)

    x, w = sds((100, 4096), jnp.bfloat16), sds((4096, 151_936), jnp.bfloat16)
    wq, scale = sds((4096, 151_936), jnp.int8), sds((151_936,), jnp.float32)
    jaxpr = jax.make_jaxpr(step)(x, w, wq, scale)

    def prims(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                continue  # the kernel body itself
            yield eqn.primitive.name
            for sub in jaxprs_in_params(eqn.params):
                yield from prims(sub)

    names = set(prims(jaxpr.jaxpr))
    assert not names & {"pad", "slice", "dynamic_slice"}, names


def test_references_match_numpy():
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((5, 33)), rng.standard_normal((33, 17))
    y = mm.matmul_reference(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert_close(y, x @ w, 1e-5, "matmul_reference")
    wq = rng.integers(-127, 128, (33, 17)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, 17)
    y = mm.int8_matmul_reference(
        jnp.asarray(x, jnp.float32), jnp.asarray(wq), jnp.asarray(s, jnp.float32)
    )
    assert_close(y, (x @ wq) * s, 1e-5, "int8_matmul_reference")


def test_quantize_int8_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 10)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel must not divide by zero
    wq, scale = mm.quantize_int8(jnp.asarray(w))
    wq, scale = np.asarray(wq), np.asarray(scale)
    assert wq.dtype == np.int8 and scale.shape == (10,) and scale.dtype == np.float32
    assert np.abs(wq).max() == 127 and np.all(wq[:, 3] == 0) and scale[3] == 1.0
    np.testing.assert_allclose(scale[[0, 9]], np.abs(w[:, [0, 9]]).max(axis=0) / 127, rtol=1e-6)
    # Round to nearest: every weight is within half a quantisation step.
    assert np.all(np.abs(wq * scale - w) <= scale / 2 * (1 + 1e-6))


def test_illegal_and_oversized_blocks_fail_clearly():
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)

    def run(backend, *blocks):
        fn = lambda x, w: mm.matmul(  # noqa: E731
            x, w, backend=backend, block_sizes=mm.MatmulBlockSizes(*blocks)
        )
        return jax.eval_shape(fn, x, x)

    with pytest.raises(ValueError, match=r"block_m=4096, block_n=4096, block_k=512.*VMEM"):
        run("tpu", 4096, 4096, 512)
    with pytest.raises(ValueError, match="block_k=100 must be a multiple of 128"):
        run("tpu", 128, 128, 100)
    with pytest.raises(ValueError, match=r"block_k=512.*shared memory"):
        run("gpu", 256, 256, 512)
    with pytest.raises(ValueError, match="block_n=96 must be a power of two"):
        run("gpu", 64, 96, 64)
    with pytest.raises(ValueError, match="int8"):
        mm.int8_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones(3), interpret=True)
    with pytest.raises(ValueError, match="last axis"):
        mm.matmul(jnp.ones((2, 4)), jnp.ones((5, 3)), interpret=True)


def test_gpu_kernels_lower_to_triton():
    """Forward and backward lower for CUDA on this CPU host (Triton IR; PTX needs a GPU)."""
    sds = jax.ShapeDtypeStruct

    def loss(x, w, scale, wq):
        y = mm.matmul(x, w, backend="gpu") + mm.int8_matmul(x, wq, scale, backend="gpu")
        return jnp.sum(y.astype(jnp.float32))

    for dtype in (jnp.bfloat16, jnp.float32):
        exported = export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(
            sds((100, 384), dtype),
            sds((384, 640), dtype),
            sds((640,), jnp.float32),
            sds((384, 640), jnp.int8),
        )
        assert exported.mlir_module().count("xla.gpu.triton") >= 4
