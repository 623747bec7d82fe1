"""The generation engine: KV-cache decoding equals recomputing the whole sequence every step,
padding/bucketing/batching change nothing, budgets, stops, streaming and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.infer import engine as E
from qwen_jax.infer.engine import Engine, GenerationError
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model

CFG = C.tiny(vocab_size=256, init_std=0.1, max_position_embeddings=128)
ATOL = 1e-4  # fp32 log-probs (design.md §4)
PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 250, 1], [200, 13], [8, 9, 10, 11, 12]]
NEW = 10


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=4)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, donate=False)  # the tests use `model` too


@pytest.fixture(scope="module")
def greedy(engine):
    return engine.generate(PROMPTS, max_new_tokens=NEW)


def test_cached_decoding_equals_recomputing_every_step(model, greedy):
    """At every step, a full forward over prompt + tokens so far (no cache) picks the same token
    with the same log-probability. Right padding to one fixed length keeps a single compile;
    causality makes it invisible to the real positions."""
    width = max(map(len, PROMPTS)) + NEW
    full = jax.jit(lambda t, m: jax.nn.log_softmax(model(t, segment_ids_bt=m)[0], axis=-1))
    for res in greedy:
        seq = list(res.prompt_ids)
        assert len(res.token_ids) == NEW and res.finish_reason == "length"
        for tok, lp in zip(res.token_ids, res.logprobs):
            tokens = np.zeros((1, width), np.int32)
            mask = np.zeros((1, width), np.int32)
            tokens[0, : len(seq)], mask[0, : len(seq)] = seq, 1
            logp = np.asarray(full(jnp.asarray(tokens), jnp.asarray(mask)))[0, len(seq) - 1]
            assert tok == int(logp.argmax())
            assert abs(lp - float(logp[tok])) < ATOL
            seq.append(tok)


def test_batched_equals_one_by_one(engine, greedy):
    for prompt, res in zip(PROMPTS, greedy):
        (alone,) = engine.generate([prompt], max_new_tokens=NEW)
        assert alone.token_ids == res.token_ids
        np.testing.assert_allclose(alone.logprobs, res.logprobs, atol=ATOL, rtol=0)


def test_prompt_lengths_in_one_bucket_reuse_compiled_code(engine):
    engine.generate([[1, 2, 3, 4, 5]], max_new_tokens=4)  # bucket 16, cache 32
    sizes = (E.prefill_chunk._cache_size(), E.decode_step._cache_size(), E.new_cache._cache_size())
    engine.generate([[9] * 13], max_new_tokens=3)
    engine.generate([[4, 4]], max_new_tokens=6)
    after = (E.prefill_chunk._cache_size(), E.decode_step._cache_size(), E.new_cache._cache_size())
    assert after == sizes


def test_buckets():
    assert [E.bucket_length(n) for n in (1, 16, 17, 100, 1024, 1025, 3000)] == [
        16, 16, 32, 128, 1024, 2048, 3072,
    ]  # fmt: skip
    assert [E.bucket_batch(b) for b in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]


def test_long_prompt_is_prefilled_in_chunks(monkeypatch, model):
    """Chunked prefill (chunk 16 here) gives the same tokens as one-shot prefill."""
    prompt = np.random.default_rng(0).integers(0, 256, size=40).tolist()
    one_shot = Engine(model, donate=False).generate([prompt], max_new_tokens=4)[0]
    monkeypatch.setattr(E, "CHUNK", 16)
    assert E.bucket_length(40) == 48
    chunked = Engine(model, donate=False).generate([prompt], max_new_tokens=4)[0]
    assert chunked.token_ids == one_shot.token_ids
    np.testing.assert_allclose(chunked.logprobs, one_shot.logprobs, atol=ATOL, rtol=0)


def test_stop_token_ends_a_row_and_is_reported(engine, greedy):
    target = greedy[0].token_ids[3]
    first = greedy[0].token_ids.index(target)
    res = engine.generate(PROMPTS, max_new_tokens=NEW, stop_ids=[target])
    assert res[0].token_ids == greedy[0].token_ids[: first + 1]
    assert (res[0].finish_reason, res[0].stop) == ("stop", target)
    for r, g in zip(res[1:], greedy[1:]):  # other rows run on unless they hit it too
        if target in g.token_ids:
            assert r.token_ids == g.token_ids[: g.token_ids.index(target) + 1]
        else:
            assert r.token_ids == g.token_ids and r.finish_reason == "length"


def test_streaming_reports_every_token_in_order(engine, greedy):
    seen = {i: [] for i in range(len(PROMPTS))}
    engine.generate(
        PROMPTS, max_new_tokens=NEW, on_token=lambda r, t, lp, d: seen[r].append((t, lp))
    )
    for i, g in enumerate(greedy):
        assert [t for t, _ in seen[i]] == g.token_ids
        np.testing.assert_allclose([lp for _, lp in seen[i]], g.logprobs, atol=ATOL)


def test_context_budget(model):
    eng = Engine(model, max_context=20, donate=False)
    res = eng.generate([[1] * 15, [2] * 5], max_new_tokens=50)
    assert [len(r.token_ids) for r in res] == [5, 15]  # clipped to the context, per row
    assert all(r.finish_reason == "length" for r in res)
    with pytest.raises(GenerationError, match="prompt 0 has 20 tokens; the context budget is 20"):
        eng.generate([[1] * 20], max_new_tokens=1)


@pytest.mark.parametrize(
    "prompts,kwargs,msg",
    [
        ([], {}, "no prompts"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 256]], {}, "outside the model's vocabulary"),
        ([[-1]], {}, "outside the model's vocabulary"),
        ([[1]], dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        ([[1]], dict(stop_strings=["x"]), "stop strings need a tokenizer"),
    ],
)
def test_bad_requests_raise_clear_errors(engine, prompts, kwargs, msg):
    with pytest.raises(GenerationError, match=msg):
        engine.generate(prompts, **kwargs)


def test_next_token_logprobs_match_generate(engine, greedy):
    lp = engine.next_token_logprobs(PROMPTS)
    assert lp.shape == (len(PROMPTS), CFG.vocab_size)
    for row, g in zip(lp, greedy):
        assert int(row.argmax()) == g.token_ids[0]
        assert abs(float(row[g.token_ids[0]]) - g.logprobs[0]) < ATOL


def test_sampled_generation_is_seeded_and_cold_sampling_is_greedy(engine, greedy):
    hot = SamplingParams(temperature=1.5, seed=7)
    a = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=hot)
    b = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=hot)
    c = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=SamplingParams(1.5, seed=8))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    cold = engine.generate(PROMPTS, max_new_tokens=NEW, sampling=SamplingParams(1e-6, seed=7))
    assert [r.token_ids for r in cold] == [r.token_ids for r in greedy]


def test_sharded_engine_matches_unsharded(greedy):
    """Params and KV cache sharded over 8 fake devices (2-way fsdp x 4-way tensor: the cache
    batch on fsdp, its kv heads on tensor): same tokens, same log-probs."""
    from qwen_jax.sharding import make_mesh

    mesh = make_mesh("fsdp_tp")
    model = create_model(CFG, seed=4, mesh=mesh)
    eng = Engine(model, mesh=mesh)
    res = eng.generate(PROMPTS + [[3, 1, 4, 1, 5]] * 5, max_new_tokens=NEW)  # batch 8
    for r, g in zip(res, greedy):
        assert r.token_ids == g.token_ids
        np.testing.assert_allclose(r.logprobs, g.logprobs, atol=ATOL, rtol=0)
    logits, cache, *_ = eng.prefill(PROMPTS + [[1]] * 5)
    assert cache.k[0].sharding.spec[0:3] == ("fsdp", None, "tensor")


def test_engine_holds_per_layer_weights_and_rebuilds_the_model_exactly(model, engine):
    """The engine keeps L separate layer arrays (no stacked copy) and `model()` restacks them."""
    from flax import nnx

    stacked = nnx.to_pure_dict(nnx.state(model))["blocks"]
    held = nnx.to_pure_dict(engine.state)["blocks"]
    assert all(v.size == 0 for v in held.values())  # placeholders only
    assert len(engine.layers) == CFG.num_layers
    for i, layer in enumerate(engine.layers):
        assert set(layer) == set(stacked)
        for name, w in layer.items():
            np.testing.assert_array_equal(w, stacked[name][i])
    rebuilt = jax.tree.leaves(nnx.state(engine.model()))
    for got, want in zip(rebuilt, jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(got, want)
