"""token_logprobs (the one log-probability function) against float64 numpy, its gradient against
unchunked autodiff, and the LM loss built on it against the previous fused formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.model.dispatch import matmul
from qwen_jax.model.logprobs import token_logprobs
from qwen_jax.train.losses import chunked_cross_entropy


def _data(seed, b=3, t=13, d=8, v=50):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    weights = (rng.random((b, t)) > 0.3).astype(np.float32)
    return h, w, targets, weights


@pytest.mark.parametrize("t,chunk", [(16, 4), (13, 4), (8, 32), (5, 1)])
def test_token_logprobs_match_numpy(t, chunk):
    h, w, targets, _ = _data(0, t=t)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    want = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse
    logp, got_lse = token_logprobs(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(targets), chunk=chunk
    )
    assert logp.shape == got_lse.shape == (3, t)
    assert logp.dtype == got_lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_lse), lse, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient_matches_unchunked():
    h, w, targets, weights = _data(1, t=12)
    g_bt = jnp.asarray(weights)  # an arbitrary cotangent per position

    def full(h, w):
        logits = h @ w
        lse = jax.nn.logsumexp(logits, -1)
        picked = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None], -1)[..., 0]
        return jnp.sum(g_bt * (picked - lse)) + jnp.sum(1e-2 * lse**2)

    def chunked(h, w):
        logp, lse = token_logprobs(h, w, jnp.asarray(targets), chunk=5)
        return jnp.sum(g_bt * logp) + jnp.sum(1e-2 * lse**2)

    want = jax.grad(full, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    got = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(h), jnp.asarray(w))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _previous_chunked_cross_entropy(h_btd, w_dv, targets_bt, weights_bt, *, chunk, z_loss):
    """The fused formula train/losses.py used before token_logprobs (weighted sums inside each
    rematerialised block), kept here as the reference for the refactor."""
    b, t, d = h_btd.shape
    chunk = min(chunk, t)
    pad = (-t) % chunk
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        weights_bt = jnp.pad(weights_bt, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = h_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    ts = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)
    ws = weights_bt.astype(jnp.float32).reshape(b, n, chunk).swapaxes(0, 1)

    def one(h_bcd, tgt_bc, wt_bc):
        logits = matmul("bcd,dv->bcv", h_bcd, w_dv, out_dtype=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt_bc[..., None], axis=-1)[..., 0]
        return jnp.sum(wt_bc * (lse - picked)), jnp.sum(wt_bc * z_loss * lse**2)

    block = jax.checkpoint(one) if n > 1 else one

    def body(carry, xs):
        ce, z = block(*xs)
        return (carry[0] + ce, carry[1] + z), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ws))
    return ce_sum, z_sum, jnp.sum(ws)


@pytest.mark.parametrize("t,chunk", [(16, 4), (13, 4), (8, 32)])
def test_loss_equals_the_previous_formula_in_fp32(t, chunk):
    """Same sums and gradients (fp32, summation-order rounding only) as before the refactor."""
    h, w, targets, weights = map(jnp.asarray, _data(2, t=t))

    def new(h, w):
        ce, z, _ = chunked_cross_entropy(h, w, targets, weights, chunk=chunk, z_loss=1e-3)
        return ce + z, (ce, z)

    def old(h, w):
        ce, z, _ = _previous_chunked_cross_entropy(h, w, targets, weights, chunk=chunk, z_loss=1e-3)
        return ce + z, (ce, z)

    g_new, (ce_new, z_new) = jax.grad(new, argnums=(0, 1), has_aux=True)(h, w)
    g_old, (ce_old, z_old) = jax.grad(old, argnums=(0, 1), has_aux=True)(h, w)
    np.testing.assert_allclose(float(ce_new), float(ce_old), rtol=1e-6)
    np.testing.assert_allclose(float(z_new), float(z_old), rtol=1e-6)
    for a, b in zip(g_new, g_old):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
