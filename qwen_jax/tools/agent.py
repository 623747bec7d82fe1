"""The agent loop: the model thinks, calls tools from a `Registry`, reads observations, answers.

Two loops, one per way of talking to a model:

text (format="react" on a model with `complete`: `LocalModel`, the evals' adapter), spec §6
exactly: the ChatML prompt with `react_query(tools, query)` as the user turn; generation stops
at `Observation:`; `parse_react` reads the last Action / Action Input (or the Final Answer);
the tool runs; "\\nObservation: {result}\\nThought:" is appended to the same assistant turn
(after the model's text, right-stripped, as Qwen's `parse_latest_plugin_call` re-appends an
eaten stop word) and generation continues.

messages (format="hermes" on `LocalModel`, or any `ServerModel`): OpenAI chat messages with
`tools=`; the reply's `tool_calls` run and come back as `tool` messages. Locally the checkpoint's
chat template renders and parses (`qwen_jax.serve.templates`: the Qwen2/2.5 `<tool_call>`
format for checkpoints that ship a template); against a server the server does (ours renders
ReAct for Qwen v1 checkpoints). A reply without tool calls is the final answer.

Outcomes: "answered"; "step_cap" (max_steps model calls without an answer); "no_action" (a reply
with neither an action nor a final answer); "error" (the model could not be queried: prompt over
the context, server unreachable; `AgentResult.error` says why). Tool failures are never errors
of the loop: the registry turns them into observations the model reads.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Protocol

from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM
from qwen_jax.tools.react import (
    STOP_WORDS,
    arguments_json,
    format_observation,
    parse_react,
    react_query,
)
from qwen_jax.tools.registry import Registry
from qwen_jax.tools.spec import ToolCall, ToolSpec, new_call_id

OUTCOMES = ("answered", "step_cap", "no_action", "error")
OnText = Callable[[str], None]


class ModelError(ValueError):
    """The model could not produce a reply (one line: why)."""


@dataclasses.dataclass(frozen=True)
class Reply:
    """One model reply in the messages loop: content, the calls parsed out, the raw text."""

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class Step:
    """One model call: its raw output, the tool calls it made and their observations."""

    text: str
    calls: tuple[ToolCall, ...] = ()
    observations: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AgentResult:
    final_answer: str | None
    steps: list[Step]
    outcome: str  # one of OUTCOMES
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class AgentEvent:
    """What `Agent.run` reports as it goes. kind: "text" (a delta of the model's output as it
    streams), "call", "observation", "final". `text` is what a console shows for it: for the
    ReAct loop the model's own streamed text already shows Action / Final Answer, so those
    events carry "" there."""

    kind: str
    text: str
    call: ToolCall | None = None


class TextModel(Protocol):
    """A model continued as text (the ReAct loop)."""

    def complete(
        self, messages: list[dict], assistant_prefix: str, stop: Sequence[str], on_text=None
    ) -> str:
        """Continue the open assistant turn after the ChatML `messages` (system + user) and
        `assistant_prefix`; stop before any of `stop` (not returned) or the end of the turn.
        (`Agent.run_batch` needs `complete_batch(requests, stop)` too: a list of
        (messages, assistant_prefix) continued in one call.)"""
        ...


class ChatModel(Protocol):
    """A model spoken to in OpenAI chat messages with tools (the messages loop)."""

    def chat(self, messages: list[dict], tools: list[ToolSpec], on_text=None) -> Reply: ...


class Agent:
    """`Agent(model, registry, format=..., max_steps=...).run(query, on_event)`.

    `system`: the system prompt; None means the format's default (ReAct: "You are a helpful
    assistant.", spec §6; messages: the chat template's or the server's own)."""

    def __init__(
        self,
        model,
        registry: Registry,
        *,
        format: str = "react",
        max_steps: int = 8,
        system: str | None = None,
    ):
        if format not in ("react", "hermes"):
            raise ValueError(f"format must be 'react' or 'hermes', got {format!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.text_loop = format == "react" and hasattr(model, "complete")
        if not self.text_loop and not hasattr(model, "chat"):
            raise ValueError(f"{type(model).__name__} cannot run the {format} format")
        self.model, self.registry = model, registry
        self.format, self.max_steps, self.system = format, max_steps, system

    def run(self, query: str, on_event: Callable[[AgentEvent], None] | None = None) -> AgentResult:
        emit = on_event or (lambda event: None)
        steps: list[Step] = []
        try:
            if not self.text_loop:
                return self._run_messages(query, emit, steps)
            loop = self._react(query, self.registry, emit, steps)
            request = next(loop)
            while True:
                on_text = lambda d: emit(AgentEvent("text", d))  # noqa: E731
                request = loop.send(self.model.complete(*request, STOP_WORDS, on_text=on_text))
        except StopIteration as done:  # the loop returned its result
            return done.value
        except ValueError as e:  # ModelError; GenerationError (prompt over the context), ...
            return _failed(steps, e)

    def run_batch(
        self, queries: Sequence[str], registries: Sequence[Registry] | None = None
    ) -> list[AgentResult]:
        """Independent queries, each with its own registry (default: this agent's), their
        model calls batched step by step through `model.complete_batch` (the evaluations'
        throughput; no events). A model error fails the queries of that call."""
        registries = list(registries or [self.registry] * len(queries))
        if len(registries) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(registries)} registries")
        if not self.text_loop or not hasattr(self.model, "complete_batch"):
            raise ValueError("run_batch needs format='react' and a model with complete_batch")
        steps: list[list[Step]] = [[] for _ in queries]
        loops = [
            self._react(q, r, lambda event: None, s) for q, r, s in zip(queries, registries, steps)
        ]
        results: list[AgentResult | None] = [None] * len(queries)
        pending = {i: next(loop) for i, loop in enumerate(loops)}
        while pending:
            rows = list(pending)
            try:
                texts = self.model.complete_batch([pending[i] for i in rows], STOP_WORDS)
            except ValueError as e:
                for i in rows:
                    results[i] = _failed(steps[i], e)
                break
            for i, text in zip(rows, texts):
                try:
                    pending[i] = loops[i].send(text)
                except StopIteration as done:
                    results[i] = done.value
                    del pending[i]
        return results

    # --- ReAct as text ------------------------------------------------------------------
    def _react(self, query: str, registry: Registry, emit, steps: list[Step]):
        """The ReAct loop of one query as a generator: it yields (messages, assistant prefix)
        for the model to continue, is sent the model's text, returns the AgentResult."""
        messages = [
            {"role": "system", "content": self.system or DEFAULT_SYSTEM},
            {"role": "user", "content": react_query(registry.specs, query)},
        ]
        turn = ""  # the assistant turn so far: thoughts, actions, observations
        for _ in range(self.max_steps):
            text = yield messages, turn
            parsed = parse_react(text)
            if parsed.action is None:
                steps.append(Step(text))
                if parsed.final_answer is None:
                    return AgentResult(None, steps, "no_action")
                emit(AgentEvent("final", ""))
                return AgentResult(parsed.final_answer.strip(), steps, "answered")
            call = _react_call(parsed.action.strip(), parsed.action_input)
            emit(AgentEvent("call", "", call))
            observation = registry.call(call.name, parsed.action_input)
            appended = format_observation(observation) + "\nThought:"
            emit(AgentEvent("observation", appended, call))
            turn += text.rstrip() + appended
            steps.append(Step(text, (call,), (observation,)))
        return AgentResult(None, steps, "step_cap")

    # --- OpenAI messages ----------------------------------------------------------------
    def _run_messages(self, query: str, emit, steps: list[Step]) -> AgentResult:
        """The messages loop (module docstring); model errors propagate to `run`."""
        tools = self.registry.specs
        # Without a system prompt of the caller's, the template's default applies (Qwen2.5's
        # differs from Qwen v1's "You are a helpful assistant.").
        messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": query})
        for _ in range(self.max_steps):
            reply = self.model.chat(messages, tools, on_text=lambda d: emit(AgentEvent("text", d)))
            if not reply.tool_calls:
                steps.append(Step(reply.text))
                if not (reply.content or "").strip():
                    return AgentResult(None, steps, "no_action")
                emit(AgentEvent("final", f"\nFinal Answer: {reply.content}"))
                return AgentResult(reply.content.strip(), steps, "answered")
            messages.append(
                {
                    "role": "assistant",
                    "content": reply.content,
                    "tool_calls": [c.openai() for c in reply.tool_calls],
                }
            )
            observations = []
            for call in reply.tool_calls:
                emit(
                    AgentEvent(
                        "call", f"\nAction: {call.name}\nAction Input: {call.arguments}", call
                    )
                )
                observation = self.registry.call(call.name, call.arguments)
                emit(AgentEvent("observation", f"\nObservation: {observation}\n", call))
                observations.append(observation)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.id,
                        "name": call.name,
                        "content": observation,
                    }
                )
            steps.append(Step(reply.text, reply.tool_calls, tuple(observations)))
        return AgentResult(None, steps, "step_cap")


