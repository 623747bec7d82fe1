"""The continuous-batching scheduler (qwen_jax.serve.scheduler) and the per-row sampler.

One scheduler (4 slots, 16-token prefill chunks) serves every test of the module on a tiny GQA
model with a windowed layer: concurrent requests get exactly the tokens they get alone
(`Engine.generate` for greedy, the scheduler alone for seeded sampling), stops match the
engine's, cancel / queue / bad input / failures behave, and the compiled programs do not grow.
"""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from qwen_jax.infer import engine as E
from qwen_jax.infer.engine import Engine, GenerationError
from qwen_jax.infer.sampling import SamplingParams, row_key, row_knobs, sample_rows
from qwen_jax.model.factory import create_model
from qwen_jax.serve import scheduler as S
from qwen_jax.serve.scheduler import Finished, GenRequest, QueueFull, Scheduler, TokenEvent
from qwen_jax.testing.configs import tiny_serving
from qwen_jax.testing.tolerance import ATOL_LOGPROBS

CFG = tiny_serving()  # vocab 256, max_context 128
TIMEOUT = 120


class PrintableTokenizer:
    """Token i is one printable ASCII character (so stop strings are plain text)."""

    name, vocab_size, eod_id = "printable", 256, 0

    def token_bytes(self, i: int) -> bytes:
        return bytes([32 + i % 95])


TOK = PrintableTokenizer()


def text_of(ids) -> str:
    return "".join(chr(32 + i % 95) for i in ids)


def prompts_and_budgets(seed: int, n: int, lengths=(1, 33), budgets=(1, 13)):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 255, size=int(k)).tolist() for k in rng.integers(*lengths, size=n)]
    return prompts, [int(m) for m in rng.integers(*budgets, size=n)]


@pytest.fixture(scope="module")
def engine():
    return Engine(create_model(CFG, seed=3))


@pytest.fixture(scope="module")
def sched(engine):
    with Scheduler(engine, TOK, max_batch=4, max_queue=32, prefill_chunk=16) as s:
        yield s


async def _collect(handle) -> list:
    return [event async for event in handle.events()]


def test_sixteen_concurrent_greedy_requests_get_their_tokens_alone(engine, sched):
    """16 requests of 17..32 prompt tokens (prefilled in two chunks, the last one padded) and
    1..12 new tokens through 4 slots: each gets Engine.generate's tokens for its prompt alone;
    the events (read from an asyncio loop in this thread) add up to the result. (The engine's
    references all fall in one bucket, 32 + 12 -> 64, to compile once.)"""
    prompts, budgets = prompts_and_budgets(0, 16, lengths=(17, 33))
    ks = [None, 0, 3, 20] * 4
    handles = [
        sched.submit(GenRequest(tuple(p), m, top_logprobs=k))
        for p, m, k in zip(prompts, budgets, ks)
    ]
    streamed = [asyncio.run(_collect(h)) for h in handles[::2]]
    results = [h.result(TIMEOUT) for h in handles]
    for events, res in zip(streamed, results[::2]):
        assert isinstance(events[-1], Finished) and events[-1] == res
        tokens = [e for e in events[:-1] if isinstance(e, TokenEvent)]
        assert len(tokens) == len(events) - 1
        assert tuple(e.token_id for e in tokens) == res.token_ids
        assert "".join(e.text for e in tokens) == res.text == text_of(res.token_ids)
    for p, m, k, h, res in zip(prompts, budgets, ks, handles, results):
        (alone,) = engine.generate([p], max_new_tokens=m)
        assert res.token_ids == tuple(alone.token_ids)
        assert (res.finish_reason, res.prompt_tokens, res.completion_tokens) == (
            "length",
            len(p),
            m,
        )
        events = h._events[:-1]
        np.testing.assert_allclose(
            [e.logprob for e in events], alone.logprobs, atol=ATOL_LOGPROBS, rtol=0
        )
        for e in events:
            assert len(e.top) == (k or 0)
            if k:  # greedy: the chosen token is the most likely one; raw log-probs, descending
                assert e.top[0] == (e.token_id, pytest.approx(e.logprob, abs=1e-6))
                assert [lp for _, lp in e.top] == sorted((lp for _, lp in e.top), reverse=True)
    stats = sched.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["requests"]["length"] >= 16 and len(stats["ttft_s"]) >= 16


SAMPLED = [
    SamplingParams(temperature=1.5, seed=1),
    SamplingParams(temperature=0.8, top_k=5, seed=2),
    SamplingParams(temperature=1.2, top_p=0.9, seed=3),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=4),
]


