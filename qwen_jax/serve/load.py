"""The serving load tool: N concurrent streaming clients against an OpenAI-compatible server.

  python -m qwen_jax.serve.load --url http://127.0.0.1:8000 --model NAME [--clients 16]
      [--requests 64] [--prompt-tokens 128] [--max-tokens 64] [--duration-s 120]
      [--endpoint chat|completions] [--warmup-requests N] [--out JSON]

Closed loop: `clients` workers each send one streaming request, read its server-sent events to
the end, then send the next, until `requests` requests were sent or `duration_s` passed since the
first (a request still running at that moment is cut and counted as an error of kind "deadline").
`--warmup-requests` are sent first the same way and not measured (compilation, cache
allocation); their errors and wall time are reported under "warmup". Prints one JSON object
(`report`), also written to `--out`.

Prompts: request i's prompt is `prompt_text(prompt_tokens, i)`: `prompt_tokens` common English
words, each a single token with its leading space in Qwen's BPE (and GPT-2-style BPEs), drawn
from a seeded generator per request, so every prompt has exactly that many tokens and no two
share more than a few leading tokens (neither server gains from prefix caching).
/v1/completions sends it as the prompt; /v1/chat/completions as the one user message, to which
the chat template adds its fixed header. The servers' `usage.prompt_tokens` are reported so
both sides can be compared.

Output length: greedy (temperature 0) with `max_tokens`, no stop strings and nothing outside the
OpenAI schema (`ignore_eos`, `min_tokens` are vLLM extensions; transformers answers 422). A
request may still end early when the model emits a stop token; the report counts what came
back (`completion_tokens`, `all_hit_max_tokens`, `finish_reasons`). benchmarks/serve_bench.py
keeps lengths equal by serving random weights whose special-token rows of the output head are
zero: every other logit of a random head has some value above 0, so greedy decoding never picks
a stop token, and a run counts only if every request hit `max_tokens`.

Timings (seconds, perf_counter on the client): TTFT is from sending the request to the first
event carrying text (`delta.content`, `delta.reasoning_content` or `text`; the role-only first
chunk does not count, and a token held back by the server's detokenizer arrives with the next
one); ITL is every gap between consecutive text events (vLLM's definition; several events in
one network read count as gaps of ~0); TPOT is per request (last - first text event) /
(completion tokens - 1). Completion tokens come from the final `usage` chunk when the server
sends one (we ask with `stream_options.include_usage`), otherwise from the count of text events
(`tokens_counted_by` says which). Output tokens/s = completion tokens of the requests that
finished / wall time from the first request sent to the last one finished.

The client is plain asyncio HTTP/1.1 (one connection per request, chunked or plain bodies), so
the tool needs nothing beyond the standard library and measures the bytes as they arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from qwen_jax.cli import UsageError

# Single tokens (with their leading space) in Qwen's byte-level BPE; tests/test_serve_load.py
# checks this against the real Qwen vocabulary.
WORDS = (
    "the of and to in is that for it was on with as be at by this have from or one had not but "
    "what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know"
).split()
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def prompt_text(n_tokens: int, index: int, seed: int = 0) -> str:
    """Request `index`'s prompt: `n_tokens` words, each " word" (one token), seeded per request."""
    rng = random.Random(seed * 1_000_003 + index)
    return "".join(" " + rng.choice(WORDS) for _ in range(n_tokens))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    """{"n", "mean", "p50", "p99"} of `values` (None for the statistics when there are none)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p99": None}
    return {
        "n": len(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
    }


@dataclasses.dataclass
class Result:
    """One request as the client saw it; times are perf_counter seconds."""

    index: int
    start: float
    end: float = math.nan
    text_times: list[float] = dataclasses.field(default_factory=list)  # arrival of text events
    usage_completion: int | None = None
    usage_prompt: int | None = None
    finish_reason: str | None = None
    error_kind: str | None = None  # None when the request finished
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def completion_tokens(self) -> int:
        if self.usage_completion is not None:
            return self.usage_completion
        return len(self.text_times)


class ResponseError(Exception):
    """A request the server answered or ended wrongly; `kind` is the report's error key."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------- the HTTP client


