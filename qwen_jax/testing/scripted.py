"""`ScriptedScheduler`: the `qwen_jax.serve.scheduler.Scheduler` interface, replying with fixed
texts instead of a model's, so that tests of the HTTP layer (tool calls, errors, queueing) do not
depend on a model's luck.

Each submitted request takes the next reply of the script (in order; a callable script is
asked with the `GenRequest`). A reply text is tokenized (specials allowed) and streamed one
token per scheduler iteration, through the same stop rules as the real scheduler: a stop id
ends the row (not in the text), a stop string is cut off (`StopChecker`), the budget gives
"length"; a reply that runs out ends as if the model had emitted its first stop id. A reply
that is an exception instance fails that request (`Finished(finish_reason="error")`).

Slots and the queue behave like the real scheduler's: at most `max_batch` requests run, at
most `max_queue` wait (`QueueFull` beyond), `cancel` frees a slot at the next iteration, and
`paused()` holds the driver still so a test can fill the queue deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence

from qwen_jax.infer.engine import GenerationError
from qwen_jax.infer.text import StopChecker
from qwen_jax.serve.scheduler import Finished, GenRequest, QueueFull, TokenEvent

Reply = str | BaseException
Script = Sequence[Reply] | Callable[[GenRequest], Reply]


class _Events:
    """One request's events: appended by the driver thread, read by blocking or asyncio
    readers in any thread (a waiting coroutine is woken with call_soon_threadsafe)."""

    def __init__(self):
        self._items: list = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def put(self, ev) -> None:
        with self._cond:
            self._items.append(ev)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # the reader's loop is closed: nobody is listening
                pass

    async def aiter(self):
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                fut = None
                if i < len(self._items):
                    ev = self._items[i]
                    i += 1
                else:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is not None:
                await fut
                continue
            yield ev
            if isinstance(ev, Finished):
                return

    def last(self, timeout: float | None) -> Finished:
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._items and isinstance(self._items[-1], Finished), timeout
            )
            if not done:
                raise TimeoutError("the scripted request did not finish in time")
            return self._items[-1]


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class ScriptedHandle:
    def __init__(self, id_: int, req: GenRequest):
        self.id = id_
        self.request = req
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.generated = 0
        self._events = _Events()

    def cancel(self) -> None:
        self.cancelled = True

    def events(self):
        return self._events.aiter()

    def result(self, timeout: float | None = None) -> Finished:
        return self._events.last(timeout)


def _script_events(tokenizer, req: GenRequest, reply: Reply, max_context: int) -> Iterator:
    """The events of one scripted reply (TokenEvents, then one Finished)."""
    n_prompt = len(req.prompt_ids)
    if isinstance(reply, BaseException):
        yield Finished("error", n_prompt, 0, "", (), error=f"{type(reply).__name__}: {reply}")
        return
    ids = tokenizer.encode(reply, allowed_special="all") + list(req.stop_ids[:1])
    budget = min(req.max_tokens, max_context - n_prompt)
    checker = StopChecker(tokenizer, req.stop_strings)
    out: list[int] = []
    reason = "stop"  # a script that runs out without a stop id ends like a model that stopped
    for tid in ids:
        out.append(tid)
        delta, hit = ("", None) if tid in req.stop_ids else checker.push(tid)
        stopped = tid in req.stop_ids or hit is not None
        done = stopped or len(out) >= budget
        if done:
            reason = "stop" if stopped else "length"
            delta += checker.finish()
        top = () if not req.top_logprobs else ((tid, 0.0),)
        yield TokenEvent(tid, 0.0, top, delta)
        if done:
            break
    else:
        checker.finish()
    yield Finished(reason, n_prompt, len(out), checker.text, tuple(out))


class ScriptedScheduler:
    """See the module docstring. `requests` records every submitted `GenRequest` (what the
    HTTP layer built: prompt ids, stops, sampling) for tests to check."""

    def __init__(
        self,
        tokenizer,
        replies: Script,
        *,
        max_context: int = 256,
        max_batch: int = 8,
        max_queue: int = 64,
        token_delay_s: float = 0.0,
    ):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.max_batch, self.max_queue, self.token_delay_s = max_batch, max_queue, token_delay_s
        self.requests: list[GenRequest] = []
        self._script = replies if callable(replies) else iter(list(replies))
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[tuple[ScriptedHandle, Iterator]] = deque()
        self._running: list[tuple[ScriptedHandle, Iterator]] = []
        self._paused = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._finished: Counter = Counter()
        self._generated = 0
        self._prompt_tokens = 0
        self._ttft: deque[float] = deque(maxlen=1000)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scripted-scheduler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for handle, _ in [*self._running, *self._waiting]:
            handle._events.put(Finished("cancelled", len(handle.request.prompt_ids), 0, "", ()))

    @contextlib.contextmanager
    def paused(self):
        """Hold the driver: submitted requests stay waiting until the block ends."""
        with self._cond:
            self._paused = True
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def submit(self, req: GenRequest) -> ScriptedHandle:
        if not req.prompt_ids:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(req.prompt_ids) >= self.max_context:
            raise GenerationError(
                f"the prompt has {len(req.prompt_ids)} tokens; the context budget is "
                f"{self.max_context}"
            )
        if req.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {req.max_tokens}")
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self.requests.append(req)
            try:
                reply = self._script(req) if callable(self._script) else next(self._script)
            except StopIteration:
                reply = RuntimeError("the script has no reply left")
            handle = ScriptedHandle(next(self._ids), req)
            events = _script_events(self.tokenizer, req, reply, self.max_context)
            self._waiting.append((handle, events))
            self._cond.notify_all()
        return handle

    def stats(self) -> dict:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "generated_tokens": self._generated,
                "prompt_tokens": self._prompt_tokens,
                "requests": dict(self._finished),
                "ttft_s": list(self._ttft),
                "compiled_programs": 0,
            }

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or (not self._paused and (self._waiting or self._running))
                )
                if self._closed:
                    return
                while self._waiting and len(self._running) < self.max_batch:
                    handle, events = self._waiting.popleft()
                    self._prompt_tokens += len(handle.request.prompt_ids)
                    self._running.append((handle, events))
                self._running = [r for r in self._running if not self._step(*r)]
            if self.token_delay_s:
                time.sleep(self.token_delay_s)

    def _step(self, handle: ScriptedHandle, events: Iterator) -> bool:
        """Emit the row's next event (under the lock); True when the row is done."""
        if handle.cancelled:
            ev = Finished("cancelled", len(handle.request.prompt_ids), 0, "", ())
        else:
            ev = next(events)
        if isinstance(ev, TokenEvent):
            if handle.generated == 0:
                self._ttft.append(time.perf_counter() - handle.submitted)
            handle.generated += 1
            self._generated += 1
        handle._events.put(ev)
        if isinstance(ev, Finished):
            self._finished[ev.finish_reason] += 1
            return True
        return False
