"""Engine weights: taken from the model without a second copy, refreshed in place from a
training state without recompiling, and scored (`Engine.score`) like the full model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen_jax import sharding
from qwen_jax.infer import engine as E
from qwen_jax.infer.engine import Engine, GenerationError
from qwen_jax.model import config as C
from qwen_jax.model import transformer as T
from qwen_jax.model.factory import create_model
from qwen_jax.train.step import init_state

CFG = C.tiny(vocab_size=256, init_std=0.1, max_position_embeddings=128, num_kv_heads=2)
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 250, 1], [200, 13], [8, 9, 10, 11, 12]]
NEW = 6
ATOL = 1e-5


def compiled() -> tuple[int, ...]:
    fns = (E.prefill_chunk, E.decode_step, E.new_cache, E.first_token)
    return tuple(f._cache_size() for f in fns)


def assert_same(got, want, atol=0.0):
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("mesh_name", [None, "fsdp_tp"])
def test_refresh_equals_a_fresh_engine_and_compiles_nothing(mesh_name):
    mesh = None if mesh_name is None else sharding.make_mesh(mesh_name)
    eng = Engine(create_model(CFG, seed=1, mesh=mesh), mesh=mesh)
    old = eng.generate(PROMPTS, max_new_tokens=NEW)
    before = compiled()

    # New weights as a training state holds them (stacked layers, nnx.State of Params).
    state = init_state(create_model(CFG, seed=2, mesh=mesh), optax.sgd(0.1))
    eng.refresh(state["params"])
    jax.tree.map(lambda x: x.delete(), state["params"])  # a train step donates them: no alias
    got = eng.generate(PROMPTS, max_new_tokens=NEW)
    assert compiled() == before

    fresh = Engine(create_model(CFG, seed=2, mesh=mesh), mesh=mesh)
    assert_same(got, fresh.generate(PROMPTS, max_new_tokens=NEW))
    assert [r.token_ids for r in got] != [r.token_ids for r in old]

    # A second refresh compiles nothing at all (the split and copy programs are cached too).
    splits = (T.split_layers._cache_size(), T.copy_arrays._cache_size())
    eng.refresh(nnx.state(create_model(CFG, seed=1, mesh=mesh), nnx.Param))
    assert (T.split_layers._cache_size(), T.copy_arrays._cache_size()) == splits
    assert_same(eng.generate(PROMPTS, max_new_tokens=NEW), old)
    assert compiled() == before


def test_refresh_refuses_other_shapes_and_dtypes():
    eng = Engine(create_model(CFG, seed=1))
    wider = nnx.state(create_model(CFG.replace(ffn_size=128), seed=1), nnx.Param)
    with pytest.raises(ValueError, match=r"blocks\.w1: engine \(2, 64, 96\) float32, got"):
        eng.refresh(wider)
    half = nnx.state(create_model(CFG.replace(param_dtype="bfloat16"), seed=1), nnx.Param)
    with pytest.raises(ValueError, match="wte: engine .* float32, got .* bfloat16"):
        eng.refresh(half)
    assert len(eng.generate(PROMPTS, max_new_tokens=2)[0].token_ids) == 2  # still intact


def test_engine_takes_the_weights_without_a_copy():
    """donate=True (default): the stacked layer arrays are deleted as they are split and the
    other weights are shared, so one copy exists. donate=False copies and leaves the model."""
    model = create_model(CFG, seed=1)
    wte, wq = model.wte[...], model.blocks.wq[...]
    kept = Engine(create_model(CFG, seed=1), donate=False)
    assert not wq.is_deleted() and kept.state["wte"][...] is not wte
    eng = Engine(model)
    assert wq.is_deleted()
    assert eng.state["wte"][...] is wte
    live = sum(x.nbytes for x in jax.tree.leaves(nnx.to_pure_dict(eng.state)))
    live += sum(x.nbytes for layer in eng.layers for x in layer.values())
    assert live == sum(x.nbytes for x in jax.tree.leaves(nnx.state(kept.model(), nnx.Param)))
    assert_same(
        eng.generate(PROMPTS, max_new_tokens=NEW), kept.generate(PROMPTS, max_new_tokens=NEW)
    )


def test_score_equals_log_softmax_of_the_full_model():
    model = create_model(CFG, seed=3)
    eng = Engine(model, donate=False)
    conts = [[1, 2, 3], [250, 4], [7] * 9]
    got = eng.score(PROMPTS, conts)
    logits = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0], axis=-1))
    for p, c, g in zip(PROMPTS, conts, got, strict=True):
        seq = jnp.asarray([p + c])
        logp = np.asarray(logits(seq))[0]
        want = [logp[len(p) - 1 + j, tok] for j, tok in enumerate(c)]
        assert g.shape == (len(c),)
        np.testing.assert_allclose(g, want, atol=ATOL, rtol=0)
    # Scoring what generate produced gives generate's log-probs.
    res = eng.generate(PROMPTS, max_new_tokens=NEW)
    for r, g in zip(res, eng.score(PROMPTS, [r.token_ids for r in res])):
        np.testing.assert_allclose(g, r.logprobs, atol=ATOL, rtol=0)
    with pytest.raises(GenerationError, match="2 prompts and 1 continuations"):
        eng.score(PROMPTS[:2], conts[:1])
