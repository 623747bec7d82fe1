"""Flash attention for GPU (qwen_jax.kernels.flash_attention_gpu): the Triton-lowered Pallas body.

On CPU the kernels run in Pallas interpret mode against the same reference, cases and
tolerances as the TPU kernel (tests/test_kernels_flash.py), with poisoned outputs; and the whole
forward+backward is lowered for CUDA (Pallas -> Triton IR) without a GPU, which catches Triton
restrictions (tile shapes, ops) before a GPU ever sees the code. On a GPU machine the `gpu` test
runs the compiled kernels (`check_gpu_flash` in qwen_jax.testing.kernel_cases, the check that
scripts/gpu_check.py also runs there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels import flash_attention_gpu as fg
from qwen_jax.testing.kernel_cases import GPU_FLASH_CASES, check_gpu_flash


@pytest.mark.parametrize("case", GPU_FLASH_CASES, ids=str)
def test_interpret_matches_reference(case):
    check_gpu_flash(case, interpret=True)


@pytest.mark.parametrize("head_dim", [128, 80])
def test_lowers_to_triton_for_cuda(head_dim):
    """fwd + bwd lower to three Triton kernels for CUDA; no GPU needed to lower."""
    sds = jax.ShapeDtypeStruct
    q = sds((2, 1000, 8, head_dim), jnp.bfloat16)
    kv = sds((2, 1000, 2, head_dim), jnp.bfloat16)

    def loss(q, k, v, seg, window):
        return fg.flash_attention(q, k, v, seg, window=window).astype(jnp.float32).sum()

    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(
        q, kv, kv, sds((2, 1000), jnp.int32), sds((), jnp.int32)
    )
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_rejects_non_power_of_two_blocks():
    q = jnp.zeros((1, 64, 2, 32))
    bad = dataclasses.replace(bsz.default_block_sizes("gpu"), block_q_dq=48)
    with pytest.raises(ValueError, match="block_q_dq=48 must be a power of two"):
        fg.flash_attention(q, q, q, jnp.ones((1, 64), jnp.int32), block_sizes=bad, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_FLASH_CASES, ids=str)
def test_compiled_matches_reference_on_gpu(case):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    check_gpu_flash(dataclasses.replace(case, blocks=None), interpret=False)
    check_gpu_flash(case, interpret=False)
