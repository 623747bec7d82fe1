"""LoRA adapters (qwen_jax.model.lora): layout, merge, gradients, names, errors, int8 base.

A fresh adapter (b = 0) changes nothing and leaves the base weights as the same seed's plain
model draws them; with random b the merged model (w + a b alpha/r, fp32) gives the unmerged
logits (1e-5) for attention-only and all-projection targets with GQA; only adapters are in the
trainable split and all of them get finite, nonzero gradients; an int8 base (Q-LoRA-style)
computes what a float model of the dequantized base with the same adapters computes (the int8
tolerance of tests/test_quantize.py), for matmul_impl xla and pallas, and its adapters train.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model import config as C
from qwen_jax.model.block import DENSE
from qwen_jax.model.factory import create_model, param_count
from qwen_jax.model.lora import OUR_NAMES, merge, resolve_targets, trainable_filter
from qwen_jax.testing.configs import tiny_serving
from qwen_jax.testing.tolerance import ATOL_LOGITS, assert_close

ALL = ("c_attn", "c_proj", "w1", "w2")  # Qwen's finetune.py targets: every dense projection
ATTENTION = ("q_proj", "v_proj")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))


def cfg_for(targets=ALL, **changes) -> C.QwenConfig:
    """tiny_serving (vocab 256, 4 query / 2 kv heads, D 64, F 96) with rank-4 adapters."""
    return tiny_serving(lora_rank=4, lora_targets=targets, **changes)


def randomize_b(model, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter a nonzero b (a fresh one is 0, which would hide the adapter's math)."""
    keys = iter(jax.random.split(jax.random.key(seed), len(DENSE)))
    for name in DENSE:
        var = getattr(model.blocks, f"{name}_lora_b", None)
        if var is not None:
            var[...] = std * jax.random.normal(next(keys), var.shape, var.dtype)


def names_of(state) -> set[str]:
    return {path[-1].key for path, _ in jax.tree.leaves_with_path(nnx.to_pure_dict(state))}


def logits(model, tokens=TOKENS):
    return jax.jit(lambda t: model(t)[0])(tokens)


def test_fresh_adapters_change_nothing_and_keep_the_base_init():
    cfg = cfg_for()
    model, plain = create_model(cfg, seed=1), create_model(tiny_serving(), seed=1)
    base = nnx.to_pure_dict(nnx.state(plain))
    got = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    jax.tree.map(np.testing.assert_array_equal, got, base)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(adapters)) == 2 * len(OUR_NAMES)
    wq_a, wq_b = model.blocks.wq_lora_a, model.blocks.wq_lora_b
    assert wq_a.shape == (2, 64, 4) and wq_b.shape == (2, 4, 4, 16)
    assert model.blocks.wo_lora_a.shape == (2, 4, 16, 4) and model.blocks.wo_lora_b.shape == (
        2,
        4,
        64,
    )
    assert wq_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert wq_b.get_metadata()["out_sharding"] == ("layers", None, "heads", "head_dim")
    bound = 1 / np.sqrt(64)  # PEFT's kaiming_uniform(a=sqrt(5)) on lora_A: U(+-1/sqrt(fan_in))
    assert 0.9 * bound < np.abs(np.asarray(wq_a[...])).max() <= bound
    assert not np.any(np.asarray(wq_b[...]))
    np.testing.assert_array_equal(logits(model), logits(plain))
    assert "wq_lora_a" in model.blocks.stacked()
    assert param_count(cfg) == cfg.num_params() > tiny_serving().num_params()