def _failed(steps: list[Step], e: ValueError) -> AgentResult:
    why = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
    return AgentResult(None, steps, "error", why)


def _react_call(name: str, action_input: str | None) -> ToolCall:
    """The call a ReAct step makes; `arguments` is JSON text when the input parses (json5),
    else the input as written (the code interpreter's fenced code; the registry reports
    unparsable input to tools that need JSON)."""
    text = (action_input or "").strip()
    try:
        arguments = arguments_json(text)
    except ValueError:
        arguments = text
    return ToolCall(new_call_id(), name, arguments)


class LocalModel:
    """The engine as an agent model: `complete` (ReAct text loop) and `chat` (messages loop
    through `template`, a `qwen_jax.serve.templates.ChatTemplate`; needed for format="hermes").

    Prompts are token ids built from structure, never by encoding marker text: a tool output
    that prints `<|im_end|>` stays plain text inside the turn.
    """

    def __init__(self, engine, tokenizer, *, template=None, max_new_tokens=512, sampling=None):
        from qwen_jax.infer.sampling import SamplingParams

        if tokenizer is None or tokenizer.im_start_id is None:
            raise ModelError("the agent needs a tokenizer with ChatML tokens (<|im_start|>)")
        self.engine, self.tok, self.template = engine, tokenizer, template
        self.max_new_tokens, self.sampling = max_new_tokens, sampling or SamplingParams()  # greedy

    def _generate(self, ids: list[int], stop_ids, stop_strings, on_text) -> str:
        res = self.engine.generate(
            [ids],
            max_new_tokens=self.max_new_tokens,
            sampling=self.sampling,
            stop_ids=stop_ids,
            stop_strings=tuple(stop_strings),
            tokenizer=self.tok,
            on_token=None if on_text is None else lambda r, t, lp, delta: on_text(delta),
        )[0]
        return res.text

    def complete(self, messages, assistant_prefix, stop, on_text=None) -> str:
        from qwen_jax.tokenizer import chatml

        system, user = messages[0]["content"], messages[1:]
        window = self.engine.max_context - 1
        try:
            ids = chatml.build_prompt(self.tok, user, system=system, max_window_tokens=window)
        except ValueError as e:
            raise ModelError(str(e)) from None
        ids = ids + self.tok.encode(assistant_prefix, allowed_special=set())
        if len(ids) >= self.engine.max_context:
            raise ModelError(
                f"the conversation ({len(ids)} tokens) no longer fits the context "
                f"({self.engine.max_context})"
            )
        return self._generate(ids, chatml.stop_ids(self.tok), stop, on_text)

    def chat(self, messages, tools, on_text=None) -> Reply:
        if self.template is None:
            raise ModelError("the messages loop needs the checkpoint's chat template")
        ids = self.template.prompt_ids(self.tok, messages, tools, "auto")
        stops = self.template.stop_strings(tools)
        text = self._generate(ids, self.template.stop_ids(self.tok), stops, on_text)
        parsed = self.template.parse(text, tools)
        return Reply(parsed.content, tuple(parsed.tool_calls), text)