def test_seeded_sampling_is_the_same_alone_and_beside_others(sched):
    prompts, _ = prompts_and_budgets(1, 4)
    reqs = [GenRequest(tuple(p), 10, sampling=sp) for p, sp in zip(prompts, SAMPLED)]
    alone = [sched.submit(r).result(TIMEOUT).token_ids for r in reqs]
    fillers, budgets = prompts_and_budgets(2, 6)
    together = [sched.submit(r) for r in reqs[:2]]
    others = [sched.submit(GenRequest(tuple(p), m)) for p, m in zip(fillers, budgets)]
    together += [sched.submit(r) for r in reqs[2:]]
    assert [h.result(TIMEOUT).token_ids for h in together] == alone
    assert all(h.result(TIMEOUT).finish_reason == "length" for h in others)
    # the draws are real: another seed changes them, a greedy row differs, top_k 1 is greedy
    reseeded = GenRequest(reqs[0].prompt_ids, 10, SamplingParams(temperature=1.5, seed=5))
    assert sched.submit(reseeded).result(TIMEOUT).token_ids != alone[0]
    greedy = sched.submit(GenRequest(reqs[0].prompt_ids, 10)).result(TIMEOUT).token_ids
    assert greedy != alone[0]
    top1 = GenRequest(reqs[0].prompt_ids, 10, SamplingParams(temperature=1.5, top_k=1, seed=1))
    assert sched.submit(top1).result(TIMEOUT).token_ids == greedy


def test_row_sampler_keeps_each_rows_filters():
    """One batch mixing greedy, top-k, top-p and plain rows (many draws each): every row stays
    in its own allowed set, and the plain rows are not greedy."""
    v, n = 64, 256
    logits_v = np.random.default_rng(0).normal(0, 1.0, size=v).astype(np.float32)
    kinds = [
        SamplingParams(),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=1.0),
    ]
    knobs = np.concatenate([np.tile(row_knobs(sp), (n, 1)) for sp in kinds])
    keys = np.tile(row_key(0), (4 * n, 1))
    steps = np.tile(np.arange(n, dtype=np.int32), 4)
    logits = np.tile(logits_v, (4 * n, 1))
    seen = np.zeros((4 * n, v), bool)
    # its own jit: jax.jit(sample_rows) would share the program cache of engine.sample_first
    toks, logp, _, _ = jax.jit(lambda *a: sample_rows(*a))(logits, knobs, keys, steps, seen)
    toks = np.asarray(toks).reshape(4, n)
    order = np.argsort(-logits_v)
    p = np.exp(logits_v[order] - logits_v.max())
    p /= p.sum()
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p), 0.3)) + 1].tolist())
    assert set(toks[0].tolist()) == {int(order[0])}
    assert set(toks[1].tolist()) == set(order[:3].tolist())
    assert set(toks[2].tolist()) <= nucleus and len(nucleus) >= 2 and len(set(toks[2])) >= 2
    assert len(set(toks[3].tolist())) > 10
    raw = logits_v - np.log(np.exp(logits_v).sum())
    np.testing.assert_allclose(np.asarray(logp).reshape(4, n), raw[toks], atol=1e-5)


def test_stops_match_the_engine(engine, sched):
    prompt = list(range(40, 60))  # the engine's references in test 1's bucket
    (ref,) = engine.generate([prompt], max_new_tokens=12)
    stop_id = ref.token_ids[4]
    (want,) = engine.generate([prompt], max_new_tokens=12, stop_ids=[stop_id])
    got = sched.submit(GenRequest(tuple(prompt), 12, stop_ids=(stop_id,))).result(TIMEOUT)
    assert (got.finish_reason, got.token_ids) == ("stop", tuple(want.token_ids))
    assert got.text == text_of(want.token_ids[:-1])  # the stop id has no text
    stop = text_of(ref.token_ids[6:8])
    (want,) = engine.generate([prompt], max_new_tokens=12, stop_strings=[stop], tokenizer=TOK)
    handle = sched.submit(GenRequest(tuple(prompt), 12, stop_strings=(stop,)))
    got = handle.result(TIMEOUT)
    assert (got.finish_reason, got.token_ids, got.text) == (
        "stop",
        tuple(want.token_ids),
        want.text,
    )
    assert stop not in "".join(e.text for e in handle._events[:-1]) and want.finish_reason == "stop"


def test_cancel_frees_the_slot(sched):
    before = sched.stats()["requests"].get("cancelled", 0)
    handle = sched.submit(GenRequest((1, 2, 3), 120))
    while not handle._events:  # generating
        handle._done.wait(0.01)
    assert sched.stats()["running"] == 1
    handle.cancel()
    res = handle.result(TIMEOUT)
    assert res.finish_reason == "cancelled" and 1 <= res.completion_tokens < 120
    stats = sched.stats()
    assert stats["running"] == 0 and stats["requests"]["cancelled"] == before + 1

    async def disconnect(h):  # a client that goes away after two tokens
        async for i, _ in aenumerate(h.events()):
            if i == 1:
                break

    handle = sched.submit(GenRequest((1, 2, 3), 120))
    asyncio.run(disconnect(handle))  # asyncio.run closes the abandoned generator
    assert handle.result(TIMEOUT).finish_reason == "cancelled"
    assert sched.stats()["running"] == 0


