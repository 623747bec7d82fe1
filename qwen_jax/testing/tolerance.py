"""Tolerance checks. Tolerances are fixed (design.md §4) and never relaxed to make a test pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KERNEL_TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # max-norm relative, kernels vs references
ATOL_LOGITS = 1e-4  # design.md §4: fp32 logits
REL_GRADS = 1e-5  # the kernels' fp32 gradient tolerance (issue 5)
ATOL_LOGPROBS = 1e-5  # issue 5: engine log-probs, fp32


def _as_float64(x) -> np.ndarray:
    """numpy arrays keep their precision (a float64 reference stays float64); jax arrays (and
    anything else) are read as fp32 first (bf16 kernel outputs widen exactly)."""
    if isinstance(x, np.ndarray):
        return np.asarray(x, np.float64)
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def assert_close(actual, expected, rel: float, what: str = "") -> None:
    """Max-norm relative error: max|a - e| <= rel * max|e|. Non-finite values always fail."""
    actual = _as_float64(actual)
    expected = _as_float64(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: {np.sum(~np.isfinite(actual))} non-finite values"
    assert np.isfinite(expected).all(), f"{what}: reference has non-finite values"
    err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"


def assert_grads_close(got, want, rel: float = REL_GRADS) -> None:
    """Leaf by leaf of two pytrees: finite, and max-norm relative error <= rel."""
    for (path, g), (_, r) in zip(jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)):
        g, r = np.asarray(g), np.asarray(r)
        assert np.isfinite(g).all(), f"{path}: non-finite gradient"
        err = np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30)
        assert err <= rel, f"{path}: relative gradient error {err:.3g} > {rel:g}"
