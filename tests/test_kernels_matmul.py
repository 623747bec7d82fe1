"""Tiled matmul and weight-only int8 matmul (qwen_jax.kernels.matmul) against float64 numpy.

Forward and backward (the custom VJP runs the same kernel with transposed operands) in interpret
mode for both Pallas bodies; shapes are not multiples of the blocks, so the padding path and
several blocks along every axis are exercised. Interpreter outputs start as NaN (see
test_kernels_decode.py) and `assert_close` rejects non-finite values. scripts/gpu_check.py
imports `CASES` / `check_matmul` and runs the same assertions compiled for a real GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from test_kernels_decode import TOL, assert_close

from qwen_jax.kernels import matmul as mm

# Small tiles: every case spans several blocks along M, N and K.
TEST_BLOCKS = {
    "tpu": mm.MatmulBlockSizes(128, 128, 128),
    "gpu": mm.MatmulBlockSizes(32, 64, 32, num_warps=4, num_stages=2),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """x [*lead, k] @ w [k, n]."""

    lead: tuple[int, ...]
    k: int
    n: int
    dtype: str
    seed: int

    def __str__(self):
        return f"{'x'.join(map(str, self.lead))}x{self.k}x{self.n}-{self.dtype}"


CASES = [
    Case(lead=(40,), k=300, n=200, dtype="float32", seed=0),
    Case(lead=(2, 20), k=256, n=384, dtype="bfloat16", seed=1),
]


def _rounded(rng, shape, dtype, scale=1.0):
    x = rng.standard_normal(shape) * scale
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)


def check_matmul(case: Case, *, backend: str, interpret, block_sizes=None) -> None:
    """y = x @ w and its VJP (dx, dw) for a random cotangent c, against float64 numpy."""
    rng = np.random.default_rng(case.seed)
    dt, tol = jnp.dtype(case.dtype), TOL[case.dtype]
    x = _rounded(rng, (*case.lead, case.k), dt)
    w = _rounded(rng, (case.k, case.n), dt, case.k**-0.5)
    c = _rounded(rng, (*case.lead, case.n), dt)
    fn = lambda x, w: mm.matmul(  # noqa: E731
        x, w, block_sizes=block_sizes or TEST_BLOCKS[backend], backend=backend, interpret=interpret
    )
    y, vjp = jax.vjp(fn, jnp.asarray(x, dt), jnp.asarray(w, dt))
    dx, dw = vjp(jnp.asarray(c, dt))
    x2, c2 = x.reshape(-1, case.k), c.reshape(-1, case.n)
    assert y.dtype == dt and dx.dtype == dt and dw.dtype == dt
    assert_close(y, x @ w, tol, f"matmul y {backend} {case}")
    assert_close(dx, c @ w.T, tol, f"matmul dx {backend} {case}")
    assert_close(dw, x2.T @ c2, tol, f"matmul dw {backend} {case}")


def check_int8_matmul(case: Case, *, backend: str, interpret, block_sizes=None) -> None:
    """y = (x @ wq) * scale and its VJP in x and scale, against float64 numpy."""
    rng = np.random.default_rng(case.seed + 100)
    dt, tol = jnp.dtype(case.dtype), TOL[case.dtype]
    x = _rounded(rng, (*case.lead, case.k), dt)
    wq, scale = mm.quantize_int8(jnp.asarray(rng.standard_normal((case.k, case.n)), jnp.float32))
    c = _rounded(rng, (*case.lead, case.n), dt)
    fn = lambda x, s: mm.int8_matmul(  # noqa: E731
        x,
        wq,
        s,
        block_sizes=block_sizes or TEST_BLOCKS[backend],
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


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matmul_and_grads_match_numpy(case, backend):
    check_matmul(case, backend=backend, interpret=True)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_int8_matmul_and_grads_match_numpy(case, backend):
    check_int8_matmul(case, backend=backend, interpret=True)


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
