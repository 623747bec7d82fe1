"""Sharding presets on 8 fake CPU devices: same logits as unsharded, expected param specs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen_jax import sharding
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model

CFG = C.tiny(num_heads=8, num_kv_heads=2, head_dim=8, vocab_size=256)  # GQA: 2 kv heads


@pytest.fixture(scope="module")
def reference():
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, CFG.vocab_size)
    segs = np.ones((8, 16), np.int32)
    segs[:, 10:] = 2  # two packed documents per row
    model = create_model(CFG, seed=3)
    return tokens, segs, np.asarray(model(tokens, segment_ids_bt=segs)[0])


EXPECTED = {
    # preset: (mesh shape, wq spec, wk spec, wte spec)
    "dp": ((8, 1, 1), P(None, None, None, None), P(None, None, None, None), P(None, None)),
    "fsdp": ((1, 8, 1), P(None, "fsdp", None, None), P(None, "fsdp", None, None), P(None, "fsdp")),
    # 2 kv heads do not divide the 4-way tensor axis: kept replicated on that dim.
    "fsdp_tp": (
        (1, 2, 4),
        P(None, "fsdp", "tensor", None),
        P(None, "fsdp", None, None),
        P("tensor", "fsdp"),
    ),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_sharded_logits_equal_unsharded(reference, preset):
    tokens, segs, ref = reference
    mesh = sharding.make_mesh(preset)
    shape, wq, wk, wte = EXPECTED[preset]
    assert tuple(mesh.shape.values()) == shape
    model = create_model(CFG, seed=3, mesh=mesh)
    assert model.blocks.wq[...].sharding.spec == wq
    assert model.blocks.wk[...].sharding.spec == wk
    assert model.wte[...].sharding.spec == wte
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, t, s: m(t, segment_ids_bt=s)[0])(model, tokens, segs)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5, rtol=0)


def test_rules_table_rejects_collisions_and_unknown_names():
    with pytest.raises(ValueError, match="appears twice"):
        sharding._check_rules((("a", ()), ("a", ("fsdp",))))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding._check_rules((("a", ("model",)),))
    with pytest.raises(ValueError, match="mesh axis 'fsdp' used by dim 0 and dim 1"):
        sharding.mesh_axes_for(("embed", "embed"))
    with pytest.raises(KeyError, match="not in sharding.RULES"):
        sharding.mesh_axes_for(("nonsense",))


def test_mesh_config_resolution():
    assert sharding.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.MeshConfig(data=2, fsdp=3, tensor=1).resolve(8)
    with pytest.raises(KeyError, match="unknown mesh preset"):
        sharding.make_mesh("zero3")
