"""The fused LM-head cross-entropy (train/chunked_loss.py) equals the current loss
(train/objectives.py LMObjective -> losses.chunked_cross_entropy) in value and in the gradient
of every model parameter on a tiny model, and holds far less temporary memory than the
unchunked loss at a vocabulary-heavy shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.testing.batches import packed_batch
from qwen_jax.testing.tolerance import KERNEL_TOL, REL_GRADS, assert_close, assert_grads_close
from qwen_jax.train.chunked_loss import fused_cross_entropy
from qwen_jax.train.losses import chunked_cross_entropy
from qwen_jax.train.objectives import LMObjective, StepContext

Z_LOSS = 1e-3


def _batch(cfg, b=2, t=40):
    tokens, pos, seg = packed_batch(b, t, cfg.vocab_size, seed=3)
    return {
        "decoder_input_tokens": tokens,
        "decoder_target_tokens": jnp.roll(tokens, -1, axis=1),
        "decoder_loss_weights": (seg > 0).astype(jnp.int32),  # padding carries no loss
        "decoder_segment_ids": seg,
        "decoder_positions": pos,
    }


def _current(model, batch):
    obj, m = LMObjective(z_loss=Z_LOSS, chunk=16).loss_sums(model, batch, StepContext())
    return obj, (m["loss"], m["z_loss"], m["tokens"])


def _fused(model, batch):
    """The same objective with `objective.fused_loss` on (LMObjective(fused=True))."""
    obj, m = LMObjective(z_loss=Z_LOSS, chunk=16, fused=True).loss_sums(
        model, batch, StepContext()
    )  # 40 positions, chunk 16: 3 chunks, the last one padded
    return obj, (m["loss"], m["z_loss"], m["tokens"])


def _value_and_grads(loss_fn, model, batch):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), batch), has_aux=True)(
            state
        )

    return run(state)


@pytest.mark.parametrize(
    "dtype, rel_grads, changes",
    [
        ("float32", REL_GRADS, dict(tie_embeddings=True)),
        ("bfloat16", KERNEL_TOL["bfloat16"], dict(num_kv_heads=2)),
    ],
)
def test_fused_equals_current_loss(dtype, rel_grads, changes):
    """Value (fp32 sums, 1e-6 relative at both dtypes: both accumulate the same logits in fp32)
    and parameter gradients (fp32: the kernels' 1e-5; bf16: the kernels' 2e-2, since the fused
    path rounds dlogits to bf16 before the two head matmuls as the compute dtype asks) on tiny
    models with packed rows, padding and z-loss: fp32 with a tied head (the embedding's
    gradient sums the custom VJP's head part and the lookup's), bf16 untied with GQA."""
    cfg = C.tiny(C.QWEN_7B, dtype=dtype, param_dtype="float32", num_layers=1, **changes)
    model = create_model(cfg)
    batch = _batch(cfg)
    (want, want_m), want_g = _value_and_grads(_current, model, batch)
    (got, got_m), got_g = _value_and_grads(_fused, model, batch)
    assert_close(got, want, 1e-6, "objective")
    for g, w, name in zip(got_m, want_m, ("ce", "z", "tokens")):
        assert_close(g, w, 1e-6, name)
    assert float(want_m[1]) > 0  # the z-loss term is live, so its gradient is checked too
    assert_grads_close(got_g, want_g, rel_grads)
    # Without differentiation the primal (no gradient work) gives the same sums.
    graphdef, state = nnx.split(model)
    plain = jax.jit(lambda s: _fused(nnx.merge(graphdef, s), batch))(state)
    assert_close(plain[0], want, 1e-6, "objective, forward only")


def test_fused_temp_memory_below_unchunked():
    """At B2 T512 D32 V16384 the unchunked loss's gradient program holds [B, T, V] fp32 logits
    (64 MiB) in temporaries; the fused one holds a [B, 16, V] block, dW and dh: XLA's
    memory_analysis of the compiled programs must show at most a quarter of the temp bytes."""
    b, t, d, v = 2, 512, 32, 16384
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(lambda h, w, y, m: loss(h, w, y, m), argnums=(0, 1)))
        return grad.lower(h, w, ids, ids).compile().memory_analysis().temp_size_in_bytes

    def unchunked(h, w, y, m):
        ce, z, _ = chunked_cross_entropy(h, w, y, m, chunk=t, z_loss=Z_LOSS)
        return ce + z

    def fused(h, w, y, m):
        return fused_cross_entropy(h, w, y, m, chunk=16, z_loss=Z_LOSS)[0]

    full, small = temp_bytes(unchunked), temp_bytes(fused)
    assert full >= b * t * v * 4  # the reference really materialises the logits
    assert small * 4 <= full, (small, full)


def test_stop_gradient_metrics_and_data_inputs():
    """The ce / z sums are metrics: differentiating them alone gives zero (documented); the
    integer targets need no cotangent; a scaled objective scales the gradient."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(1, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 11, size=(1, 8)), jnp.int32)
    m = jnp.ones((1, 8), jnp.int32)
    g_ce = jax.grad(lambda h: fused_cross_entropy(h, w, y, m, chunk=3)[1])(h)
    g_obj = jax.grad(lambda h: fused_cross_entropy(h, w, y, m, chunk=3)[0])(h)
    assert not np.any(np.asarray(g_ce))
    assert np.all(np.isfinite(np.asarray(g_obj))) and np.any(np.asarray(g_obj))
    # The backward scales the forward-computed gradient by the incoming cotangent.
    g_scaled = jax.grad(lambda h: -2.5 * fused_cross_entropy(h, w, y, m, chunk=3)[0])(h)
    assert_close(g_scaled, -2.5 * g_obj, 1e-6, "scaled cotangent")
