"""Model-level parity: a config change (kernel impl, mesh) must not change logits or gradients."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.model.factory import create_model
from qwen_jax.testing.batches import packed_batch
from qwen_jax.testing.tolerance import ATOL_LOGITS, assert_grads_close


def logits_and_grads(model, tokens, pos, seg):
    """Logits [B,T,V] and d(sum(logits * w))/dparams for a fixed random w (all positions)."""
    graphdef, state = nnx.split(model)
    w = jax.random.normal(jax.random.key(1), (*tokens.shape, model.cfg.vocab_size))

    @jax.jit
    def run(state):
        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(tokens, positions_bt=pos, segment_ids_bt=seg)
            return jnp.sum(logits * w), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
        return logits, grads

    return run(state)


def assert_matches_xla(cfg, change: dict, batch: int, length: int, *, seed=0, mesh=None) -> float:
    """cfg.replace(**change), built and run under `mesh` if given, gives the logits and parameter
    gradients of cfg's unsharded XLA model on a packed batch; returns the max |logit difference|.
    """
    tokens, pos, seg = packed_batch(batch, length, cfg.vocab_size, seed=seed)
    want_logits, want_grads = logits_and_grads(create_model(cfg), tokens, pos, seg)
    model = create_model(cfg.replace(**change), mesh=mesh)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        logits, grads = logits_and_grads(model, tokens, pos, seg)
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_allclose(logits, want_logits, atol=ATOL_LOGITS, rtol=0)
    assert_grads_close(grads, want_grads)
    return float(np.max(np.abs(np.asarray(logits) - np.asarray(want_logits))))
