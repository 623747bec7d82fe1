"""Continuous batching: one background thread serves many requests over one `Engine`.

Legend: B decode slots (max_batch, a batch bucket), S cache slots (bucket_length(max_context)),
C prefill chunk, V vocab.

The thread owns a decode batch of B slots over one KVCache [B, S] and loops:
  1. cancelled requests leave (their slot is freed), waiting requests take free slots;
  2. one prefill chunk (C tokens) of the oldest admitted prompt: each prompt is prefilled
     alone (batch 1, its own cache) so its numerics never depend on other requests, then
     `insert_rows` moves it into its slot and its first token is sampled;
  3. one decode step over all slots (`engine.decode_rows`), every row at its own position,
     with its own sampling settings and random stream (`sampling.sample_rows`);
  4. per-row stop ids, stop strings (`StopChecker`) and budgets end rows; freed rows are
     `reset_rows`; every token goes to its request's `Handle` as a `TokenEvent`, and a
     `Finished` ends every request.
Long prompts thus cost the running batch one chunk per decode step, not a whole prefill.

Prompts are right-padded: a row holds its n prompt tokens at slots [0, n) and its new tokens
after them, so a cache of S >= max_context slots fits every admissible request. The prompt
being prefilled has its own [1, S] cache (one at a time: prompts are prefilled in order), so
the programs compiled are few and fixed: one decode step and one first-token sampler for any
mix of settings, one insert, one prefill chunk per chunk size (16, 32, ..., prefill_chunk),
two cache constructors, one row reset and one row write (`stats()["compiled_programs"]`).

Requests see: `submit` validates synchronously (GenerationError: bad prompt, budget or
settings; QueueFull when `max_queue` requests already wait); `Handle.events()` (async, from
any thread's event loop) or `Handle.result()` (blocking). A request whose prefill or text
handling fails ends alone with finish_reason "error"; a failed decode step ends the requests
then in the batch with "error" and the loop goes on serving the queue.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.infer import engine as E
from qwen_jax.infer.engine import (
    GREEDY,
    Engine,
    GenerationError,
    bucket_batch,
    bucket_length,
    decode_rows,
    insert_rows,
    new_cache,
    prefill_rows_chunk,
    put_row,
    reset_rows,
    sample_first,
)
from qwen_jax.infer.longctx import prefill_alpha
from qwen_jax.infer.sampling import TOP_LOGPROBS, SamplingParams, row_key, row_knobs
from qwen_jax.infer.text import StopChecker
from qwen_jax.sharding import sharding_for

log = logging.getLogger(__name__)

TTFT_WINDOW = 1000  # stats() keeps the most recent times to first token


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """One generation request (token ids in, token ids and text out)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int  # >= 1; clipped to the context budget (finish "length")
    sampling: SamplingParams = GREEDY  # temperature, top_p, top_k, repetition_penalty, seed
    stop_ids: tuple[int, ...] = ()  # the stop token is reported (token_ids) but has no text
    stop_strings: tuple[str, ...] = ()  # matched on decoded text, excluded from the text
    top_logprobs: int | None = None  # None = none; 0..20 = the chosen token's + k alternatives


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token, in order."""

    token_id: int
    logprob: float  # raw model log-prob of the token
    top: tuple[tuple[int, float], ...]  # the k most likely (id, logprob), () unless asked
    text: str  # text delta (held back while it may start a stop string)


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of every request."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    text: str  # full text (stop string / id excluded)
    token_ids: tuple[int, ...]  # every generated id, a stop id included (as Engine.generate)
    error: str | None = None  # message when finish_reason == "error"


class QueueFull(RuntimeError):
    """`max_queue` requests are already waiting (HTTP 429)."""


class Handle:
    """The caller's side of one request: its events, its result, and cancel."""

    def __init__(self, request_id: int, wake_scheduler):
        self.id = request_id
        self._wake_scheduler = wake_scheduler
        self._lock = threading.Lock()
        self._events: list[TokenEvent | Finished] = []
        self._done = threading.Event()
        self._finished: Finished | None = None
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the scheduler to end this request (Finished "cancelled") and free its slot at
        its next iteration; a no-op once finished."""
        self.cancelled = True
        self._wake_scheduler()

    async def events(self):
        """Async iterator of TokenEvent ... then one Finished. Works from an event loop in any
        thread (the scheduler wakes it with call_soon_threadsafe). Leaving the iteration early
        (a client disconnect closes the generator) cancels the request."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        with self._lock:
            self._waker = (loop, wake)
        seen = 0
        try:
            while True:
                wake.clear()  # before reading: a later push sets it again
                with self._lock:
                    new = self._events[seen:]
                seen += len(new)
                for event in new:
                    yield event
                    if isinstance(event, Finished):
                        return
                if not new:
                    await wake.wait()
        finally:
            if not self._done.is_set():
                self.cancel()

    def result(self, timeout: float | None = None) -> Finished:
        """Block until the request ends; TimeoutError after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self._finished

    def _push(self, event: TokenEvent | Finished) -> None:
        with self._lock:
            self._events.append(event)
            waker = self._waker
            if isinstance(event, Finished):
                self._finished = event
                self._done.set()
        if waker is not None:
            loop, wake = waker
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass


@dataclasses.dataclass(eq=False)
class _Request:
    """The scheduler's state of one request."""

    handle: Handle
    req: GenRequest
    ids: list[int]
    budget: int  # new tokens allowed: min(max_tokens, max_context - prompt length)
    knobs: np.ndarray
    key: np.ndarray
    checker: StopChecker
    submitted: float
    slot: int | None = None
    cache: object = None  # the request's own batch-1 KVCache while it is prefilled
    done_upto: int = 0  # prompt tokens prefilled so far
    decoding: bool = False
    token_ids: list[int] = dataclasses.field(default_factory=list)


