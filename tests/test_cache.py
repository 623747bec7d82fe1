"""The per-row KV cache (qwen_jax.model.cache) and the layer as named functions.

A batch whose rows sit at different cache lengths (and different left-padding starts) decodes,
one step per call for all rows, to exactly the greedy tokens and the log-probabilities of
decoding each row alone: on the XLA path and the Pallas decode kernel (interpret mode), without
a mesh and under 8 fake devices. The model is GQA with a window in one layer, so the window, the
start and the per-row length all bound what a row sees.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax import sharding
from qwen_jax.infer import engine as E
from qwen_jax.infer.engine import Engine
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model import block as L
from qwen_jax.model import config as C
from qwen_jax.model import rope
from qwen_jax.model.cache import KV_AXES, KVCache, write_rows
from qwen_jax.model.factory import create_model
from qwen_jax.model.layers import rms_norm

ATOL = 1e-5  # fp32 log-probs, batched vs alone
# 9 tokens -> bucket 16 (start 7), 20 -> bucket 32 (start 12), 2 -> bucket 16 (start 14): the
# rows sit at cache lengths 16, 32, 16 with different starts when decoded together.
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 250, 1], list(range(30, 50)), [200, 13]]
NEW = 6
SLOTS = 64


def cfg_for(impl: str) -> C.QwenConfig:
    return C.tiny(
        vocab_size=256,
        init_std=0.1,
        max_position_embeddings=128,
        num_kv_heads=2,
        attn_windows=(5, 0),
        attention_impl=impl,
    )


@functools.cache
def alone(impl: str):
    """Each prompt generated alone (greedy), no mesh."""
    eng = Engine(create_model(cfg_for(impl), seed=3))
    return [eng.generate([p], max_new_tokens=NEW)[0] for p in PROMPTS]


def decode_together(eng: Engine) -> tuple[np.ndarray, np.ndarray]:
    """Prefill each prompt alone, insert the rows into one 4-row cache (row 3 stays empty),
    then decode all rows together; returns greedy tokens and log-probs [NEW, 3]."""
    greedy = SamplingParams()
    spec, knobs, key = greedy.spec(), greedy.knobs(), jax.random.key(0)
    with eng._mesh():
        cache = E.new_cache(eng.cfg, 4, SLOTS, jnp.zeros((4,), jnp.int32))
        firsts, logps = [], []
        for row, prompt in enumerate(PROMPTS):
            logits_bv, one, tokens, mask, _, _ = eng.prefill([prompt])
            tok, logp, _ = E.first_token(
                logits_bv, jnp.asarray(tokens), jnp.asarray(mask), key, knobs, spec, 256
            )
            cache = E.insert_rows(cache, row, one)
            firsts.append(int(tok[0]))
            logps.append(float(logp[0]))
        assert cache.lengths.tolist()[:3] == [16, 32, 16]
        tok_b = jnp.asarray(firsts + [0], jnp.int32)
        out_t, out_lp = [firsts], [logps]
        for i in range(NEW - 1):
            tok_b, logp_b, cache, _ = E.decode_step(
                eng.graphdef, spec, eng.state, eng.layers, tok_b, i, None, cache, None, key, knobs
            )
            out_t.append(np.asarray(tok_b)[:3].tolist())
            out_lp.append(np.asarray(logp_b)[:3].tolist())
    return np.asarray(out_t), np.asarray(out_lp)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("mesh_name", [None, "fsdp_tp", "dp"])
def test_rows_at_different_lengths_decode_like_each_row_alone(impl, mesh_name):
    mesh = None if mesh_name is None else sharding.make_mesh(mesh_name)
    eng = Engine(create_model(cfg_for(impl), seed=3, mesh=mesh), mesh=mesh)
    tokens, logps = decode_together(eng)
    for r, res in enumerate(alone(impl)):
        assert tokens[:, r].tolist() == res.token_ids
        np.testing.assert_allclose(logps[:, r], res.logprobs, atol=ATOL, rtol=0)


def test_pallas_alone_equals_xla_alone():
    """The two paths agree with each other too (so the test above compares like with like)."""
    for p, x in zip(alone("pallas"), alone("xla")):
        assert p.token_ids == x.token_ids
        np.testing.assert_allclose(p.logprobs, x.logprobs, atol=ATOL, rtol=0)


def test_cache_shardings_come_from_the_rules_table():
    mesh = sharding.make_mesh("fsdp_tp")
    with jax.set_mesh(mesh):
        cache = E.new_cache(cfg_for("xla").replace(num_kv_heads=4), 4, SLOTS, jnp.zeros(4, int))
    want = sharding.sharding_for(KV_AXES, cache.k[0].shape, mesh)
    for x in (*cache.k, *cache.v):
        assert x.sharding.is_equivalent_to(want, x.ndim)
    for x, want in zip(jax.tree.leaves(cache), jax.tree.leaves(cache.shardings(mesh))):
        assert x.sharding.is_equivalent_to(want, x.ndim)
    assert cache.k[0].sharding.spec[0:3] == ("fsdp", None, "tensor")


def test_rows_write_at_their_own_slots_and_reset_insert():
    buf = jnp.zeros((3, 8, 1, 1))
    new = jnp.arange(1, 7, dtype=jnp.float32).reshape(3, 2, 1, 1)
    out = np.asarray(write_rows(buf, new, jnp.asarray([0, 3, 6])))[..., 0, 0]
    np.testing.assert_array_equal(
        out, [[1, 2, 0, 0, 0, 0, 0, 0], [0, 0, 0, 3, 4, 0, 0, 0], [0, 0, 0, 0, 0, 0, 5, 6]]
    )
    cfg = cfg_for("xla")
    cache = KVCache(
        (buf,) * cfg.num_layers,
        (buf,) * cfg.num_layers,
        jnp.asarray([0, 2, 1]),
        jnp.asarray([4, 5, 6]),
    )
    reset = cache.reset(jnp.asarray([False, True, False]))
    assert reset.starts.tolist() == [0, 0, 1] and reset.lengths.tolist() == [4, 0, 6]
    one = KVCache(
        (new[:1, :, :, :] + 0 * new[:1],) * 2, (new[:1],) * 2, jnp.asarray([1]), jnp.asarray([2])
    )
    moved = cache.insert(2, one)
    assert moved.starts.tolist() == [0, 2, 1] and moved.lengths.tolist() == [4, 5, 2]
    np.testing.assert_array_equal(np.asarray(moved.k[0])[2, :2, 0, 0], [1, 2])
    with pytest.raises(ValueError, match="cannot insert"):
        one.insert(0, cache)


def test_model_forward_with_a_ragged_cache_equals_the_full_forward():
    """A 2-token chunk appended to rows at lengths 5 and 11 (one call) gives the logits of a
    forward over each whole row without a cache (XLA path, T > 1)."""
    cfg = cfg_for("xla")
    model = create_model(cfg, seed=3)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 256, n).tolist() for n in (7, 13)]
    cache = KVCache.init(cfg, 2, 32)
    for r, toks in enumerate(rows):
        one = KVCache.init(cfg, 1, 32)
        _, one = model(jnp.asarray([toks[:-2]]), cache=one)
        cache = cache.insert(r, one)
    assert cache.lengths.tolist() == [5, 11]
    got, cache = model(jnp.asarray([toks[-2:] for toks in rows]), cache=cache)
    assert cache.lengths.tolist() == [7, 13]
    for r, toks in enumerate(rows):
        want = model(jnp.asarray([toks]))[0][0, -2:]
        np.testing.assert_allclose(got[r], want, atol=1e-4, rtol=0)


def test_layer_alone_equals_the_models_first_layer():
    """`layer` on the embeddings with layer 0's weights, then layers 1.. the same way, gives the
    model's final hidden state; `attention_block` then `mlp_block` is `layer`; the named scopes
    reach the compiled program's op names."""
    cfg = cfg_for("xla")
    model = create_model(cfg, seed=3)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 10)))
    stacked = model.blocks.stacked()
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    cos, sin = rope.rope_angles(pos, cfg.head_dim, cfg.rope_base, None)
    ctx = L.Context(cos, sin, None, pos, segment_ids_bt=jnp.ones((2, 10), jnp.int32))

    def run(tokens):
        x = jnp.take(model.wte[...], tokens, axis=0)
        firsts = None
        for i, w in enumerate(cfg.attn_windows):
            p = {k: v[i] for k, v in stacked.items()}
            y, _ = L.layer(cfg, p, x, ctx, w)
            if i == 0:
                a, _ = L.attention_block(cfg, p, x, ctx, w)
                firsts = (y, L.mlp_block(cfg, p, a))
            x = y
        return rms_norm(x, model.ln_f[...], cfg.rms_eps), firsts

    got, (y0, y0_parts) = jax.jit(run)(tokens)
    np.testing.assert_allclose(y0, y0_parts, atol=1e-6, rtol=0)
    want = model(tokens, return_hidden=True)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    hlo = jax.jit(run).lower(tokens).as_text(debug_info=True)
    assert "layer/attention_block" in hlo and "layer/mlp_block" in hlo