@pytest.mark.parametrize("targets", [ALL, ATTENTION], ids=["all", "attention"])
def test_merged_logits_equal_unmerged(targets):
    model = create_model(cfg_for(targets), seed=1)
    randomize_b(model)
    merged = merge(model)
    assert merged.cfg == model.cfg.replace(lora_rank=0, lora_targets=())
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    unmerged = logits(model)
    base = logits(create_model(tiny_serving(), seed=1))
    assert np.max(np.abs(unmerged - base)) > 0.1  # the adapters matter
    assert_close(logits(merged), unmerged, 1e-5, "merged vs unmerged logits")
    # The unrolled per-layer path (the engine's) applies the adapters too.
    stacked = model.blocks.stacked()
    layers = [{k: v[i] for k, v in stacked.items()} for i in range(2)]
    per_layer = jax.jit(lambda t, ls: model(t, layers=ls)[0])(TOKENS, layers)
    assert_close(per_layer, unmerged, 1e-5, "per-layer path")
    # Weights without an adapter are untouched.
    untouched = [n for n in DENSE if n not in resolve_targets(targets)]
    for name in untouched:
        np.testing.assert_array_equal(
            getattr(merged.blocks, name)[...], getattr(model.blocks, name)[...]
        )


def test_gradients_reach_only_the_adapters_and_match_the_loss():
    cfg = cfg_for(reward_head=True)
    model = create_model(cfg, seed=1)
    randomize_b(model)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    assert names_of(trainable) == {f"{n}_lora_{k}" for n in OUR_NAMES for k in "ab"} | {"score"}
    frozen_names = names_of(frozen)
    assert {"wq", "c_proj", "wte", "lm_head"} <= frozen_names
    assert not any("lora" in n or n == "score" for n in frozen_names)
    assert trainable_filter(tiny_serving()) is nnx.Param
    targets = jnp.roll(TOKENS, -1, axis=1)

    @jax.jit
    def loss_and_grad(trainable):
        def loss(trainable):
            m = nnx.merge(graphdef, trainable, frozen)
            h, _ = m(TOKENS, return_hidden=True)
            logp, _ = m.token_logprobs(h, targets)
            return -jnp.mean(logp) + jnp.mean(m.rewards(h, jnp.array([11, 5])) ** 2)

        return jax.value_and_grad(loss)(trainable)

    loss0, grads = loss_and_grad(trainable)
    for path, g in jax.tree.leaves_with_path(nnx.to_pure_dict(grads)):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path
    # A small step along -grad lowers the loss by eps * |grad|^2 to first order: the gradient
    # is the loss's.
    sq = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads))
    eps = 1e-2 / sq
    stepped = jax.tree.map(lambda p, g: p - eps * g, trainable, grads)
    drop = float(loss0) - float(loss_and_grad(stepped)[0])
    assert 0.9 < drop / (eps * sq) < 1.1, drop / (eps * sq)


