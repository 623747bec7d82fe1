"""Dropout (QwenConfig.dropout / lora_dropout, only with Qwen.__call__(dropout_rng=key)) and the
reward head (QwenConfig.reward_head, Qwen.rewards).

No key is no dropout at all (inference is unaffected); a key's masks are reproducible, differ
between keys, are the same in the scan and the per-layer (engine) paths, are redrawn identically
by remat's recompute (jit + remat_policy="full" gives the plain gradients), and do not depend on
the mesh (8 fake devices). Dropout is inverted: the mean over many keys of a block's output is
its no-dropout output (checked per block: the final RMSNorm makes logits blind to a missing
1/(1-p) rescale, a block's residual sum is not). The reward is h[b, index_b[b]] @ score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model import block, rope
from qwen_jax.model.factory import create_model
from qwen_jax.model.layers import dropout
from qwen_jax.sharding import make_mesh
from qwen_jax.testing.configs import tiny_serving
from qwen_jax.testing.tolerance import ATOL_LOGITS, assert_close, assert_grads_close

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
K0, K1 = jax.random.key(0), jax.random.key(1)


def forward(model, **kw):
    """A jitted key -> logits [B, T, V] of `model` on TOKENS (one compile for every key)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, key: nnx.merge(graphdef, state)(TOKENS, dropout_rng=key, **kw)[0])
    return lambda key: run(state, key)


def set_random_lora_b(model, std: float = 0.1) -> None:
    for i, name in enumerate(block.DENSE):
        var = getattr(model.blocks, f"{name}_lora_b", None)
        if var is not None:
            value = std * jax.random.normal(jax.random.key(10 + i), var.shape, var.dtype)
            var[...] = jax.device_put(value, var[...].sharding)  # keep a sharded model's layout


def test_no_key_is_no_dropout_and_keys_are_reproducible():
    model = create_model(tiny_serving(dropout=0.1), seed=1)
    plain = create_model(tiny_serving(), seed=1)
    run, run_plain = forward(model), forward(plain)
    no_key = run(None)
    np.testing.assert_array_equal(no_key, run_plain(None))
    np.testing.assert_array_equal(no_key, run_plain(K0))  # rate 0 with a key: no dropout
    a, b = run(K0), run(K1)
    np.testing.assert_array_equal(a, run(K0))
    assert np.max(np.abs(a - no_key)) > 1e-2 and np.max(np.abs(a - b)) > 1e-2
    # The per-layer path (the engine's) draws the same masks as the layer scan.
    stacked = model.blocks.stacked()
    layers = [{k: v[i] for k, v in stacked.items()} for i in range(2)]
    assert_close(forward(model, layers=layers)(K0), a, 1e-5, "per-layer path with dropout")


def test_dropout_is_inverted():
    x = jax.random.normal(K1, (4096,)) + 3.0
    y = np.asarray(dropout(x, 0.25, K0))
    dropped = y == 0
    assert abs(dropped.mean() - 0.25) < 0.03
    np.testing.assert_allclose(y[~dropped], np.asarray(x)[~dropped] / 0.75, rtol=1e-6)
    assert dropout(x, 0.25, None) is x and dropout(x, 0.0, K0) is x


def test_blocks_keep_their_expectation_under_dropout():
    """Mean over 256 keys of attention_block / mlp_block (residual dropout 0.3, adapter dropout
    0.3 on wo and c_proj, whose adapter terms are linear in the dropped input) vs no dropout:
    the error is noise (~1/sqrt(256) of one sample's deviation); a dropout without the
    1/(1-p) rescale is biased by ~0.45 of it."""
    cfg = tiny_serving(dropout=0.3, lora_rank=4, lora_targets=("o_proj", "down_proj"))
    cfg = cfg.replace(lora_dropout=0.3)
    model = create_model(cfg, seed=1)
    set_random_lora_b(model)
    p = {k: v[0] for k, v in model.blocks.stacked().items()}
    x = jax.random.normal(K1, (2, 12, 64))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    cos, sin = rope.rope_angles(pos, cfg.head_dim, cfg.rope_base, None)
    ctx = block.Context(cos, sin, None, pos, segment_ids_bt=jnp.ones((2, 12), jnp.int32))
    blocks = {
        "attention": lambda key: block.attention_block(cfg, p, x, ctx, 0, rng=key)[0],
        "mlp": lambda key: block.mlp_block(cfg, p, x, rng=key),
    }
    keys = jax.random.split(K0, 256)
    for name, fn in blocks.items():
        want = np.asarray(fn(None))
        samples = np.asarray(jax.jit(jax.vmap(fn))(keys))
        spread = np.sqrt(np.mean((samples - want) ** 2))
        bias = np.sqrt(np.mean((samples.mean(0) - want) ** 2))
        assert spread > 0.1, name
        assert bias < 0.15 * spread, f"{name}: bias {bias / spread:.3f} of the spread"


