"""The TPU flash-attention kernels compile ahead of time for v4, v5e, v5p and v6e from this CPU
host (libtpu + jax.experimental.topologies; shared/notes/tpu_aot.md), forward and backward.

Shapes are awkward on purpose: a length that is no block multiple, GQA, a traced window, bf16
and fp32, head dims on both layouts (128: fused heads; 64: split). Block sizes are each chip's
defaults, found from the topology mesh as on a real host; an oversized block is refused with an
error that names it. The dispatch test compiles the model's `pallas_attention` under a 4-chip
mesh, i.e. with the shard_map around the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.kernels import flash_attention_tpu as fa

pytestmark = pytest.mark.tpu_aot

SLICES = {"v4": "v4-8", "v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}  # 4 chips each
DEVICE_KIND = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


@pytest.fixture(scope="module", autouse=True)
def _libtpu():
    pytest.importorskip("libtpu")


@pytest.fixture(autouse=True)
def _fast_compile():
    """XLA at O0 (shared/notes/tpu_aot.md §5): several times faster; Mosaic still compiles the
    kernels in full, which is what these tests are about."""
    previous = jax.config.jax_optimization_level
    jax.config.update("jax_optimization_level", "O0")
    yield
    jax.config.update("jax_optimization_level", previous)


def _devices(chip):
    from qwen_jax.train.aot import topology_devices

    _, devices = topology_devices(SLICES[chip])
    assert devices[0].device_kind == DEVICE_KIND[chip]
    return devices


def _loss(q, k, v, seg, window, **kw):
    return fa.flash_attention(q, k, v, seg, window=window, **kw).astype(jnp.float32).sum()


def _compile_grad(chip, *, t=1000, n=8, kv=2, h=128, dtype=jnp.bfloat16, **kw):
    """Compile value_and_grad of the kernel for one chip of `chip`; returns the optimized HLO."""
    devices = _devices(chip)
    mesh = Mesh(np.array(devices[:1]), ("x",))
    spec = NamedSharding(mesh, P())

    def sds(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=spec)

    args = (
        sds((2, t, n, h), dtype),
        sds((2, t, kv, h), dtype),
        sds((2, t, kv, h), dtype),
        sds((2, t), jnp.int32),
        sds((), jnp.int32),
    )
    grad = jax.value_and_grad(lambda *a: _loss(*a, **kw), argnums=(0, 1, 2))
    # The abstract mesh tells the wrapper (and Pallas) which TPU it compiles for.
    with jax.set_mesh(mesh):
        assert bsz.current_chip() == chip
        return jax.jit(grad).lower(*args).compile().as_text()


@pytest.mark.parametrize("chip", sorted(SLICES))
def test_forward_backward_compile(chip):
    hlo = _compile_grad(chip)
    assert hlo.count("tpu_custom_call") == 3  # forward, dK/dV, dQ


@pytest.mark.parametrize("chip,h,dtype", [("v5e", 64, jnp.float32), ("v4", 128, jnp.float32)])
def test_other_layouts_and_dtypes_compile(chip, h, dtype):
    assert _compile_grad(chip, t=384, n=4, kv=4, h=h, dtype=dtype).count("tpu_custom_call") == 3


def test_oversized_block_fails_with_its_name():
    big = bsz.FlashBlockSizes(512, 2048, 512, 512, 512, 512)
    with pytest.raises(ValueError, match=r"block_kv=2048 is too large for TPU v4"):
        _compile_grad("v4", t=4096, block_sizes=big)


def test_dispatch_compiles_sharded_under_a_4_chip_mesh():
    from qwen_jax.model.dispatch import pallas_attention
    from qwen_jax.sharding import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), devices=_devices("v5e"))
    b, t, n, kv, h = 4, 640, 8, 2, 128

    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))

    q = sds((b, t, n, h), P("data", None, "tensor", None))
    k = sds((b, t, kv, h), P("data", None, "tensor", None))
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P("data", None)))

    def loss(q, k, v, seg):
        slots = jnp.broadcast_to(jnp.arange(t), (b, t))
        o = pallas_attention(
            q, k, v, q_slot_bt=slots, q_segment_bt=seg, kv_segment_bs=seg, window=jnp.int32(256)
        )
        return o.astype(jnp.float32).sum()

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, seg).compile().as_text()
    assert hlo.count("tpu_custom_call") == 3
