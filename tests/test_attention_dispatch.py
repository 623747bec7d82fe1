"""attention_impl="pallas" (qwen_jax.model.dispatch.pallas_attention) against the XLA path.

On CPU the dispatch runs the TPU kernel in interpret mode. A tiny Qwen with GQA, a per-layer
window (traced through the layer scan) and packed rows (several documents, positions restarting
per document, padding) must give the same logits at every position, padding included, and the
same parameter gradients as impl="xla"; under an 8-device mesh the shard_map'd kernel must give
the unsharded XLA answer, also when the kv heads cannot follow the query heads' sharding.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from qwen_jax import sharding
from qwen_jax.model.dispatch import default_attention_impl, pallas_attention
from qwen_jax.testing.batches import packed_batch
from qwen_jax.testing.configs import tiny_dispatch
from qwen_jax.testing.model_parity import assert_matches_xla


@pytest.mark.slow
def test_pallas_model_matches_xla():
    cfg = tiny_dispatch()
    seg = packed_batch(3, 40, cfg.vocab_size)[2]
    assert int((seg == 0).sum()) > 0 and int(seg.max()) > 1  # padding and packing present
    assert_matches_xla(cfg, dict(attention_impl="pallas"), 3, 40)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv_sharded", "kv_replicated"])
def test_pallas_under_mesh_matches_unsharded_xla(kv_heads):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    change = dict(attention_impl="pallas")
    assert_matches_xla(
        tiny_dispatch(num_kv_heads=kv_heads), change, 4, 24, seed=kv_heads, mesh=mesh
    )


def test_decode_layout_is_refused():
    q = jnp.zeros((1, 1, 4, 16))
    kv = jnp.zeros((1, 32, 2, 16))
    seg = jnp.ones((1, 32), jnp.int32)
    with pytest.raises(ValueError, match=r"T == S.*impl='xla'"):
        pallas_attention(
            q, kv, kv, q_slot_bt=jnp.zeros((1, 1), jnp.int32), q_segment_bt=seg[:, :1],
            kv_segment_bs=seg, window=0,
        )  # fmt: skip


def test_cpu_defaults_to_xla():
    assert default_attention_impl() == "xla"
