"""RL rollouts through the engine (qwen_jax.rl.rollout) and the scoring functions
(qwen_jax.rl.scoring): the sampler's log-probs are the training forward's, padding changes no
row, values / scores sit at the documented positions, refreshing the policy compiles nothing,
seeds reproduce, bad prompts fail before compiling."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from qwen_jax import sharding
from qwen_jax.infer.engine import bucket_length
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model, state_shardings
from qwen_jax.rl import scoring
from qwen_jax.rl.rollout import RolloutEngine, RolloutError
from qwen_jax.train.reward import sequence_rewards
from qwen_jax.train.step import init_state

# seq_length 16 < the rollouts' lengths: the config's dynamic NTK / LogN would change the
# sampler's numbers there, so agreement with the training forward shows the engine runs without.
CFG = C.tiny(vocab_size=256, init_std=0.1, max_position_embeddings=128, num_kv_heads=2)
CFG = CFG.replace(seq_length=16)
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 250, 1, 4], [200, 13], [8, 9, 10, 11, 12], [30, 31, 32]]
N_SAMPLES = 2  # 4 prompts x 2 = 8 rows: divisible by the 8 fake devices of the mesh test
MAX_PROMPT, MAX_NEW = 20, 10  # prompts up to 16 and up to 20 tokens: two engine buckets
STOPS = tuple(range(40, 70))  # a random model samples one now and then: rows of both kinds
PAD = 0
SAMPLING = SamplingParams(temperature=1.0)  # top_p 1: the model's own distribution
ATOL = 1e-5  # fp32 log-probs / values computed along two paths (design.md §4)


def rollout_engine(model, sampling=SAMPLING, mesh=None):
    return RolloutEngine(
        model,
        mesh=mesh,
        max_prompt_len=MAX_PROMPT,
        max_new_tokens=MAX_NEW,
        stop_ids=STOPS,
        sampling=sampling,
        pad_id=PAD,
    )


@contextlib.contextmanager
def count_compiles():
    """Yields a list that receives one entry per XLA compilation inside the block (any jitted
    program, not only the engine's)."""
    seen: list[str] = []

    def listener(name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=1)


@pytest.fixture(scope="module")
def value_model():
    return create_model(CFG.replace(reward_head=True), seed=5)


@pytest.fixture(scope="module")
def engine(model):
    return rollout_engine(model)


@pytest.fixture(scope="module")
def rollouts(engine):
    return engine.generate(PROMPTS, N_SAMPLES, seed=3)


@nnx.jit
def score_all(policy, vm, tokens_bt, lengths_b):
    """(logp, entropy, values, scores) of a batch: every scoring function in one program, so
    the tests below call it on other batches of the same shape without compiling again."""
    logp, entropy = scoring.sequence_logprobs(policy, tokens_bt, lengths_b, with_entropy=True)
    values = scoring.token_values(vm, tokens_bt, lengths_b)
    return logp, entropy, values, scoring.sequence_scores(vm, tokens_bt, lengths_b)


@pytest.fixture(scope="module")
def scored(model, value_model):
    """scored(tokens, lengths) -> numpy (logp, entropy, values, scores)."""
    return lambda tok, n: tuple(map(np.asarray, score_all(model, value_model, tok, n)))


def test_rollouts_layout(rollouts):
    r, n = rollouts, len(PROMPTS) * N_SAMPLES
    t = bucket_length(MAX_PROMPT + MAX_NEW)
    assert r.tokens.shape == r.sample_logp.shape == (n, t) and r.tokens.dtype == np.int32
    np.testing.assert_array_equal(r.group, np.repeat(np.arange(len(PROMPTS)), N_SAMPLES))
    np.testing.assert_array_equal(r.prompt_lengths, [len(PROMPTS[g]) for g in r.group])
    assert r.finished.any() and not r.finished.all()  # both kinds are exercised below
    mask = r.response_mask()
    for row, resp in enumerate(r.responses()):
        p, e = r.prompt_lengths[row], r.lengths[row]
        assert r.tokens[row, :p].tolist() == PROMPTS[r.group[row]]
        assert (r.tokens[row, e:] == PAD).all() and (r.sample_logp[row, e:] == 0).all()
        assert (r.sample_logp[row, :p] == 0).all() and (r.sample_logp[row, p:e] < 0).all()
        assert mask[row].tolist() == [float(p <= i < e) for i in range(t)]
        if r.finished[row]:
            assert r.tokens[row, e - 1] in STOPS and resp == r.tokens[row, p : e - 1].tolist()
        else:
            assert e - p == MAX_NEW and resp == r.tokens[row, p:e].tolist()
        assert not set(resp) & set(STOPS)
    # the n samples of one prompt differ (each row draws its own tokens)
    assert r.tokens[0].tolist() != r.tokens[1].tolist()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sequence_logprobs_equal_the_sampler_and_engine_score(
    model, engine, rollouts, scored, top_p
):
    """sample_logp is the model's raw log-probability (qwen_jax.infer.sampling): at top_p 1
    that of the distribution sampled; at top_p 0.9 the tokens come from the truncated one but
    the recorded numbers are still the raw model's, so they equal sequence_logprobs too."""
    r = rollouts
    if top_p < 1.0:
        r = rollout_engine(model, SamplingParams(temperature=1.0, top_p=top_p)).generate(
            PROMPTS, N_SAMPLES, seed=3
        )
    logp = scored(r.tokens, r.lengths)[0]
    np.testing.assert_allclose(logp * r.response_mask(), r.sample_logp, atol=ATOL, rtol=0)
    t = np.arange(r.tokens.shape[1])[None, :]
    assert (logp[:, 0] == 0).all() and (logp[t >= r.lengths[:, None]] == 0).all()
    assert (logp[(t >= 1) & (t < r.lengths[:, None])] < 0).all()
    if top_p < 1.0:
        return
    # Engine.score of the same responses (stop token included): another padding and batch
    prompts = [PROMPTS[g] for g in r.group]
    conts = [r.tokens[i, p:e].tolist() for i, (p, e) in enumerate(zip(r.prompt_lengths, r.lengths))]
    for i, got in enumerate(engine.engine.score(prompts, conts)):
        np.testing.assert_allclose(got, logp[i, r.prompt_lengths[i] : r.lengths[i]], atol=ATOL)


def test_padding_and_neighbours_never_change_a_row(model, rollouts, scored):
    r = rollouts
    want = scored(r.tokens, r.lengths)
    # junk instead of pad_id after every row's end, rows in another order: same numbers
    order = np.roll(np.arange(len(r.lengths)), 3)
    junk = np.where(np.arange(r.tokens.shape[1]) < r.lengths[:, None], r.tokens, 97)[order]
    for got, w in zip(scored(junk, r.lengths[order]), want, strict=True):
        np.testing.assert_allclose(got, w[order], atol=ATOL, rtol=0)
    # a row alone, unpadded, equals its row of the padded batch
    row = int(np.argmin(r.lengths))
    e = int(r.lengths[row])
    alone = nnx.jit(scoring.sequence_logprobs)(
        model, r.tokens[row : row + 1, :e], r.lengths[row : row + 1]
    )
    np.testing.assert_allclose(np.asarray(alone)[0], want[0][row, :e], atol=ATOL, rtol=0)


def test_entropy_values_and_scores_at_the_documented_positions(
    model, value_model, rollouts, scored
):
    """From the full forward's hidden states / logits in numpy: values[t] = score . h[t - 1],
    scores = score . h[length - 1], entropy[t] of the softmax at t - 1; zeros elsewhere."""
    r = rollouts
    tokens, lengths = jnp.asarray(r.tokens), jnp.asarray(r.lengths)
    seg = scoring.valid_mask(tokens, lengths)

    @nnx.jit
    def reference(policy, vm):
        h = vm(tokens, segment_ids_bt=seg, return_hidden=True)[0]
        # the reward as train/reward.py reads it: causal attention, no segment ids
        return h, sequence_rewards(vm, tokens, lengths), policy(tokens, segment_ids_bt=seg)[0]

    h, trained, logits = (np.asarray(x, np.float64) for x in reference(model, value_model))
    w = np.asarray(value_model.score[...], np.float64)[:, 0]
    logq = logits - logits.max(-1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    want_v, want_e = np.zeros(r.tokens.shape), np.zeros(r.tokens.shape)
    want_s = np.zeros(len(r.lengths))
    for b, e in enumerate(r.lengths):
        for t in range(1, e):
            want_v[b, t] = h[b, t - 1] @ w  # the state before token t
            want_e[b, t] = -(np.exp(logq[b, t - 1]) * logq[b, t - 1]).sum()
        want_s[b] = h[b, e - 1] @ w  # the last token (the stop token when finished)
    _, entropy, values, scores = scored(r.tokens, r.lengths)
    np.testing.assert_allclose(values, want_v, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, want_s, atol=ATOL, rtol=0)
    np.testing.assert_allclose(entropy, want_e, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scores, trained, atol=ATOL, rtol=0)  # where the RM was trained
    with pytest.raises(ValueError, match="score head"):
        scoring.token_values(model, tokens, lengths)


@pytest.mark.slow  # two backward passes and an 8-device program to compile
def test_gradients_and_sharded_jit(model, value_model, rollouts, scored):
    """Differentiable (nnx.grad of a masked log-prob sum equals that of the full-logits
    log_softmax) and the same numbers under jit with the batch sharded over the mesh."""
    r = rollouts
    tokens, lengths = jnp.asarray(r.tokens), jnp.asarray(r.lengths)
    mask = jnp.asarray(r.response_mask())

    def ours(m):
        return jnp.sum(scoring.sequence_logprobs(m, tokens, lengths) * mask)

    def full(m):
        seg = scoring.valid_mask(tokens, lengths)
        logp_btv = jax.nn.log_softmax(m(tokens, segment_ids_bt=seg)[0], axis=-1)
        picked = jnp.take_along_axis(logp_btv[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(picked * mask[:, 1:])

    @nnx.jit
    def both(m):
        return nnx.value_and_grad(ours)(m), nnx.value_and_grad(full)(m)

    (v1, g1), (v2, g2) = both(model)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g1))

    # the policy and the value model sharded as a training state holds them, the batch over
    # the data / fsdp axes (train/step.py's batch shardings)
    mesh = sharding.make_mesh("fsdp")
    models = (model, value_model)
    on_mesh = [jax.device_put(nnx.state(m), state_shardings(m, mesh)) for m in models]
    graphdefs = [nnx.graphdef(m) for m in models]
    rows = NamedSharding(mesh, sharding.logical_spec("batch", None, mesh=mesh))
    row = NamedSharding(mesh, sharding.logical_spec("batch", mesh=mesh))

    @jax.jit
    def on_devices(states, tok, n):
        return score_all(*(nnx.merge(g, s) for g, s in zip(graphdefs, states)), tok, n)

    with jax.set_mesh(mesh):
        got = on_devices(on_mesh, jax.device_put(tokens, rows), jax.device_put(lengths, row))
    assert got[0].sharding.is_equivalent_to(rows, 2)  # the batch stayed split over devices
    for a, b in zip(got, scored(r.tokens, r.lengths), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0)


def test_refresh_equals_a_fresh_engine_and_compiles_nothing():
    eng = rollout_engine(create_model(CFG, seed=1))
    first = eng.generate(PROMPTS, N_SAMPLES, seed=7)
    # new weights as a training state holds them; a train step would donate them afterwards
    new = init_state(create_model(CFG, seed=2), optax.sgd(0.1))["params"]
    eng.refresh(new)  # the first refresh may compile its split / copy programs
    got = eng.generate(PROMPTS, N_SAMPLES, seed=7)
    fresh = rollout_engine(create_model(CFG, seed=2)).generate(PROMPTS, N_SAMPLES, seed=7)
    np.testing.assert_array_equal(got.tokens, fresh.tokens)
    np.testing.assert_array_equal(got.sample_logp, fresh.sample_logp)
    assert got.tokens.tolist() != first.tokens.tolist()

    other = nnx.state(create_model(CFG, seed=1), nnx.Param)
    longer = [p + list(range(100, 110)) for p in PROMPTS]  # another bucket on its own
    with count_compiles() as compiles:
        eng.refresh(other)
        again = eng.generate(PROMPTS, N_SAMPLES, seed=7)
        eng.refresh(new)
        eng.generate(longer, N_SAMPLES, seed=8)
    assert compiles == []
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.sample_logp, first.sample_logp)


def test_seeds_and_bad_prompts(engine, rollouts):
    same = engine.generate(PROMPTS, N_SAMPLES, seed=3)
    np.testing.assert_array_equal(same.tokens, rollouts.tokens)
    np.testing.assert_array_equal(same.sample_logp, rollouts.sample_logp)
    other = engine.generate(PROMPTS, N_SAMPLES, seed=4)
    assert other.tokens.tolist() != rollouts.tokens.tolist()

    long = [[1, 2], list(range(1, MAX_PROMPT + 2))]
    fresh = rollout_engine(create_model(CFG, seed=9))
    with count_compiles() as compiles:
        with pytest.raises(
            RolloutError, match=r"^prompt 1 has 21 tokens, more than max_prompt_len=20"
        ):
            fresh.generate(long, 2, seed=0)
        with pytest.raises(RolloutError, match="prompt 0 is empty"):
            fresh.generate([[]], 2, seed=0)
        with pytest.raises(RolloutError, match="n .* must be >= 1"):
            fresh.generate(PROMPTS, 0, seed=0)
    assert compiles == []
    assert isinstance(RolloutError("x"), ValueError)