def test_adapter_dropout_acts_on_adapter_inputs_only():
    cfg = tiny_serving(lora_rank=4, lora_targets=("c_attn", "w1"), lora_dropout=0.5)
    model = create_model(cfg, seed=1)
    run = forward(model)
    np.testing.assert_array_equal(run(K0), run(None))  # b = 0: the adapters add nothing
    set_random_lora_b(model)
    run = forward(model)
    assert np.max(np.abs(run(K0) - run(None))) > 1e-2
    np.testing.assert_array_equal(run(K0), run(K0))


def test_remat_recomputes_the_same_masks():
    """jit + remat_policy="full": logits and parameter gradients with dropout equal the
    non-remat ones (a recompute drawing other masks would give other gradients)."""

    def logits_and_grads(cfg):
        graphdef, state = nnx.split(create_model(cfg, seed=1))
        w = jax.random.normal(K1, (2, 12, cfg.vocab_size))

        @jax.jit
        def run(state):
            def loss(state):
                out = nnx.merge(graphdef, state)(TOKENS, dropout_rng=K0)[0]
                return jnp.sum(out * w), out

            return jax.value_and_grad(loss, has_aux=True)(state)

        (_, out), grads = run(state)
        return out, grads

    cfg = tiny_serving(dropout=0.2)
    want_logits, want_grads = logits_and_grads(cfg)
    got_logits, got_grads = logits_and_grads(cfg.replace(remat_policy="full"))
    np.testing.assert_allclose(got_logits, want_logits, atol=ATOL_LOGITS, rtol=0)
    assert_grads_close(got_grads, want_grads)


def test_dropout_lora_and_reward_head_sharded_equal_unsharded():
    """fsdp x tensor over 8 devices: adapters placed by their logical axes (rank unsharded), the
    head's ("embed", None), and the same key draws the same masks as on one device."""
    cfg = tiny_serving(dropout=0.1, lora_rank=4, lora_targets=("c_attn", "c_proj", "w1", "w2"))
    cfg = cfg.replace(lora_dropout=0.1, reward_head=True)
    index = jnp.array([11, 4])

    def run(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def f(state):
            m = nnx.merge(graphdef, state)
            h, _ = m(TOKENS, return_hidden=True, dropout_rng=K0)
            return m.logits(h), m.rewards(h, index)

        return f(state)

    model = create_model(cfg, seed=1)
    set_random_lora_b(model)
    want = run(model)
    mesh = make_mesh("fsdp_tp")
    sharded = create_model(cfg, seed=1, mesh=mesh)
    set_random_lora_b(sharded)
    with jax.set_mesh(mesh):
        got = run(sharded)
    np.testing.assert_allclose(got[0], want[0], atol=ATOL_LOGITS, rtol=0)
    assert_close(got[1], want[1], 1e-5, "rewards")


def test_rewards_read_the_head_at_the_given_positions():
    cfg = tiny_serving(reward_head=True)
    model = create_model(cfg, seed=1)
    score = model.score
    assert score.shape == (64, 1) and score.get_metadata()["out_sharding"] == ("embed", None)
    assert 0.5 * cfg.init_std < float(np.std(np.asarray(score[...]))) < 1.5 * cfg.init_std
    # The head draws its init key last: the LM is the same seed's plain model.
    plain = create_model(tiny_serving(), seed=1)
    np.testing.assert_array_equal(forward(model)(None), forward(plain)(None))

    h = model(TOKENS, return_hidden=True)[0]
    index = jnp.array([11, 4])
    got = model.rewards(h, index)
    h64, s64 = np.asarray(h, np.float64), np.asarray(score[...], np.float64)
    want = np.stack([h64[b, int(index[b])] @ s64[:, 0] for b in range(2)])
    assert got.dtype == jnp.float32 and got.shape == (2,)
    assert_close(got, want, 1e-6, "rewards")
    half = model.rewards(h.astype(jnp.bfloat16), index)
    assert half.dtype == jnp.float32
    with pytest.raises(ValueError, match="no reward head"):
        plain.rewards(h, index)