def test_target_names_and_aliases_resolve():
    assert resolve_targets(("c_attn",)) == ("wq", "wk", "wv")
    assert resolve_targets(("c_proj",)) == ("wo", "c_proj")  # v1: attn.c_proj and mlp.c_proj
    assert resolve_targets(("down_proj",)) == ("c_proj",)
    assert resolve_targets(("w2", "w1")) == ("w1", "w2")
    hf = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")
    assert resolve_targets(hf) == ("wq", "wk", "wv", "wo", "w1", "w2", "c_proj") == OUR_NAMES
    assert resolve_targets(["c_attn", "q_proj", "wo"]) == ("wq", "wk", "wv", "wo")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(lora_rank=4, lora_targets=("c_attn", "qkv")), "'qkv' matches no weight"),
        (dict(lora_rank=4, lora_targets="c_attn"), "sequence of names"),
        (dict(lora_rank=-1, lora_targets=("c_attn",)), "lora_rank=-1 must be >= 0"),
        (dict(lora_rank=4, lora_targets=("c_attn",), lora_alpha=0.0), "lora_alpha=0.0 must be > 0"),
        (dict(lora_alpha=-1.0), "lora_alpha=-1.0 must be > 0"),
        (
            dict(lora_rank=4, lora_targets=("w1",), lora_dropout=1.0),
            r"lora_dropout=1.0 must be in \[0, 1\)",
        ),
        (dict(lora_dropout=-0.1), r"lora_dropout=-0.1 must be in"),
        (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(lora_targets=("c_attn",)), "need lora_rank > 0"),
        (dict(lora_rank=8), "lora_rank=8 needs lora_targets"),
        (dict(lora_int8_base=True), "lora_int8_base=True needs LoRA adapters"),
        # GQA: k_proj is 64 -> 2 kv heads x 16 = 32 wide; q_proj is 64 -> 64
        (dict(lora_rank=33, lora_targets=("k_proj",)), "larger than the projection wk"),
        (dict(lora_rank=65, lora_targets=("c_proj",)), "larger than the projection wo"),
    ],
)
def test_bad_lora_configs_fail_clearly(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_serving(**changes)


def test_rank_up_to_the_narrowest_side_is_accepted_and_fields_stay_out_of_hf_configs():
    tiny_serving(lora_rank=32, lora_targets=("k_proj",))
    mha = dict(num_kv_heads=4)  # the v1 layout has no GQA
    cfg = cfg_for(dropout=0.1, lora_dropout=0.05, lora_int8_base=True, reward_head=True, **mha)
    plain = tiny_serving(**mha)
    for layout in ("qwen", "qwen2"):
        hf = C.to_hf_config(cfg, layout)
        assert hf == C.to_hf_config(plain, layout)
        assert C.from_hf_config(hf) == C.from_hf_config(C.to_hf_config(plain, layout))


def dequantized_float_model(model_q):
    """A float LoRA model holding the int8 base's wq * scale (numpy) and the same adapters."""
    ref = create_model(model_q.cfg.replace(lora_int8_base=False, matmul_impl="xla"), seed=1)
    for name in DENSE:
        wq = np.asarray(getattr(model_q.blocks, name)[...], np.float64)
        scale = np.asarray(getattr(model_q.blocks, f"{name}_scale")[...], np.float64)
        shape = (scale.shape[0], *[1] * (wq.ndim - scale.ndim), *scale.shape[1:])
        getattr(ref.blocks, name)[...] = jnp.asarray(wq * scale.reshape(shape), jnp.float32)
    for name in OUR_NAMES:
        for k in "ab":
            getattr(ref.blocks, f"{name}_lora_{k}")[...] = getattr(
                model_q.blocks, f"{name}_lora_{k}"
            )[...]
    return ref


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_int8_base_with_float_adapters_runs_trains_and_merges(impl):
    cfg = cfg_for(lora_int8_base=True, matmul_impl=impl)
    model = create_model(cfg, seed=1)
    assert model.blocks.wq[...].dtype == jnp.int8 and model.blocks.c_proj[...].dtype == jnp.int8
    assert model.lm_head[...].dtype == jnp.float32  # the head stays float: the loss needs it
    assert model.blocks.wq_lora_a[...].dtype == jnp.float32
    assert isinstance(model.blocks.wq_lora_a, nnx.LoRAParam)
    assert param_count(cfg) == cfg.num_params()
    randomize_b(model)
    ref = dequantized_float_model(model)
    np.testing.assert_allclose(logits(model), logits(ref), atol=ATOL_LOGITS, rtol=0)
    np.testing.assert_allclose(logits(merge(model)), logits(ref), atol=ATOL_LOGITS, rtol=0)

    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    targets = jnp.roll(TOKENS, -1, axis=1)

    @jax.jit
    def loss_and_grad(trainable):
        def loss(trainable):
            m = nnx.merge(graphdef, trainable, frozen)
            h, _ = m(TOKENS, return_hidden=True)
            return -jnp.mean(m.token_logprobs(h, targets)[0])

        return jax.value_and_grad(loss)(trainable)

    loss0, grads = loss_and_grad(trainable)
    for path, g in jax.tree.leaves_with_path(nnx.to_pure_dict(grads)):
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, path
    for _ in range(3):
        trainable = jax.tree.map(lambda p, g: p - 0.5 * g, trainable, loss_and_grad(trainable)[1])
    assert float(loss_and_grad(trainable)[0]) < float(loss0)