async def _post(host: str, port: int, path: str, body: dict):
    """Send one POST (Connection: close); return (status, headers, reader, writer)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + payload)
    await writer.drain()
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ResponseError("protocol", f"bad status line {status_line[:80]!r}")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers, reader, writer


async def _body(reader: asyncio.StreamReader, headers: dict) -> AsyncIterator[bytes]:
    """The response body as it arrives (chunked transfer decoded)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise asyncio.IncompleteReadError(b"", None)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size + 2)  # the chunk and its CRLF
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI error body ({"error": {"message"}}) or FastAPI's {"detail"}."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:300]
        if "detail" in obj:
            return str(obj["detail"])[:300]
    return str(obj)[:300]


def _text_of(choice: dict, endpoint: str) -> str:
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


def _on_event(data: str, t: float, res: Result, endpoint: str) -> bool:
    """Account one SSE data payload; True at the end of the stream ([DONE])."""
    if data == "[DONE]":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        raise ResponseError("protocol", f"event is not JSON: {data[:80]!r}") from None
    if "error" in obj:
        raise ResponseError("stream_error", _error_message(data.encode()))
    for choice in obj.get("choices") or ():
        if _text_of(choice, endpoint):
            res.text_times.append(t)
        if choice.get("finish_reason"):
            res.finish_reason = choice["finish_reason"]
    usage = obj.get("usage")
    if usage:
        res.usage_completion = usage.get("completion_tokens", res.usage_completion)
        res.usage_prompt = usage.get("prompt_tokens", res.usage_prompt)
    return False


async def stream_request(
    host: str, port: int, path: str, body: dict, res: Result, endpoint: str
) -> None:
    """Send `body` and read its event stream into `res`; raises ResponseError on a failure."""
    status, headers, reader, writer = await _post(host, port, path, body)
    try:
        if status != 200:
            raw = b"".join([c async for c in _body(reader, headers)])
            kind = "http_429" if status == 429 else f"http_{status // 100}xx"
            raise ResponseError(kind, f"HTTP {status}: {_error_message(raw)}")
        buf, done = b"", False
        async for chunk in _body(reader, headers):
            t = time.perf_counter()
            buf += chunk.replace(b"\r\n", b"\n")
            *events, buf = buf.split(b"\n\n")
            for event in events:
                lines = [ln for ln in event.decode().split("\n") if ln.startswith("data:")]
                if lines:
                    data = "\n".join(ln[5:].removeprefix(" ") for ln in lines)
                    done = _on_event(data, t, res, endpoint) or done
        if not (done or res.finish_reason):
            raise ResponseError("incomplete", "the stream ended without a finish_reason or [DONE]")
    finally:
        writer.close()


# ---------------------------------------------------------------------------------- the load


@dataclasses.dataclass(frozen=True)
class LoadSpec:
    url: str  # http://host:port (a trailing /v1 is accepted)
    model: str
    clients: int = 16
    requests: int = 64
    prompt_tokens: int = 128
    max_tokens: int = 64
    duration_s: float = 120.0
    endpoint: str = "chat"  # "chat" | "completions"
    warmup_requests: int = 0
    seed: int = 0

    def check(self) -> None:
        """UsageError (one line) for a spec the tool cannot run."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise UsageError(f"--url must be http://HOST:PORT, got {self.url!r}")
        if self.endpoint not in ENDPOINTS:
            raise UsageError(f"--endpoint must be one of {sorted(ENDPOINTS)}")
        for name in ("clients", "requests", "prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.duration_s > 0:
            raise UsageError("--duration-s must be > 0")
        if self.warmup_requests < 0:
            raise UsageError("--warmup-requests must be >= 0")

    def body(self, index: int) -> dict:
        """Request `index`'s JSON body (OpenAI schema only)."""
        text = prompt_text(self.prompt_tokens, index, self.seed)
        body = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body