class ServerModel:
    """An OpenAI-compatible server (`qwen-jax serve`, or any) as an agent model.

    `url` is the API base ("http://127.0.0.1:8000/v1"; "/v1" is added when missing). Replies are
    streamed (server-sent events) so the console shows them as they come; greedy by default.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        api_key: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        stream: bool = True,
        timeout_s: float = 600.0,
    ):
        base = url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model_name, self.api_key = model_name, api_key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.stream, self.timeout_s = stream, timeout_s

    def chat(self, messages, tools, on_text=None) -> Reply:
        body = {
            "model": self.model_name,
            "messages": messages,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if tools:
            body["tools"] = [t.openai() for t in tools]
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body, ensure_ascii=False).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                if self.stream:
                    return _read_stream(response, on_text)
                return _read_message(json.loads(response.read()))
        except urllib.error.HTTPError as e:
            raise ModelError(f"server answered {e.code}: {_error_text(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ModelError(f"cannot reach {self.url}: {reason}") from None
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ModelError(f"unexpected reply from {self.url}: {e!r}") from None


def _error_text(e: urllib.error.HTTPError) -> str:
    body = e.read().decode(errors="replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:500] or str(e.reason)


def _read_message(data: dict) -> Reply:
    message = data["choices"][0]["message"]
    calls = tuple(
        ToolCall(c.get("id") or new_call_id(), c["function"]["name"], c["function"]["arguments"])
        for c in message.get("tool_calls") or ()
    )
    content = message.get("content")
    return Reply(content, calls, content or "")


def _read_stream(response, on_text) -> Reply:
    """Accumulate an OpenAI chat-completions event stream: content deltas (passed to
    `on_text`) and tool-call fragments (per `index`: id and name once, arguments in pieces)."""
    content: list[str] = []
    calls: dict[int, dict] = {}
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            break
        chunk = json.loads(payload)
        if "error" in chunk:
            raise ModelError(f"server error: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content.append(delta["content"])
                if on_text is not None:
                    on_text(delta["content"])
            for frag in delta.get("tool_calls") or ():
                call = calls.setdefault(frag.get("index", 0), {"id": None, "name": "", "args": ""})
                call["id"] = frag.get("id") or call["id"]
                fn = frag.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["args"] += fn.get("arguments") or ""
    text = "".join(content)
    tool_calls = tuple(
        ToolCall(c["id"] or new_call_id(), c["name"], c["args"]) for _, c in sorted(calls.items())
    )
    return Reply(text or None, tool_calls, text)
