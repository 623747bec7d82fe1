"""Flash attention for training (qwen_jax.kernels.flash_attention_tpu) in Pallas interpret mode.

The kernel's forward output and q/k/v gradients are compared with the pure-jnp reference, which
is itself checked against an independent float64 numpy loop and against the model's XLA path.
Cases mix several packed documents per row, left and right padding, windows below, across and
beyond a block, GQA ratios 1-3, head dims on both TPU layouts (128: fused heads; 32/64: split),
and lengths that are not block multiples. Interpret mode poisons every kernel output with NaN
(`poisoned_call`), `assert_close` rejects any non-finite value, and `test_unwritten_block_fails`
shows an unwritten block really surfaces as NaN.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels import flash_attention_tpu as fa
from qwen_jax.kernels.flash_attention_common import (
    flash_attention_reference,
    kv_block_range,
    q_block_range,
    tile_visible,
)
from qwen_jax.model.attention import attention_mask, xla_attention
from qwen_jax.testing.kernel_cases import (
    FLASH_CASES,
    FlashCase,
    flash_inputs,
    flash_kernel_and_vjp,
    flash_reference_and_vjp,
    numpy_attention,
)
from qwen_jax.testing.tolerance import KERNEL_TOL, assert_close


@pytest.mark.parametrize("case", FLASH_CASES, ids=str)
def test_kernel_matches_reference(case):
    q, k, v, seg, do = flash_inputs(case)
    o, grads = flash_kernel_and_vjp(q, k, v, seg, do, case.window, case.blocks)
    o_ref, grads_ref = flash_reference_and_vjp(q, k, v, seg, do, case.window)
    assert o.dtype == q.dtype and o.shape == q.shape
    tol = KERNEL_TOL[case.dtype]
    assert_close(o, o_ref, tol, f"forward {case}")
    for name, got, want in zip("dq dk dv".split(), grads, grads_ref):
        assert got.dtype == q.dtype
        assert_close(got, want, tol, f"{name} {case}")


@pytest.mark.parametrize("case", FLASH_CASES[:3], ids=str)
def test_reference_matches_numpy_and_model(case):
    q, k, v, seg, _ = flash_inputs(case)
    ref = flash_attention_reference(q, k, v, seg, window=case.window)
    assert_close(ref, numpy_attention(q, k, v, seg, case.window), KERNEL_TOL[case.dtype], str(case))
    slots = jnp.broadcast_to(jnp.arange(case.t), seg.shape)
    mask = attention_mask(slots, seg, seg, case.window)
    assert_close(ref, xla_attention(q, k, v, mask), KERNEL_TOL[case.dtype], f"model {case}")


@pytest.mark.parametrize("bq,bk", [(128, 128), (256, 128), (128, 256), (32, 16)])
def test_block_bands_are_exactly_the_visible_tiles(bq, bk):
    """Kernels skip tiles with tile_visible and loop/prefetch over the bands: they must agree."""
    length = 8 * max(bq, bk)
    nq, nk = length // bq, length // bk
    i = jnp.arange(nq, dtype=jnp.int32)[:, None]
    j = jnp.arange(nk, dtype=jnp.int32)[None, :]
    for window in [0, 1, 5, bk - 1, bk, bk + 1, 3 * bq + 7, length - 1]:
        w = jnp.int32(window)
        vis = np.asarray(tile_visible(i * bq, bq, j * bk, bk, w))
        lo, hi = kv_block_range(i * bq, bq, bk, w)
        np.testing.assert_array_equal(vis, (j >= lo) & (j <= hi), err_msg=f"kv band w={window}")
        lo, hi = q_block_range(j * bk, bk, bq, nq, w)
        np.testing.assert_array_equal(vis, (i >= lo) & (i <= hi), err_msg=f"q band w={window}")
        assert vis.any(axis=1).all()  # every query tile has work (its diagonal)


def test_separate_kv_segment_ids():
    """kv_segment_ids_bt may differ from the query ids (the dispatch passes both)."""
    case = FlashCase(b=1, t=130, k=1, g=2, h=32, dtype="float32", window=0, seed=7)
    q, k, v, seg, _ = flash_inputs(case)
    kv_seg = seg.at[:, ::3].set(0)  # hide every third key
    out = fa.flash_attention(q, k, v, seg, kv_segment_ids_bt=kv_seg, interpret=True)
    want = flash_attention_reference(q, k, v, seg, kv_segment_ids_bt=kv_seg)
    assert_close(out, want, KERNEL_TOL["float32"])


def test_unwritten_block_fails(monkeypatch):
    """A forward kernel that writes only the first query block leaves NaN (the poison) after it."""

    def lazy(w_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *scratch, scale):
        lse_ref[...] = jnp.zeros(lse_ref.shape, lse_ref.dtype)

        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = q_ref[...]

    monkeypatch.setattr(fa, "_fwd_kernel", lazy)
    case = FlashCase(b=1, t=256, k=1, g=1, h=32, dtype="float32", window=0, seed=8)
    q, k, v, seg, _ = flash_inputs(case)
    out = np.asarray(fa.flash_attention.__wrapped__(q, k, v, seg, interpret=True))
    np.testing.assert_array_equal(out[:, :128], np.asarray(q[:, :128]))
    assert np.isnan(out[:, 128:]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, flash_attention_reference(q, k, v, seg), 1.0)


def test_rejects_decode_shapes_and_bad_blocks():
    q = jnp.zeros((1, 1, 2, 32))
    kv = jnp.zeros((1, 64, 2, 32))
    with pytest.raises(ValueError, match="KV cache"):
        fa.flash_attention(q, kv, kv, jnp.ones((1, 1), jnp.int32), interpret=True)
    q = jnp.zeros((1, 64, 2, 32))
    bad = dataclasses.replace(bsz.default_block_sizes("cpu"), block_kv_dq=192 + 1)
    with pytest.raises(ValueError, match="block_kv_dq=193"):
        fa.flash_attention(q, q, q, jnp.ones((1, 64), jnp.int32), block_sizes=bad, interpret=True)


def test_oversized_block_is_named():
    big = bsz.FlashBlockSizes(512, 4096, 512, 512, 512, 512)
    with pytest.raises(ValueError, match=r"block_kv=4096 is too large for TPU v4.*forward"):
        fa._check_vmem(big, "v4", 128, 2)
    big = dataclasses.replace(bsz.default_block_sizes("v5e"), block_q_dkv=16384)
    with pytest.raises(ValueError, match=r"block_q_dkv=16384 is too large for TPU v5e.*dkv"):
        fa._check_vmem(big, "v5e", 128, 2)


@pytest.mark.parametrize("chip", bsz.TPU_CHIPS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_default_blocks_are_legal(chip, dtype):
    blocks = bsz.default_block_sizes(chip)
    blocks.check_multiple_of(128, "TPU")
    assert fa._check_vmem(blocks, chip, 128, jnp.dtype(dtype).itemsize) > 0


def test_chip_names():
    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p"}
    kinds |= {"TPU v6 lite": "v6e", "TPU v6e": "v6e"}
    for kind, chip in kinds.items():
        assert bsz.chip_from_device_kind(kind) == chip
    assert bsz.chip_from_device_kind("NVIDIA H100 80GB HBM3", "gpu") == "gpu"
    assert bsz.current_chip() == "cpu"
    bsz.default_block_sizes("gpu").check_power_of_two(16, "Triton")
    with pytest.raises(ValueError, match="TPU v3"):
        bsz.chip_from_device_kind("TPU v3")
