"""The serving load tool (qwen_jax/serve/load.py) against a scripted in-process SSE server.

The fake server speaks HTTP/1.1 on loopback as uvicorn does (chunked server-sent events, error
bodies with Content-Length) and answers each arriving request with the next behaviour of its
script, so counts, token totals and error kinds are known exactly; percentiles are checked on
hand-made timings, the prompts on the real Qwen vocabulary.
"""

import asyncio
import json
import random
import threading
import time

import numpy as np
import pytest

from qwen_jax.cli import UsageError
from qwen_jax.serve.load import LoadSpec, Result, main, percentile, prompt_text, report, run_load
from qwen_jax.tokenizer import load_tokenizer

TOKENS = 5  # text events of a scripted reply


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _event(obj) -> bytes:
    return _chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())


def _choice(chat: bool, content=None, role=None, finish=None) -> dict:
    """One streamed choice: a chat `delta` or a completion's `text`."""
    if not chat:
        return {"choices": [{"index": 0, "text": content or "", "finish_reason": finish}]}
    delta = {k: v for k, v in (("content", content), ("role", role)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class FakeServer:
    """Loopback HTTP server in its own thread; request n gets behaviour script[n % len]."""

    def __init__(self, script: list[str], gap_s: float = 0.01):
        self.script, self.gap_s = script, gap_s
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        """Stop listening, cancel the handlers still streaming, end the thread: nothing pending
        is left for a later test to trip over."""

        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _handle(self, reader, writer) -> None:
        request_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = json.loads(await reader.readexactly(int(headers["content-length"])))
        self.paths.append(request_line.split()[1].decode())
        behaviour = self.script[len(self.bodies) % len(self.script)]
        self.bodies.append(body)
        try:
            await getattr(self, "_" + behaviour)(writer)
        except (ConnectionError, OSError):
            pass  # the client went away (the deadline test)
        finally:
            writer.close()

    async def _error(self, writer, status: int, message: str) -> None:
        raw = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n"
        )
        writer.write(head.encode() + raw)
        await writer.drain()

    async def _stream(self, writer, n: int, usage: bool, end: bool, error: bool = False) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        chat = self.paths[-1].endswith("/chat/completions")
        writer.write(head.encode() + (_event(_choice(chat, role="assistant")) if chat else b""))
        for i in range(n):
            await asyncio.sleep(self.gap_s)
            writer.write(_event(_choice(chat, content=f" w{i}")))
            await writer.drain()
        if error:
            writer.write(_event({"error": "generation failed"}) + _chunk(b""))
        if end:
            writer.write(_event(_choice(chat, finish="length")))
            if usage:
                u = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                writer.write(_event({"choices": [], "usage": u}))
            writer.write(_event("[DONE]") + _chunk(b""))
        await writer.drain()

    async def _ok(self, writer):
        await self._stream(writer, TOKENS, usage=True, end=True)

    async def _ok_nousage(self, writer):
        await self._stream(writer, TOKENS, usage=False, end=True)

    async def _cut(self, writer):  # closes mid-stream, no terminating chunk
        await self._stream(writer, 2, usage=False, end=False)

    async def _nofinish(self, writer):  # a well-formed body that never says it finished
        await self._stream(writer, 2, usage=False, end=False)
        writer.write(_chunk(b""))

    async def _stream_error(self, writer):
        await self._stream(writer, 1, usage=False, end=False, error=True)

    async def _slow(self, writer):  # never ends within the test's deadline
        await self._stream(writer, 10_000, usage=False, end=True)

    async def _busy(self, writer):
        await self._error(writer, 429, "queue full")

    async def _bad(self, writer):
        await self._error(writer, 400, "max_tokens out of range")


@pytest.fixture
def server(request):
    srv = FakeServer(*request.param)
    yield srv
    srv.close()


SCRIPT = ["ok"] * 5 + ["ok_nousage", "busy", "bad", "cut", "nofinish", "stream_error"]


@pytest.mark.parametrize("server", [(SCRIPT,)], indirect=True)
def test_counts_tokens_and_errors(server):
    spec = LoadSpec(
        url=server.url + "/v1",
        model="m",
        clients=3,
        requests=len(SCRIPT),
        prompt_tokens=9,
        max_tokens=TOKENS,
    )
    out = run_load(spec)
    assert out["requests_sent"] == 11 and out["requests_ok"] == 6
    assert out["errors"] == {
        "http_429": 1,
        "http_4xx": 1,
        "disconnect": 1,
        "incomplete": 1,
        "stream_error": 1,
    }
    assert "queue full" in out["error_examples"]["http_429"]
    assert "max_tokens out of range" in out["error_examples"]["http_4xx"]
    assert "generation failed" in out["error_examples"]["stream_error"]
    assert out["output_tokens"] == 6 * TOKENS
    assert out["tokens_counted_by"] == {"usage": 5, "chunks": 1}
    assert out["all_hit_max_tokens"] and out["finish_reasons"] == {"length": 6}
    assert out["prompt_tokens_served"] == {"min": 7, "max": 7}
    assert out["stopped_by"] == "count"
    # TTFT: the role-only first chunk does not count, the first text event does (one gap later).
    assert out["ttft_s"]["n"] == 6 and out["ttft_s"]["p50"] >= server.gap_s
    assert out["itl_s"]["n"] == 6 * (TOKENS - 1)
    assert out["output_tokens_per_s"] == pytest.approx(out["output_tokens"] / out["wall_s"])
    # What was sent: the chat path, greedy, OpenAI fields only, the prompt of 9 words.
    assert server.paths == ["/v1/chat/completions"] * 11
    body = server.bodies[0]
    assert set(body) == {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "messages",
    }
    assert body["stream"] is True and body["temperature"] == 0.0 and body["max_tokens"] == TOKENS
    prompts = [b["messages"][0]["content"] for b in server.bodies]
    assert all(len(p.split()) == 9 for p in prompts) and len(set(prompts)) == 11


@pytest.mark.parametrize("server", [(["slow"],)], indirect=True)
def test_duration_bound_cuts_running_requests(server):
    spec = LoadSpec(url=server.url, model="m", clients=2, requests=50, duration_s=1.0)
    t0 = time.perf_counter()
    out = run_load(spec)
    elapsed = time.perf_counter() - t0
    assert 1.0 <= elapsed < 3.0  # a whole reply would take 100 s
    assert out["requests_sent"] == 2 and out["errors"] == {"deadline": 2}
    assert out["requests_ok"] == 0 and out["stopped_by"] == "duration"


@pytest.mark.parametrize("server", [(["ok"],)], indirect=True)
def test_completions_endpoint_and_warmup(server):
    spec = LoadSpec(
        url=server.url, model="m", clients=4, requests=6, endpoint="completions", warmup_requests=3
    )
    out = run_load(spec)
    assert len(server.bodies) == 9 and out["requests_sent"] == 6
    assert out["warmup"]["errors"] == {} and out["warmup"]["wall_s"] > 0
    assert server.paths == ["/v1/completions"] * 9
    assert server.bodies[0]["prompt"] == prompt_text(128, -3) and "messages" not in server.bodies[0]
    assert out["output_tokens"] == 6 * TOKENS and out["ttft_s"]["n"] == 6
    assert out["itl_s"]["n"] == 6 * (TOKENS - 1)


def test_nothing_listening_is_a_connect_error():
    out = run_load(LoadSpec(url="http://127.0.0.1:9", model="m", clients=2, requests=3))
    assert out["errors"] == {"connect": 3} and out["output_tokens_per_s"] == 0


def test_report_on_known_timings():
    # Three requests sent at t0 = 0: text events at known times, one failed request.
    spec = LoadSpec(url="http://x:1", model="m", max_tokens=3)
    rs = [
        Result(index=0, start=0.0, end=1.0, text_times=[0.5, 0.6, 0.9], usage_completion=3),
        Result(index=1, start=0.2, end=2.0, text_times=[0.4, 1.0, 2.0], usage_completion=3),
        Result(index=2, start=1.0, end=1.5, text_times=[1.5, 1.5], usage_completion=3),
        Result(index=3, start=0.0, end=0.1, error_kind="http_429", error="busy"),
    ]
    out = report(spec, rs, t0=0.0, t1=2.5)
    assert out["wall_s"] == 2.0  # the last finished request, not t1
    assert out["output_tokens"] == 9 and out["output_tokens_per_s"] == 4.5
    ttft = [0.5, 0.2, 0.5]
    assert out["ttft_s"]["p50"] == pytest.approx(0.5)
    assert out["ttft_s"]["p99"] == pytest.approx(0.5)
    assert out["ttft_s"]["mean"] == pytest.approx(sum(ttft) / 3)
    itl = [0.1, 0.3, 0.6, 1.0, 0.0]
    assert out["itl_s"]["p50"] == pytest.approx(0.3)
    assert out["itl_s"]["p99"] == pytest.approx(np.percentile(itl, 99))
    # TPOT = (last - first) / (3 - 1): 0.2, 0.8, 0.0.
    assert out["tpot_s"]["p50"] == pytest.approx(0.2) and out["tpot_s"]["mean"] == pytest.approx(
        1 / 3
    )
    assert out["latency_s"]["p99"] == pytest.approx(np.percentile([1.0, 1.8, 0.5], 99))
    assert out["errors"] == {"http_429": 1} and out["all_hit_max_tokens"]


def test_percentile_is_numpy_linear():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q), abs=1e-12)
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5


def test_prompts_have_exactly_the_asked_tokens():
    tok = load_tokenizer("qwen")
    for n in (1, 37, 128):
        for i in range(4):
            assert len(tok.encode(prompt_text(n, i))) == n
    heads = {prompt_text(64, i).split()[:8].__str__() for i in range(64)}
    assert len(heads) == 64  # no shared 8-token prefix among 64 requests


def test_bad_flags_are_usage_errors():
    with pytest.raises(UsageError, match="--url"):
        main(["--url", "localhost:8000", "--model", "m"])
    with pytest.raises(UsageError, match="--clients"):
        main(["--url", "http://127.0.0.1:1", "--model", "m", "--clients", "0"])
