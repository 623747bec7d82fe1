"""OpenAI wire format: request models, their validation, error bodies, response pieces.

Requests are parsed from the raw body here (not by FastAPI's own validation, whose 422 and
`{"detail": ...}` body OpenAI clients do not understand): every problem becomes an `APIError`,
which the app sends as OpenAI's error body `{"error": {"message", "type", "param", "code"}}`
with a 4xx status. Fields a client may send that we do not act on (`user`, `metadata`, ...) are
ignored, as vLLM does; fields that would change the output and that we cannot honour
(`logit_bias`, penalties, `echo`, `best_of`, a JSON `response_format`) are refused, never
silently dropped.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qwen_jax.tokenizer.base import unknown_marker

MAX_N = 8  # choices per request: each is one scheduler request
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- request models


class _Base(BaseModel):
    """Unknown fields are ignored. Cross-field checks raise APIError directly (pydantic passes
    exceptions other than ValueError through), so they name their parameter."""

    model_config = ConfigDict(extra="ignore")


class FunctionCall(_Base):
    name: str
    arguments: str


class ToolCallIn(_Base):
    """An assistant message's earlier tool call, sent back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Base):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # text parts are joined (see _content)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> str | None:
        """`content` as text: a string, or a list of {"type": "text", "text": ...} parts
        (joined with newlines, as vLLM does); other part types are not supported."""
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")
        texts = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _needs_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def template_dict(self) -> dict:
        """The message as the chat templates take it (OpenAI's shape, content as text)."""
        d: dict = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    """The fields both endpoints share. `top_k`, `repetition_penalty` and `ignore_eos` are
    vLLM's extra-body extensions."""

    model: str | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # 0 or -1: off
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @model_validator(mode="after")
    def _shared_checks(self):
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported (use repetition_penalty)", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return tuple(s for s in stops if s)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def seeds(self) -> list[int]:
        """One seed per choice: `seed`, seed + 1, ... (the same seed twice would give n
        identical samples), or fresh random ones when no seed is given."""
        base = self.seed if self.seed is not None else secrets.randbits(31)
        return [(base + i) % 2**31 for i in range(self.n)]


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise bad_request(
                "response_format other than 'text' is not supported", "response_format"
            )
        if isinstance(self.tool_choice, str) and self.tool_choice not in (
            "none",
            "auto",
            "required",
        ):
            raise bad_request(
                "tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice"
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise bad_request("tool_choice needs tools", "tool_choice")
        return self

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chosen_tool(self) -> str | None:
        """The function name of a named tool_choice ({"type": "function", "function":
        {"name": ...}}), else None."""
        if not isinstance(self.tool_choice, dict):
            return None
        name = (self.tool_choice.get("function") or {}).get("name")
        if self.tool_choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        return name


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_checks(self):
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise bad_request("best_of other than n is not supported", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt is empty", "prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text or id list, or a batch of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def parse_request(cls: type[_Base], raw: bytes) -> Any:
    """The request model from a raw body; APIError(400) naming the first problem."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ""
    for part in err["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in part or part in ("str", "int", "list", "dict", "function-after"):
            continue  # pydantic's union-branch labels, not fields of the request
        else:
            param += f".{part}" if param else part
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("literal_error", "enum") and "input" in err:
        msg += f", got {err['input']!r}"
    elif err["type"] == "missing":
        msg = "is required"
    return bad_request(f"{param}: {msg}" if param else msg, param or None)


# --------------------------------------------------------------------------- response pieces


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_piece(tokenizer, token_id: int) -> tuple[str, list[int] | None]:
    """(text, UTF-8 bytes or None) of one token for logprobs: byte-level tokens may hold part
    of a character (shown as U+FFFD, the bytes say what it is); ids without text get the
    `<unk:ID>` marker and no bytes."""
    try:
        data = tokenizer.token_bytes(int(token_id))
    except (ValueError, KeyError, IndexError):
        return unknown_marker(int(token_id)), None
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokenizer, events) -> dict:
    """`choices[i].logprobs` of a chat completion from TokenEvents."""
    content = []
    for ev in events:
        text, data = token_piece(tokenizer, ev.token_id)
        top = []
        for tid, lp in ev.top:
            t, b = token_piece(tokenizer, tid)
            top.append({"token": t, "logprob": lp, "bytes": b})
        content.append({"token": text, "logprob": ev.logprob, "bytes": data, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, events, offset: int = 0) -> dict:
    """The legacy `choices[i].logprobs` of /v1/completions (tokens, token_logprobs,
    top_logprobs as {token: logprob}, text_offset)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ev in events:
        text = token_piece(tokenizer, ev.token_id)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(ev.logprob)
        out["top_logprobs"].append({token_piece(tokenizer, t)[0]: lp for t, lp in ev.top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def tool_calls_json(calls) -> list[dict]:
    """ToolCalls as a message's `tool_calls`."""
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def sse(obj: dict | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` ends a stream)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