async def _run(spec: LoadSpec, count: int, first_index: int) -> tuple[list[Result], float, float]:
    """`count` requests by `spec.clients` workers, cut at `spec.duration_s`; (results, t0, t1)."""
    parts = urlsplit(spec.url)
    host, port = parts.hostname, parts.port or 80
    path = parts.path.rstrip("/").removesuffix("/v1") + ENDPOINTS[spec.endpoint]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + spec.duration_s
    t0 = time.perf_counter()
    next_index = iter(range(first_index, first_index + count))
    results: list[Result] = []

    async def worker() -> None:
        for i in next_index:  # one shared iterator: each index is taken once
            if loop.time() >= deadline:
                return
            res = Result(index=i, start=time.perf_counter())
            results.append(res)
            try:
                async with asyncio.timeout_at(deadline):
                    await stream_request(host, port, path, spec.body(i), res, spec.endpoint)
            except TimeoutError:
                res.error_kind, res.error = "deadline", f"cut at --duration-s {spec.duration_s}"
            except ResponseError as e:
                res.error_kind, res.error = e.kind, str(e)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                kind = "connect" if isinstance(e, ConnectionRefusedError) else "disconnect"
                res.error_kind, res.error = kind, f"{type(e).__name__}: {e}"[:300]
            except ValueError as e:  # undecodable bytes, a malformed chunk size
                res.error_kind, res.error = "protocol", f"{type(e).__name__}: {e}"[:300]
            res.end = time.perf_counter()

    await asyncio.gather(*(worker() for _ in range(min(spec.clients, count))))
    return results, t0, time.perf_counter()


def report(spec: LoadSpec, results: list[Result], t0: float, t1: float) -> dict:
    """The run's figures as one JSON-able dict (see the module docstring for definitions)."""
    ok = [r for r in results if r.ok]
    wall = (max(r.end for r in ok) - t0) if ok else t1 - t0
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.text_times[0] - r.start for r in ok if r.text_times]
    itl = [b - a for r in ok for a, b in zip(r.text_times, r.text_times[1:])]
    tpot = [
        (r.text_times[-1] - r.text_times[0]) / (r.completion_tokens - 1)
        for r in ok
        if len(r.text_times) >= 2 and r.completion_tokens >= 2
    ]
    errors = Counter(r.error_kind for r in results if not r.ok)
    examples = {}
    for r in results:
        if not r.ok:
            examples.setdefault(r.error_kind, r.error)
    completion = [r.completion_tokens for r in ok]
    prompts = [r.usage_prompt for r in ok if r.usage_prompt is not None]
    return {
        "url": spec.url,
        "model": spec.model,
        "endpoint": ENDPOINTS[spec.endpoint],
        "clients": spec.clients,
        "requests_planned": spec.requests,
        "requests_sent": len(results),
        "requests_ok": len(ok),
        "stopped_by": "duration" if len(results) < spec.requests or errors["deadline"] else "count",
        "prompt_tokens_asked": spec.prompt_tokens,
        "max_tokens": spec.max_tokens,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_s": summary(ttft),
        "itl_s": summary(itl),
        "tpot_s": summary(tpot),
        "latency_s": summary([r.end - r.start for r in ok]),
        "completion_tokens": {
            "min": min(completion, default=None),
            "max": max(completion, default=None),
        },
        "all_hit_max_tokens": bool(ok) and all(n == spec.max_tokens for n in completion),
        "prompt_tokens_served": {
            "min": min(prompts, default=None),
            "max": max(prompts, default=None),
        },
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        "tokens_counted_by": dict(
            Counter("usage" if r.usage_completion is not None else "chunks" for r in ok)
        ),
        "errors": dict(errors),
        "error_examples": examples,
    }


def run_load(spec: LoadSpec) -> dict:
    """Warm up (results dropped, errors kept), run the measured load, return `report`."""
    spec.check()
    warmup = {"requests": spec.warmup_requests, "errors": {}, "wall_s": 0.0}
    if spec.warmup_requests:
        warm, t0, t1 = asyncio.run(_run(spec, spec.warmup_requests, -spec.warmup_requests))
        warmup.update(errors=dict(Counter(r.error_kind for r in warm if not r.ok)), wall_s=t1 - t0)
    out = report(spec, *asyncio.run(_run(spec, spec.requests, first_index=0)))
    out["warmup"] = warmup
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qwen_jax.serve.load", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--url", required=True, help="http://HOST:PORT of the server")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=120.0)
    p.add_argument("--endpoint", default="chat", choices=sorted(ENDPOINTS))
    p.add_argument("--warmup-requests", type=int, default=0, help="sent first, not measured")
    p.add_argument("--seed", type=int, default=0, help="of the prompts' words")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = p.parse_args(argv)
    spec = LoadSpec(
        url=args.url,
        model=args.model,
        clients=args.clients,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        duration_s=args.duration_s,
        endpoint=args.endpoint,
        warmup_requests=args.warmup_requests,
        seed=args.seed,
    )
    out = run_load(spec)
    text = json.dumps(out, indent=1)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"qwen_jax.serve.load: error: {e}", file=sys.stderr)
        sys.exit(2)