class Scheduler:
    """Continuous batching over `engine` (see the module docstring).

    Args:
      engine: the Engine; its max_context bounds prompt + new tokens of every request.
      tokenizer: decodes text deltas and stop strings (`token_bytes`, `vocab_size`).
      max_batch: decode slots (rounded up to a batch bucket: 1, 2, 4, 8, then multiples of 8).
      max_queue: requests that may wait for a slot; one more raises QueueFull.
      prefill_chunk: prompt tokens prefilled per iteration, a power of two in [16, 1024].
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
    ):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        if not 16 <= prefill_chunk <= E.CHUNK or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(
                f"prefill_chunk must be a power of two in [16, {E.CHUNK}], got {prefill_chunk}"
            )
        self.engine, self.tokenizer = engine, tokenizer
        self.max_context = engine.max_context
        self.max_batch = bucket_batch(max_batch)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.cache_len = bucket_length(self.max_context)
        self._ntk = engine.cfg.use_dynamic_ntk
        b = self.max_batch
        # Host-side per-slot state, sent with every decode step (a few bytes per row).
        self._tok = np.zeros(b, np.int32)
        self._active = np.zeros(b, bool)
        self._steps = np.zeros(b, np.int32)
        self._knobs = np.tile(row_knobs(GREEDY), (b, 1))
        self._keys = np.tile(row_key(0), (b, 1))
        self._alpha = np.ones(b, np.float32)
        self._slots: list[_Request | None] = [None] * b
        self._prefilling: collections.deque[_Request] = collections.deque()
        self._to_reset: list[int] = []
        self._new_device_state()

        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._ids = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._generated = 0
        self._prompt = 0
        self._reasons: collections.Counter[str] = collections.Counter()
        self._ttft: collections.deque[float] = collections.deque(maxlen=TTFT_WINDOW)

    # ------------------------------------------------------------------------ public API

    def start(self) -> None:
        """Start the background thread that drives the engine."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="qwen-jax-scheduler", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Cancel every request (Finished "cancelled") and join the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self._cancel_all()

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def submit(self, req: GenRequest) -> Handle:
        """Queue a request (thread-safe). GenerationError for a request that cannot be served,
        QueueFull when max_queue requests wait already."""
        ids = self.engine._check([req.prompt_ids])[0]
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise GenerationError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        k = req.top_logprobs
        if k is not None and not 0 <= k <= TOP_LOGPROBS:
            raise GenerationError(f"top_logprobs must be in [0, {TOP_LOGPROBS}], got {k}")
        if not isinstance(req.sampling, SamplingParams):
            raise GenerationError("sampling must be a SamplingParams")
        try:
            key = row_key(req.sampling.seed)
        except (OverflowError, TypeError, ValueError):
            raise GenerationError(
                f"seed must be a 64-bit integer, got {req.sampling.seed!r}"
            ) from None
        checker = StopChecker(self.tokenizer, req.stop_strings)
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting already (max_queue "
                    f"{self.max_queue}); try again later"
                )
            handle = Handle(next(self._ids), self._wake)
            self._waiting.append(
                _Request(
                    handle,
                    req,
                    ids,
                    budget=min(req.max_tokens, self.max_context - len(ids)),
                    knobs=row_knobs(req.sampling),
                    key=key,
                    checker=checker,
                    submitted=time.perf_counter(),
                )
            )
            self._cond.notify_all()
        return handle

    def stats(self) -> dict:
        """Counters for /metrics: requests running (holding a slot) and waiting, tokens, finish
        reasons, recent times to first token (s), and the compiled programs of the jitted
        steps the scheduler runs (process-wide counts of those functions)."""
        with self._cond:
            return {
                "running": sum(r is not None for r in self._slots),
                "waiting": len(self._waiting),
                "generated_tokens": self._generated,
                "prompt_tokens": self._prompt,
                "requests": dict(self._reasons),
                "ttft_s": list(self._ttft),
                "compiled_programs": compiled_programs(),
                "max_batch": self.max_batch,
                "max_context": self.max_context,
            }

    # ------------------------------------------------------------------------- the loop

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._slots)

    def _run(self) -> None:
        with self.engine._mesh():
            while True:
                with self._cond:
                    while not self._closing and not self._busy():
                        self._cond.wait()
                    if self._closing:
                        break
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001  (no single request to blame: keep serving)
                    log.exception("scheduler step failed")
                    self._fail_batch(e)
            self._cancel_all()

    def _iteration(self) -> None:
        self._reap_cancelled()
        self._reset_freed()  # before a freed slot is taken again
        self._admit()
        self._prefill_one()
        self._decode()
        self._reset_freed()

    def _reset_freed(self) -> None:
        if self._to_reset:
            rows_b = np.zeros(self.max_batch, bool)
            rows_b[self._to_reset] = True
            self._to_reset = []
            self.cache = reset_rows(self.cache, rows_b)

    def _reap_cancelled(self) -> None:
        with self._cond:
            gone = [r for r in self._waiting if r.handle.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone + [r for r in self._slots if r is not None and r.handle.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            for slot, held in enumerate(self._slots):
                if held is None and self._waiting:
                    r = self._waiting.popleft()
                    r.slot, self._slots[slot] = slot, r
                    self._prefilling.append(r)
                    self._prompt += len(r.ids)

    def _prefill_one(self) -> None:
        """One chunk of the oldest admitted prompt; its last chunk moves it into its slot."""
        if not self._prefilling:
            return
        r = self._prefilling[0]
        try:  # this request's own computation: a failure here ends it alone
            logits_1v, alpha = self._prefill_chunk(r)
            if logits_1v is None:
                return
            seen_1v = np.zeros((1, self.engine.cfg.vocab_size), bool)
            seen_1v[0, r.ids] = True  # the repetition penalty's set starts with the prompt
            zero = np.zeros(1, np.int32)
            want_top = np.bool_(r.req.top_logprobs is not None)
            out = sample_first(logits_1v, r.knobs[None], r.key[None], zero, seen_1v, want_top)
            out = [np.asarray(x)[0] for x in out]  # (device errors surface on reading)
        except Exception as e:  # noqa: BLE001
            log.exception("prefill of request %d failed", r.handle.id)
            self._finish(r, "error", e)
            return
        self._prefilling.popleft()
        slot = r.slot
        self.cache = insert_rows(self.cache, slot, r.cache)
        self.seen = put_row(self.seen, slot, seen_1v[0])
        r.cache, r.decoding = None, True
        self._knobs[slot], self._keys[slot], self._steps[slot] = r.knobs, r.key, 0
        self._alpha[slot] = 1.0 if alpha is None else float(np.asarray(alpha)[0])
        self._active[slot] = True
        self._take([(r, *out)])

    def _prefill_chunk(self, r: _Request):
        """Run the next chunk of r's prompt; returns (last logits [1, V] or None while chunks
        remain, alpha [1] or None)."""
        n, c = len(r.ids), self.prefill_chunk
        step = bucket_length(n) if n <= c else c  # a power of two: chunks tile S
        alpha = prefill_alpha(self.engine.cfg, [n])
        if r.cache is None:  # only the oldest admitted request holds one
            r.cache = new_cache(self.engine.cfg, 1, self.cache_len, jnp.zeros((1,), jnp.int32))
        tokens = np.zeros((1, step), np.int32)
        part = r.ids[r.done_upto : r.done_upto + step]
        tokens[0, : len(part)] = part
        logits_1v, r.cache = prefill_rows_chunk(
            self.engine.graphdef,
            self.engine.state,
            self.engine.layers,
            tokens,
            alpha,
            r.cache,
            np.asarray([n], np.int32),
        )
        r.done_upto += len(part)
        return (logits_1v if r.done_upto == n else None), alpha

    def _decode(self) -> None:
        rows = [r for r in self._slots if r is not None and r.decoding]
        if not rows:
            return
        self._steps[self._active] += 1  # draw index = tokens this row has generated so far
        out = decode_rows(
            self.engine.graphdef,
            self.engine.state,
            self.engine.layers,
            self._tok,
            self._active,
            self._alpha if self._ntk else None,
            self.cache,
            self.seen,
            self._knobs,
            self._keys,
            self._steps,
            np.bool_(any(r.req.top_logprobs is not None for r in rows)),
        )
        *sampled, self.cache, self.seen = out
        tok_b, logp_b, top_ids_bk, top_logp_bk = (np.asarray(x) for x in sampled)
        self._take(
            [
                (r, tok_b[r.slot], logp_b[r.slot], top_ids_bk[r.slot], top_logp_bk[r.slot])
                for r in rows
            ]
        )

    def _take(self, produced) -> None:
        """Hand each (request, token, logprob, top ids, top logprobs) to its request; end rows
        that stop or run out of budget. A failure here (text handling) ends that row alone."""
        for r, tok, logp, top_ids, top_logp in produced:
            tok = int(tok)
            try:
                self._tok[r.slot] = tok
                r.token_ids.append(tok)
                if len(r.token_ids) == 1:
                    with self._cond:
                        self._ttft.append(time.perf_counter() - r.submitted)
                delta, reason = "", None
                if tok in r.req.stop_ids:
                    reason = "stop"
                else:
                    delta, hit = r.checker.push(tok)
                    reason = None if hit is None else "stop"
                if reason is None and len(r.token_ids) >= r.budget:
                    reason = "length"
                if reason is not None:
                    delta += r.checker.finish()
                k = r.req.top_logprobs or 0
                top = tuple((int(i), float(lp)) for i, lp in zip(top_ids[:k], top_logp[:k]))
                r.handle._push(TokenEvent(tok, float(logp), top, delta))
                with self._cond:
                    self._generated += 1
                if reason is not None:
                    self._finish(r, reason)
            except Exception as e:  # noqa: BLE001  (this request's own text handling)
                log.exception("request %d failed", r.handle.id)
                self._finish(r, "error", e)

    def _finish(self, r: _Request, reason: str, error: BaseException | None = None) -> None:
        """End r: free its slot (reset at the end of the iteration) and send Finished."""
        if r.slot is not None:
            self._slots[r.slot] = None
            self._active[r.slot] = False
            self._to_reset.append(r.slot)
            if r in self._prefilling:
                self._prefilling.remove(r)
            r.slot, r.cache = None, None
        if reason in ("cancelled", "error"):
            try:
                r.checker.finish()  # release text held back for a stop string that never came
            except Exception:  # noqa: BLE001
                pass
        msg = (
            None if error is None else (f"{type(error).__name__}: {error}".splitlines() or [""])[0]
        )
        with self._cond:
            self._reasons[reason] += 1
        r.handle._push(
            Finished(
                reason,
                prompt_tokens=len(r.ids),
                completion_tokens=len(r.token_ids),
                text=r.checker.text,
                token_ids=tuple(r.token_ids),
                error=msg,
            )
        )

    def _fail_batch(self, error: BaseException) -> None:
        """A step shared by the batch failed (its donated cache may be gone): end every request
        holding a slot with "error" and start from an empty batch."""
        for r in list(self._slots):
            if r is not None:
                self._finish(r, "error", error)
        self._prefilling.clear()
        self._to_reset = []
        self._active[:] = False
        self._new_device_state()

    def _cancel_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for r in waiting + [r for r in self._slots if r is not None]:
            self._finish(r, "cancelled")

    def _new_device_state(self) -> None:
        with self.engine._mesh():
            b = self.max_batch
            self.cache = new_cache(self.engine.cfg, b, self.cache_len, jnp.zeros((b,), jnp.int32))
            seen = np.zeros((b, self.engine.cfg.vocab_size), bool)
            mesh = self.engine.mesh
            where = None if mesh is None else sharding_for(E.ROWS_AXES, seen.shape, mesh)
            self.seen = jax.device_put(seen, where)  # rows sharded as decode_rows keeps them


def compiled_programs() -> int:
    """Programs of the jitted steps the scheduler runs, this process (any caller's): the sum of
    their dispatch-cache sizes, an upper bound on XLA compilations (under a mesh, decode_rows
    and put_row hold a second entry for their first call's input placement: one compilation,
    checked with jax_log_compiles)."""
    steps = (
        E.new_cache,
        E.prefill_rows_chunk,
        E.sample_first,
        E.insert_rows,
        E.put_row,
        E.decode_rows,
        E.reset_rows,
    )
    return sum(f._cache_size() for f in steps)
