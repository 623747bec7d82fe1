"""Sampling: filters never leave their allowed sets, seeds reproduce, near-zero temperature is
greedy, and the repetition penalty matches its formula (numpy references written here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.infer.sampling import SamplingParams, sample, seen_tokens

V = 64
DRAWS = 4096


def _logits(seed=0, scale=2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=V).astype(np.float32)


def _draw(params: SamplingParams, logits: np.ndarray, seed=0) -> np.ndarray:
    """DRAWS independent draws (one row per draw) from one logits vector."""
    rows = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, V))
    toks, _ = jax.jit(sample, static_argnames="spec")(
        rows, jax.random.key(seed), params.knobs(), params.spec()
    )
    return np.asarray(toks)


def _np_nucleus(logits: np.ndarray, top_p: float, temperature: float) -> set[int]:
    """Smallest set of most likely tokens whose probability reaches top_p."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep, mass = [], 0.0
    for i in order:
        keep.append(int(i))
        mass += p[i]
        if mass >= top_p:
            break
    return set(keep)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_never_leaves_the_k_best(k):
    logits = _logits(k)
    allowed = set(np.argsort(-logits)[:k].tolist())
    toks = _draw(SamplingParams(temperature=1.5, top_k=k), logits)
    assert set(toks.tolist()) <= allowed
    assert len(set(toks.tolist())) == k  # every allowed token does get drawn (not greedy)


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95])
def test_top_p_never_leaves_the_nucleus(top_p):
    logits = _logits(int(top_p * 100), scale=1.0)
    allowed = _np_nucleus(logits, top_p, temperature=1.0)
    toks = _draw(SamplingParams(temperature=1.0, top_p=top_p), logits)
    assert set(toks.tolist()) <= allowed
    assert len(allowed) >= 2 and len(set(toks.tolist())) >= 2  # a real filter, not greedy


def test_top_k_and_top_p_together_draw_from_the_intersection():
    logits = _logits(3)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8)
    top10 = np.argsort(-logits)[:10]
    # top-p applies to the renormalised top-k distribution (transformers' warper order)
    allowed = {int(top10[i]) for i in _np_nucleus(logits[top10], 0.8, 0.7)}
    toks = _draw(params, logits)
    assert set(toks.tolist()) <= allowed


def test_frequencies_follow_the_temperature_softmax():
    logits = _logits(7)
    toks = _draw(SamplingParams(temperature=2.0), logits, seed=1)
    p = np.exp(logits / 2.0 - (logits / 2.0).max())
    p /= p.sum()
    freq = np.bincount(toks, minlength=V) / DRAWS
    assert np.abs(freq - p).max() < 0.03  # 4096 draws: std of each frequency < 0.008


def test_near_zero_temperature_is_greedy_and_logprobs_are_raw():
    logits = np.random.default_rng(5).normal(size=(8, V)).astype(np.float32)
    cold = SamplingParams(temperature=1e-6, seed=3)
    toks, logp = sample(jnp.asarray(logits), jax.random.key(0), cold.knobs(), cold.spec())
    np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(logp), ref[np.arange(8), logits.argmax(-1)], atol=1e-5)


def test_same_seed_same_draws_other_seed_other_draws():
    logits = _logits(9)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    a, b = _draw(params, logits, seed=11), _draw(params, logits, seed=11)
    c = _draw(params, logits, seed=12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_repetition_penalty_matches_ctrl_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, V)).astype(np.float32)
    prompt = np.array([[3, 5, 5, 9], [1, 2, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])  # row 1's zeros are padding, not token 0
    seen = seen_tokens(jnp.asarray(prompt), jnp.asarray(mask), V)
    expect_seen = np.zeros((2, V), bool)
    expect_seen[0, [3, 5, 9]] = True
    expect_seen[1, [1, 2]] = True
    np.testing.assert_array_equal(np.asarray(seen), expect_seen)
    # Make a seen token the argmax so that the penalty must change the choice.
    logits[0, 5] = logits[0].max() + 0.1
    logits[1, 2] = logits[1].max() + 0.1
    pen = 1.3
    ref = np.where(expect_seen, np.where(logits > 0, logits / pen, logits * pen), logits)
    params = SamplingParams(repetition_penalty=pen)
    toks, _ = sample(jnp.asarray(logits), jax.random.key(0), params.knobs(), params.spec(), seen)
    np.testing.assert_array_equal(np.asarray(toks), ref.argmax(-1))
    assert (ref.argmax(-1) != logits.argmax(-1)).all()


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0), "repetition_penalty"),
    ],
)
def test_invalid_params_are_rejected(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)
