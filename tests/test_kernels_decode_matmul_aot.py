"""The TPU bodies of decode attention and (int8) matmul compile ahead of time for v4, v5e, v5p
and v6e from this CPU host (libtpu + jax.experimental.topologies; shared/notes/tpu_aot.md).

Shapes are Qwen-sized and deliberately awkward: GQA 7:1, head dim 64 (two KV heads per block),
cache lengths and M that are not block multiples, fp32 and bf16, forward and backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qwen_jax.kernels import decode_attention as da
from qwen_jax.kernels import matmul as mm
from qwen_jax.testing.tpu_aot import DEVICE_KIND, compile_for_tpu

pytestmark = pytest.mark.tpu_aot


@pytest.fixture(scope="module", autouse=True)
def _libtpu():
    pytest.importorskip("libtpu")


@pytest.mark.parametrize("chip", sorted(DEVICE_KIND))
def test_decode_attention_compiles(chip):
    sds = jax.ShapeDtypeStruct
    for b, s, k, g, h, dtype in [
        (8, 4100, 4, 7, 128, jnp.bfloat16),
        (2, 1000, 8, 1, 64, jnp.float32),
    ]:
        compiled, device = compile_for_tpu(
            chip,
            lambda q, kc, vc, n, w: da.decode_attention(q, kc, vc, n, window=w, backend="tpu"),
            sds((b, k * g, h), dtype),
            sds((b, s, k, h), dtype),
            sds((b, s, k, h), dtype),
            sds((b,), jnp.int32),
            sds((), jnp.int32),
        )
        assert device.device_kind == DEVICE_KIND[chip]
        assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.parametrize("chip", sorted(DEVICE_KIND))
def test_matmul_compiles(chip):
    sds = jax.ShapeDtypeStruct

    def step(x, w, wq, scale):
        def loss(x, w, scale):
            y = mm.matmul(x, w, backend="tpu") + mm.int8_matmul(x, wq, scale, backend="tpu")
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(x, w, scale)

    x, w = sds((4, 250, 1536), jnp.bfloat16), sds((1536, 2048), jnp.bfloat16)
    wq, scale = sds((1536, 2048), jnp.int8), sds((2048,), jnp.float32)
    compiled, _ = compile_for_tpu(chip, step, x, w, wq, scale)
    # forward (2) + dx, dw + int8 dx, dscale: six kernels at least.
    assert compiled.as_text().count("tpu_custom_call") >= 6
    # fp32 forward only: its full-precision (multi-pass) tiles take ~5x longer to compile.
    x32, w32 = sds((250, 1536), jnp.float32), sds((1536, 2048), jnp.float32)
    compiled, _ = compile_for_tpu(chip, lambda x, w: mm.matmul(x, w, backend="tpu"), x32, w32)
    assert "tpu_custom_call" in compiled.as_text()
