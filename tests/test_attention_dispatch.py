"""attention_impl="pallas" (qwen_jax.model.dispatch.pallas_attention) against the XLA path.

On CPU the dispatch runs the TPU kernel in interpret mode. A tiny Qwen with GQA, a per-layer
window (traced through the layer scan) and packed rows (several documents, positions restarting
per document, padding) must give the same logits at every position, padding included, and the
same parameter gradients as impl="xla"; under an 8-device mesh the shard_map'd kernel must give
the unsharded XLA answer, also when the kv heads cannot follow the query heads' sharding.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax import sharding
from qwen_jax.model import config as C
from qwen_jax.model.dispatch import default_attention_impl, pallas_attention
from qwen_jax.model.factory import create_model

ATOL_LOGITS = 1e-4  # design.md §4: fp32 logits
REL_GRADS = 1e-5  # the kernels' fp32 gradient tolerance (issue 5)


def packed_batch(b: int, t: int, vocab: int, seed: int = 0):
    """Rows of 1-3 documents with per-document positions and trailing padding (segment 0)."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        used = t - int(rng.integers(0, t // 4))
        cuts = [
            0,
            *sorted(rng.choice(np.arange(2, used - 1), int(rng.integers(0, 3)), False)),
            used,
        ]
        for doc, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            seg[row, lo:hi] = doc
            pos[row, lo:hi] = np.arange(hi - lo)
    tokens = rng.integers(0, vocab, size=(b, t))
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


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


def assert_grads_close(got, want):
    for (path, g), (_, r) in zip(jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)):
        g, r = np.asarray(g), np.asarray(r)
        assert np.isfinite(g).all(), f"{path}: non-finite gradient"
        err = np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30)
        assert err <= REL_GRADS, f"{path}: relative gradient error {err:.3g} > {REL_GRADS:g}"


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


def tiny(**changes):
    base = dict(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2, attn_windows=(0, 7))
    return C.tiny(C.QWEN_7B, **(base | changes))


@pytest.mark.slow
def test_pallas_model_matches_xla():
    cfg = tiny()
    seg = packed_batch(3, 40, cfg.vocab_size)[2]
    assert int((seg == 0).sum()) > 0 and int(seg.max()) > 1  # padding and packing present
    assert_matches_xla(cfg, dict(attention_impl="pallas"), 3, 40)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv_sharded", "kv_replicated"])
def test_pallas_under_mesh_matches_unsharded_xla(kv_heads):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    change = dict(attention_impl="pallas")
    assert_matches_xla(tiny(num_kv_heads=kv_heads), change, 4, 24, seed=kv_heads, mesh=mesh)


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
