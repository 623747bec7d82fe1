"""attention_impl="pallas" while decoding: the engine's cached decode steps run the Pallas decode
kernel (qwen_jax.model.dispatch.decode_attention; TPU kernel in interpret mode on CPU) and must
generate what the XLA path generates.

The batch is left-padded (prompts of 9, 2 and 5 tokens in a 16-slot bucket, plus one all-padding
row to fill the batch bucket), the model has GQA and per-layer windows (5 in the lower layer, so
both the window and the left-padding start bound the visible range), greedy tokens must be
identical and log-probs within 1e-5. Prefill into the cache (T > 1) stays on XLA by design, so
only the decode steps differ between the two engines. Under a 2x2x2 mesh (batch over data x
fsdp, heads over tensor) the shard_map'd kernel must give the unsharded XLA answer, and under a
2x4 fsdp x tensor mesh too, where the 2 kv heads cannot follow the 4 query heads' 4-way split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from qwen_jax import sharding
from qwen_jax.infer.engine import Engine
from qwen_jax.model.cache import KVCache
from qwen_jax.model.factory import create_model
from qwen_jax.testing.generation import (
    DECODE_NEW,
    PROMPTS,
    assert_same_generation,
    decode_config,
    xla_greedy,
)


def test_decode_step_runs_the_kernel_and_prefill_does_not():
    """The wiring itself: a cached T == 1 call contains the Pallas kernel, a cached T > 1 call
    (prefill) and every impl="xla" call do not."""
    cfg = decode_config(2, "pallas")
    model = create_model(cfg, seed=3)

    def kernels_in(model, t):
        cache = KVCache.init(model.cfg, 2, 32)
        jaxpr = jax.make_jaxpr(lambda tok: model(tok, cache=cache)[0])(jnp.ones((2, t), jnp.int32))
        return str(jaxpr).count("pallas_call")

    assert kernels_in(model, 1) == 1  # the kernel (its jaxpr is printed once for all layers)
    assert kernels_in(model, 4) == 0
    assert kernels_in(create_model(cfg.replace(attention_impl="xla"), seed=3), 1) == 0


def test_engine_pallas_decode_matches_xla():
    want = xla_greedy(2)
    assert all(len(r.token_ids) == DECODE_NEW for r in want)
    model = create_model(decode_config(2, "pallas"), seed=3)
    assert_same_generation(Engine(model).generate(PROMPTS, max_new_tokens=DECODE_NEW), want)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_cfg",
    [
        sharding.MeshConfig(data=2, fsdp=2, tensor=2),  # 4 q heads, 2 kv heads: both split
        sharding.MeshConfig(data=1, fsdp=2, tensor=4),  # 2 kv heads cannot split 4 ways
    ],
    ids=["kv_sharded", "kv_replicated"],
)
def test_engine_pallas_decode_under_mesh_matches_unsharded_xla(mesh_cfg):
    mesh = sharding.make_mesh(mesh_cfg)
    model = create_model(decode_config(2, "pallas"), seed=3, mesh=mesh)
    eng = Engine(model, mesh=mesh)
    assert_same_generation(eng.generate(PROMPTS, max_new_tokens=DECODE_NEW), xla_greedy(2))
