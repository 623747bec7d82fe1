"""Weight-only int8 serving (qwen_jax.model.quantize).

Every dense weight becomes int8 with a per-output-channel scale that is within half a step of the
float weight. The quantized model must compute exactly what a float model holding the
dequantized weights (wq * scale, built here in numpy) computes, with matmul_impl "xla" and
"pallas" (the int8 kernel, interpreted on CPU), tied and untied heads (1e-4 abs on fp32 logits);
the engine serving it must generate what the engine serving that float model generates (tokens,
log-probs within 1e-5), also when loaded with load_engine(int8=True) and sharded over 8 devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.checkpoint import save_params
from qwen_jax.infer.engine import Engine
from qwen_jax.infer.load import load_engine
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.model.quantize import LAYER_DENSE, is_quantized, quantize_int8
from qwen_jax.sharding import make_mesh, sharding_for
from qwen_jax.testing.configs import tiny_serving
from qwen_jax.testing.generation import PROMPTS, assert_same_generation

ATOL_LOGITS = 1e-4
NEW = 6


def cfg_for(tied: bool = False, impl: str = "xla") -> C.QwenConfig:
    return tiny_serving(tie_embeddings=tied, matmul_impl=impl)


def dense_weights(model):
    """(owner module, attribute) of every weight that quantize_int8 turns into int8."""
    head = "wte" if model.cfg.tie_embeddings else "lm_head"
    return [(model.blocks, n) for n in LAYER_DENSE] + [(model, head)]


def dequantize(wq, scale, attr):
    """float64 wq * scale, the scale broadcast over the output channels it belongs to."""
    wq, scale = np.asarray(wq, np.float64), np.asarray(scale, np.float64)
    if attr == "wte":  # tied: one scale per row (the head's output channel)
        return wq * scale[:, None]
    if attr == "lm_head":  # [D, V] * [V]
        return wq * scale
    # per layer: [L, *in, *out] * [L, *out]
    return wq * scale.reshape(scale.shape[0], *[1] * (wq.ndim - scale.ndim), *scale.shape[1:])


def dequantized(model_q, cfg):
    """A float model (same seed, so norms/biases/embeddings agree) holding wq * scale."""
    ref = create_model(cfg, seed=1)
    for (owner_q, attr), (owner, _) in zip(dense_weights(model_q), dense_weights(ref)):
        w = dequantize(getattr(owner_q, attr)[...], getattr(owner_q, f"{attr}_scale")[...], attr)
        getattr(owner, attr)[...] = jnp.asarray(w, jnp.float32)
    return ref


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_weights_are_int8_within_half_a_step_and_the_source_is_untouched(tied):
    model = create_model(cfg_for(tied), seed=1)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    model_q = quantize_int8(model)
    assert is_quantized(model_q) and not is_quantized(model)
    for (owner, attr), (owner_q, _) in zip(dense_weights(model), dense_weights(model_q)):
        w = np.asarray(getattr(owner, attr)[...], np.float64)
        wq, scale = getattr(owner_q, attr)[...], getattr(owner_q, f"{attr}_scale")[...]
        assert wq.dtype == jnp.int8 and wq.shape == w.shape and scale.dtype == jnp.float32
        step = dequantize(jnp.ones_like(wq), scale, attr)
        assert np.all(np.abs(dequantize(wq, scale, attr) - w) <= 0.5 * step * (1 + 1e-6)), attr
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_quantized_model_equals_float_model_of_dequantized_weights(tied, impl):
    cfg = cfg_for(tied, impl)
    model_q = quantize_int8(create_model(cfg, seed=1))
    ref = dequantized(model_q, cfg.replace(matmul_impl="xla"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
    got = jax.jit(lambda t: model_q(t)[0])(tokens)
    want = jax.jit(lambda t: ref(t)[0])(tokens)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)


def test_engine_serves_int8_like_the_dequantized_float_model(tmp_path):
    cfg = cfg_for(impl="pallas")
    model_q = quantize_int8(create_model(cfg, seed=1))
    want = Engine(dequantized(model_q, cfg.replace(matmul_impl="xla"))).generate(
        PROMPTS, max_new_tokens=NEW
    )
    assert_same_generation(Engine(model_q).generate(PROMPTS, max_new_tokens=NEW), want)

    # Loaded from an export with int8=True, sharded (2-way fsdp x 4-way tensor, XLA matmuls).
    save_params(create_model(cfg.replace(matmul_impl="xla"), seed=1), tmp_path / "export")
    mesh = make_mesh("fsdp_tp")
    engine, _ = load_engine(tmp_path / "export", mesh=mesh, int8=True)
    wq = engine.layers[0]["wq"]  # the engine holds per-layer weights (engine.unstack_layers)
    assert wq.dtype == jnp.int8 and engine.layers[0]["wq_scale"].dtype == jnp.float32
    want_sharding = sharding_for(("embed", "heads", "head_dim"), wq.shape, mesh)
    assert wq.sharding.is_equivalent_to(want_sharding, wq.ndim), wq.sharding
    assert_same_generation(engine.generate(PROMPTS, max_new_tokens=NEW), want)


def test_quantized_model_refuses_training_export_and_requantizing(tmp_path):
    model_q = quantize_int8(create_model(cfg_for(), seed=1))
    with pytest.raises(ValueError, match="int8 weights"):
        model_q.head_weight()
    with pytest.raises(ValueError, match="int8-quantized"):
        save_params(model_q, tmp_path / "export")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_int8(model_q)