def test_a_freed_slot_is_taken_at_once(sched):
    """A request waiting for a full batch takes the slot a cancel frees, in the same iteration
    (prefilled in one chunk and inserted there), and decodes exactly as when served alone."""
    short = GenRequest((5, 6, 7), 6)
    want = sched.submit(short).result(TIMEOUT).token_ids
    longs = [sched.submit(GenRequest((1, 2, 3 + i), 120)) for i in range(4)]
    while not all(h._events for h in longs):
        longs[0]._done.wait(0.01)
    handle = sched.submit(short)
    assert sched.stats()["waiting"] == 1
    longs[0].cancel()
    assert handle.result(TIMEOUT).token_ids == want
    for h in longs[1:]:
        h.cancel()
    assert all(h.result(TIMEOUT).finish_reason == "cancelled" for h in longs)


async def aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


def test_queue_full_and_close_cancels_the_waiting(engine):
    idle = Scheduler(engine, TOK, max_batch=4, max_queue=2)  # never started: requests wait
    a, b = (idle.submit(GenRequest((1, 2), 4)) for _ in range(2))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        idle.submit(GenRequest((1, 2), 4))
    assert idle.stats()["waiting"] == 2
    idle.close()
    assert a.result(1).finish_reason == b.result(1).finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="closed"):
        idle.submit(GenRequest((1, 2), 4))


@pytest.mark.parametrize(
    "req,msg",
    [
        (GenRequest((1,) * 128, 1), "128 tokens; the context budget is 128"),
        (GenRequest((), 1), "empty"),
        (GenRequest((1, 256), 1), "outside the model's vocabulary"),
        (GenRequest((1,), 0), "max_tokens must be an integer >= 1"),
        (GenRequest((1,), 1, top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
        (GenRequest((1,), 1, SamplingParams(temperature=1, seed=2**80)), "seed must be"),
    ],
)
def test_bad_requests_raise_at_submit(sched, req, msg):
    with pytest.raises(GenerationError, match=msg):
        sched.submit(req)


def test_a_failing_request_fails_alone(engine, sched, monkeypatch):
    """A prefill that raises ends its request with "error"; a failing decode step ends the
    requests then decoding; the scheduler serves the next ones correctly."""
    real = S.prefill_rows_chunk

    def flaky(graphdef, state, layers, tokens, *args):
        if 255 in np.asarray(tokens):
            raise RuntimeError("injected prefill failure")
        return real(graphdef, state, layers, tokens, *args)

    monkeypatch.setattr(S, "prefill_rows_chunk", flaky)
    prompt = list(range(60, 80))
    (want,) = engine.generate([prompt], max_new_tokens=8)
    bad = sched.submit(GenRequest((7, 255, 9), 8))
    good = sched.submit(GenRequest(tuple(prompt), 8))
    res = bad.result(TIMEOUT)
    assert (res.finish_reason, res.error) == ("error", "RuntimeError: injected prefill failure")
    assert good.result(TIMEOUT).token_ids == tuple(want.token_ids)

    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("injected decode failure")

    monkeypatch.setattr(S, "decode_rows", broken)
    res = sched.submit(GenRequest(tuple(prompt), 8)).result(TIMEOUT)
    assert res.finish_reason == "error" and res.completion_tokens == 1 and calls
    monkeypatch.setattr(S, "decode_rows", E.decode_rows)
    assert sched.submit(GenRequest(tuple(prompt), 8)).result(TIMEOUT).token_ids == tuple(
        want.token_ids
    )
    assert sched.stats()["requests"]["error"] >= 2


def test_compiled_programs_stay_bounded(sched):
    """A wave of mixed lengths and settings compiles what it needs; a second wave with other
    lengths (same buckets) and other settings compiles nothing; one decode program serves every
    mix of sampling settings."""

    def wave(seed):
        prompts, budgets = prompts_and_budgets(seed, 8)
        mixes = [SamplingParams(), *SAMPLED]
        hs = [
            sched.submit(GenRequest(tuple(p), m, mixes[i % 5], top_logprobs=i % 3 or None))
            for i, (p, m) in enumerate(zip(prompts, budgets))
        ]
        return [h.result(TIMEOUT) for h in hs]

    wave(10)
    count = sched.stats()["compiled_programs"]
    wave(11)
    assert sched.stats()["compiled_programs"] == count
    assert (E.decode_rows._cache_size(), E.sample_first._cache_size()) == (1, 1)
