"""The OpenAI-compatible HTTP app (FastAPI): chat and text completions over a `Scheduler`.

    POST /v1/chat/completions   messages -> the checkpoint's chat template -> n scheduler
                                requests; tools + tool_choice -> message.tool_calls
    POST /v1/completions        prompt (text, ids, or a batch of either) -> n requests each
    GET  /v1/models             the served model
    GET  /health                200 while the app answers
    GET  /metrics               Prometheus text (qwen_jax.serve.metrics)

Streaming (`stream: true`) answers server-sent events, one `data: {chunk}` per text delta and
`data: [DONE]` at the end (with `stream_options.include_usage`, a last chunk with the usage and
no choices). With tools, a chat reply is held until it ends and then sent as content and
`tool_calls` deltas: a tool call's text must not leak out as content before it is recognized.

Every request runs as its own scheduler request(s): a bad request is answered 4xx before
anything is submitted, a full queue 429, and a generation that fails answers 500 (or an error
event mid-stream) for that request only. A client that goes away cancels its requests at once:
the event loop notices a failed send, and between events polls `Request.is_disconnected`
(every `DISCONNECT_POLL_S`), so a slot is freed even while its tokens are held back.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_jax.infer.engine import GenerationError
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.serve import metrics
from qwen_jax.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_logprobs,
    completion_logprobs,
    error_body,
    new_id,
    now,
    parse_request,
    sse,
    tool_calls_json,
    usage,
)
from qwen_jax.serve.scheduler import Finished, GenRequest, QueueFull, TokenEvent
from qwen_jax.serve.templates import effective_tools
from qwen_jax.tools.spec import ToolSpecError, tools_from_openai

DISCONNECT_POLL_S = 0.2


class _Disconnected(Exception):
    """The client went away; its requests are cancelled."""


class _Run:
    """The events of a request's scheduler handles, merged: `next()` -> (choice index, event)
    or None when every handle has finished. Watches the client; `close()` cancels whatever
    has not finished (called on every way out)."""

    def __init__(self, request: Request, handles: list):
        self.request, self.handles = request, handles
        self.queue: asyncio.Queue = asyncio.Queue()
        self.live = set(range(len(handles)))
        self.pumps = [asyncio.ensure_future(self._pump(i, h)) for i, h in enumerate(handles)]
        self._get: asyncio.Future | None = None
        self._checked = asyncio.get_running_loop().time()

    async def _pump(self, i: int, handle) -> None:
        try:
            async for ev in handle.events():
                self.queue.put_nowait((i, ev))
                if isinstance(ev, Finished):
                    return
            message = "the scheduler ended the request without a result"
        except Exception as e:  # noqa: BLE001 - a broken request fails alone, as an error
            message = f"{type(e).__name__}: {e}"
        self.queue.put_nowait((i, Finished("error", 0, 0, "", (), error=message)))

    async def next(self) -> tuple[int, TokenEvent | Finished] | None:
        while self.live:
            # One get() stays pending across polls: cancelling a get() on timeout can lose
            # the item it was about to return.
            if self._get is None:
                self._get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._get}, timeout=DISCONNECT_POLL_S)
            # Checked on a clock, not only when idle: a non-streaming or tool-call reply sends
            # nothing until it ends, so no failed send would ever tell.
            t = asyncio.get_running_loop().time()
            if t - self._checked >= DISCONNECT_POLL_S:
                self._checked = t
                if await self.request.is_disconnected():
                    raise _Disconnected
            if not done:
                continue
            i, ev = self._get.result()
            self._get = None
            if isinstance(ev, Finished):
                self.live.discard(i)
            return i, ev
        return None

    def close(self) -> None:
        for i in self.live:
            self.handles[i].cancel()
        for task in [*self.pumps, self._get]:
            if task is not None and not task.done():
                task.cancel()


@dataclasses.dataclass
class _Choice:
    """One choice being built: its events (for logprobs), the text sent so far."""

    events: list = dataclasses.field(default_factory=list)
    sent: str = ""
    finished: Finished | None = None


class _Server:
    def __init__(self, scheduler, template, tokenizer, model_name: str, max_context: int):
        self.scheduler, self.template, self.tok = scheduler, template, tokenizer
        self.model_name, self.max_context = model_name, max_context
        self.created = now()
        self.http_errors: Counter = Counter()

    # ------------------------------------------------------------------ shared request steps

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )

    def check_prompt(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param)
        if len(ids) >= self.max_context:
            raise bad_request(
                f"This model's maximum context length is {self.max_context} tokens; the prompt "
                f"has {len(ids)} tokens (and at least one must be generated)",
                param,
                "context_length_exceeded",
            )

    def budget(self, max_tokens: int | None, param: str, prompt_len: int) -> int:
        """max_tokens (None: the rest of the context); more than fits is clipped by the
        scheduler (finish_reason "length")."""
        if max_tokens is not None and max_tokens > self.max_context:
            raise bad_request(
                f"{param} must be at most the context length {self.max_context}, got {max_tokens}",
                param,
            )
        return max_tokens if max_tokens is not None else self.max_context - prompt_len

    def sampling(self, req, seed: int) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=max(0, req.top_k),
                repetition_penalty=req.repetition_penalty,
                seed=seed,
            )
        except ValueError as e:
            raise bad_request(str(e)) from None

    def submit(self, reqs: list[GenRequest]) -> list:
        """Submit all or none: a refusal cancels the ones already in."""
        handles = []
        try:
            for r in reqs:
                handles.append(self.scheduler.submit(r))
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, QueueFull):
                raise APIError(
                    429,
                    f"the server's queue is full, retry later ({e})",
                    type="rate_limit_error",
                    code="queue_full",
                ) from None
            if isinstance(e, GenerationError):
                raise bad_request(str(e)) from None
            raise
        return handles

    async def collect(self, request: Request, handles: list) -> list[_Choice] | None:
        """Run to the end; None when the client went away (its requests are cancelled)."""
        run, choices = _Run(request, handles), [_Choice() for _ in handles]
        try:
            while (item := await run.next()) is not None:
                i, ev = item
                if isinstance(ev, Finished):
                    choices[i].finished = ev
                else:
                    choices[i].events.append(ev)
        except _Disconnected:
            return None
        finally:
            run.close()
        failed = [c.finished for c in choices if c.finished.finish_reason == "error"]
        if failed:
            raise APIError(
                500, f"generation failed: {failed[0].error}", type="server_error", code="error"
            )
        return choices

    def visible_events(self, events, stop_ids) -> list[TokenEvent]:
        """The tokens logprobs report: not the stop token that ended the row."""
        return [e for e in events if e.token_id not in stop_ids]

    # ------------------------------------------------------------------------------- chat

    def chat_requests(self, req: ChatCompletionRequest):
        """(GenRequests, tools to parse replies with or None, stop ids)."""
        self.check_model(req.model)
        try:
            tools = tools_from_openai(req.tools)
        except ToolSpecError as e:
            raise bad_request(str(e), "tools") from None
        named = req.chosen_tool()
        if named is not None and named not in {t.name for t in tools}:
            raise bad_request(f"tool_choice names {named!r}, which is not in tools", "tool_choice")
        try:  # what the model is offered: none for "none", only the named one
            offered = effective_tools(tools, req.tool_choice)
        except ValueError as e:
            raise bad_request(str(e), "tool_choice") from None
        messages = [m.template_dict() for m in req.messages]
        try:
            ids = self.template.prompt_ids(self.tok, messages, tools, req.tool_choice)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        self.check_prompt(ids, "messages")
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        budget = self.budget(req.budget(), param, len(ids))
        stop_ids = () if req.ignore_eos else tuple(self.template.stop_ids(self.tok))
        stops = req.stop_strings() + tuple(self.template.stop_strings(offered))
        top = (req.top_logprobs or 0) if req.logprobs else None
        gens = [
            GenRequest(tuple(ids), budget, self.sampling(req, s), stop_ids, stops, top)
            for s in req.seeds()
        ]
        return gens, offered, stop_ids

    def reply(self, fin: Finished, tools) -> tuple[dict, str]:
        """(message, finish_reason) of a finished chat choice."""
        content, calls = fin.text, ()
        if tools:
            parsed = self.template.parse(fin.text, tools)
            content, calls = parsed.content, parsed.tool_calls
        message: dict = {"role": "assistant", "content": content}
        reason = fin.finish_reason
        if calls:
            message["tool_calls"] = tool_calls_json(calls)
            reason = "tool_calls" if reason == "stop" else reason
        return message, reason

    async def chat(self, request: Request):
        req = parse_request(ChatCompletionRequest, await request.body())
        gens, tools, stop_ids = self.chat_requests(req)
        handles = self.submit(gens)
        rid, created = new_id("chatcmpl"), now()
        head = {"id": rid, "created": created, "model": self.model_name}
        if req.stream:
            n_prompt = len(gens[0].prompt_ids)
            events = self.chat_stream(request, req, handles, tools, stop_ids, head, n_prompt)
            return _sse_response(events)
        choices = await self.collect(request, handles)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            message, reason = self.reply(c.finished, tools)
            lp = None
            if req.logprobs:
                lp = chat_logprobs(self.tok, self.visible_events(c.events, stop_ids))
            out.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        n_out = sum(c.finished.completion_tokens for c in choices)
        return {
            **head,
            "object": "chat.completion",
            "choices": out,
            "usage": usage(len(gens[0].prompt_ids), n_out),
            "system_fingerprint": None,
        }

    async def chat_stream(self, request, req, handles, tools, stop_ids, head, n_prompt):
        def chunk(i, delta, reason=None, logprobs=None):
            c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            body = {**head, "object": "chat.completion.chunk", "choices": [c]}
            return sse({**body, "usage": None} if req.include_usage() else body)

        run, choices = _Run(request, handles), [_Choice() for _ in handles]
        try:
            for i in range(len(handles)):
                yield chunk(i, {"role": "assistant", "content": ""})
            while (item := await run.next()) is not None:
                i, ev = item
                c = choices[i]
                if isinstance(ev, TokenEvent):
                    c.events.append(ev)
                    if tools:  # held until the reply is complete (see the module docstring)
                        continue
                    lp = None
                    if req.logprobs:
                        lp = chat_logprobs(self.tok, self.visible_events([ev], stop_ids))
                    if ev.text or (lp and lp["content"]):
                        c.sent += ev.text
                        yield chunk(i, {"content": ev.text}, logprobs=lp)
                    continue
                c.finished = ev
                if ev.finish_reason == "error":
                    self.http_errors[500] += 1
                    yield sse(error_body(f"generation failed: {ev.error}", "server_error"))
                    break
                if tools:
                    message, reason = self.reply(ev, tools)
                    lp = None
                    if req.logprobs:
                        lp = chat_logprobs(self.tok, self.visible_events(c.events, stop_ids))
                    if message["content"] or lp:
                        yield chunk(i, {"content": message["content"] or ""}, logprobs=lp)
                    if "tool_calls" in message:
                        calls = [{"index": k, **tc} for k, tc in enumerate(message["tool_calls"])]
                        yield chunk(i, {"tool_calls": calls})
                else:
                    reason = ev.finish_reason
                    rest = ev.text[len(c.sent) :] if ev.text.startswith(c.sent) else ""
                    if rest:
                        yield chunk(i, {"content": rest})
                yield chunk(i, {}, reason)
            else:
                if req.include_usage():
                    n_out = sum(c.finished.completion_tokens for c in choices)
                    body = {**head, "object": "chat.completion.chunk", "choices": []}
                    yield sse({**body, "usage": usage(n_prompt, n_out)})
            yield sse("[DONE]")
        except _Disconnected:
            return
        finally:
            run.close()

    # ------------------------------------------------------------------------ completions

    def completion_requests(self, req: CompletionRequest) -> tuple[list[GenRequest], list]:
        self.check_model(req.model)
        gens, prompts = [], []
        for k, p in enumerate(req.prompts()):
            param = "prompt" if len(req.prompts()) == 1 else f"prompt[{k}]"
            ids = self.tok.encode(p, allowed_special="all") if isinstance(p, str) else list(p)
            self.check_prompt(ids, param)
            prompts.append(ids)
        budget = self.budget(req.max_tokens, "max_tokens", 0)
        stop_ids = () if req.ignore_eos else (self.tok.eod_id,)
        for ids in prompts:
            for s in req.seeds():
                sampling = self.sampling(req, s)
                gens.append(
                    GenRequest(tuple(ids), budget, sampling, stop_ids, req.stop_strings(),
                               req.logprobs)
                )  # fmt: skip
        return gens, prompts

    async def completions(self, request: Request):
        req = parse_request(CompletionRequest, await request.body())
        gens, prompts = self.completion_requests(req)
        handles = self.submit(gens)
        head = {"id": new_id("cmpl"), "created": now(), "model": self.model_name}
        n_prompt = sum(map(len, prompts))
        stop_ids = gens[0].stop_ids
        if req.stream:
            events = self.completion_stream(request, req, handles, head, n_prompt, stop_ids)
            return _sse_response(events)
        choices = await self.collect(request, handles)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            lp = None
            if req.logprobs is not None:
                lp = completion_logprobs(self.tok, self.visible_events(c.events, stop_ids))
            text, reason = c.finished.text, c.finished.finish_reason
            out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
        n_out = sum(c.finished.completion_tokens for c in choices)
        return {
            **head,
            "object": "text_completion",
            "choices": out,
            "usage": usage(n_prompt, n_out),
            "system_fingerprint": None,
        }

    async def completion_stream(self, request, req, handles, head, n_prompt, stop_ids):
        def chunk(i, text, reason=None, logprobs=None):
            c = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
            body = {**head, "object": "text_completion", "choices": [c]}
            return sse({**body, "usage": None} if req.include_usage() else body)

        run, choices = _Run(request, handles), [_Choice() for _ in handles]
        try:
            while (item := await run.next()) is not None:
                i, ev = item
                c = choices[i]
                if isinstance(ev, TokenEvent):
                    lp = None
                    if req.logprobs is not None:
                        events = self.visible_events([ev], stop_ids)
                        lp = completion_logprobs(self.tok, events, len(c.sent))
                    if ev.text or (lp and lp["tokens"]):
                        c.sent += ev.text
                        yield chunk(i, ev.text, logprobs=lp)
                    continue
                c.finished = ev
                if ev.finish_reason == "error":
                    self.http_errors[500] += 1
                    yield sse(error_body(f"generation failed: {ev.error}", "server_error"))
                    break
                rest = ev.text[len(c.sent) :] if ev.text.startswith(c.sent) else ""
                yield chunk(i, rest, ev.finish_reason)
            else:
                if req.include_usage():
                    n_out = sum(c.finished.completion_tokens for c in choices)
                    body = {**head, "object": "text_completion", "choices": []}
                    yield sse({**body, "usage": usage(n_prompt, n_out)})
            yield sse("[DONE]")
        except _Disconnected:
            return
        finally:
            run.close()


def _sse_response(events) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(scheduler, template, tokenizer, *, model_name: str, max_context: int) -> FastAPI:
    """The app over a started `Scheduler` (or a test's `ScriptedScheduler`), the checkpoint's
    `ChatTemplate` and its tokenizer. The caller owns the scheduler (start / close)."""
    app = FastAPI(title="qwen-jax", docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(scheduler, template, tokenizer, model_name, max_context)
    app.state.server = server

    def error_response(status: int, body: dict) -> JSONResponse:
        server.http_errors[status] += 1
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, error_body(str(e.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(400, error_body(str(e), "invalid_request_error"))

    async def guarded(handler, request: Request):
        try:
            return await handler(request)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - one request's bug is that request's 500
            msg = f"internal error: {type(e).__name__}: {e}"
            return error_response(500, error_body(msg, "server_error"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await guarded(server.chat, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await guarded(server.completions, request)

    card = {
        "id": model_name,
        "object": "model",
        "created": server.created,
        "owned_by": "qwen-jax",
        "max_model_len": max_context,
    }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        text = metrics.render(scheduler.stats(), dict(server.http_errors))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
