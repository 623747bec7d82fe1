"""Chat templates: OpenAI messages (+ tools) -> prompt ids, and a reply -> content + tool calls.

Two implementations, chosen per checkpoint by `template_for`:

- "chatml-react" (Qwen v1): ChatML (spec §5.1) with tools as the spec's ReAct prompt, mapped
  the way Qwen's own OpenAI-style API maps function calling (spec §6, [API]):
    * the ReAct instruction is prefixed to the last user message: `{instruction}\\n\\nQuestion:
      {msg}`;
    * an assistant message with tool_calls becomes `Thought: {content}\\nAction: {name}\\nAction
      Input: {arguments}`, and each tool result is appended to the same assistant turn as
      `\\nObservation: {content}`; a conversation that ends with tool results leaves that turn
      open, so the model continues it with its next `Thought:`;
    * a plain assistant answer while tools are on becomes `Thought: I now know the final
      answer.\\nFinal Answer: {content}`;
    * generation stops at `Observation:`, and `Action`/`Action Input` parse back into a call.
  Content is tokenized with specials disabled, as everywhere in ChatML.
- "hf-jinja" (Qwen1.5/2/2.5 and others): the checkpoint's own Jinja chat template, rendered as
  transformers renders it (ImmutableSandboxedEnvironment, trim_blocks + lstrip_blocks,
  `raise_exception`, JSON-faithful `tojson`, messages/tools/add_generation_prompt and the
  special-token names); replies parsed with the `<tool_call>` format (tools/hermes.py).
  Special tokens the template writes are tokens; special-token text inside user-supplied
  strings (contents, tool schemas) is encoded as plain text (transformers'
  `sanitize_control_tokens=True`), so a user cannot forge a turn boundary.

Messages reach a template validated by the HTTP layer (roles system/user/assistant/tool,
content a string or a list of text parts); what is still wrong raises TemplateError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

from qwen_jax.tokenizer import chatml
from qwen_jax.tokenizer.base import ENDOFTEXT, IM_END, IM_START
from qwen_jax.tools import hermes, react
from qwen_jax.tools.spec import ToolCall, ToolSpec, new_call_id


class TemplateError(ValueError):
    """Messages, tools or tool_choice a template cannot render (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    content: str | None
    tool_calls: tuple[ToolCall, ...]


def content_text(content: Any) -> str:
    """A message's `content` as text: a string as is, None as "", text parts joined by "\\n"."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise TemplateError('content parts must be {"type": "text", "text": ...}')
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise TemplateError("message content must be a string or a list of text parts")


def effective_tools(tools: list[ToolSpec] | None, tool_choice: Any) -> list[ToolSpec] | None:
    """The tools a request actually offers the model: none for tool_choice "none", just the
    named one for {"type": "function", "function": {"name": ...}}, all of them for "auto" /
    "required" / None. ("required" cannot be enforced without constrained decoding; the
    model is offered the tools as for "auto".) Pass the result to stop_strings and parse."""
    if tool_choice in (None, "auto", "required"):
        if tool_choice == "required" and not tools:
            raise TemplateError('tool_choice "required" needs tools')
        return tools or None
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools or () if t.name == name]
        if not chosen:
            raise TemplateError(f"tool_choice names function {name!r}, which is not in tools")
        return chosen
    raise TemplateError(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
        '{"name": ...}}'
    )


class ChatTemplate:
    """What the server and the agent use to talk to a checkpoint; see the module docstring."""

    name: str

    def prompt_ids(
        self, tokenizer, messages: list[dict], tools: list[ToolSpec] | None, tool_choice=None
    ) -> list[int]:
        """Prompt ids ending where the model's reply starts (after the assistant header)."""
        raise NotImplementedError

    def render(self, messages: list[dict], tools: list[ToolSpec] | None, tool_choice=None) -> str:
        """The prompt as text (what prompt_ids tokenizes; for logs and tests)."""
        raise NotImplementedError

    def stop_strings(self, tools: list[ToolSpec] | None) -> tuple[str, ...]:
        return ()

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """<|im_end|>, <|im_start|> and <|endoftext|>, those the tokenizer has."""
        ids = (tokenizer.special_ids.get(t) for t in (IM_END, IM_START, ENDOFTEXT))
        return tuple(dict.fromkeys(i for i in (*ids, tokenizer.eod_id) if i is not None))

    def parse(self, text: str, tools: list[ToolSpec] | None) -> ParsedReply:
        raise NotImplementedError


# --------------------------------------------------------------------------- chatml-react


class ChatMLReact(ChatTemplate):
    """Qwen v1: ChatML with the ReAct function-calling mapping (module docstring)."""

    name = "chatml-react"

    def __init__(self, system: str = chatml.DEFAULT_SYSTEM):
        self.default_system = system

    def prompt_ids(self, tokenizer, messages, tools, tool_choice=None) -> list[int]:
        system, turns, open_turn = self._turns(messages, effective_tools(tools, tool_choice))
        ids = chatml.turn_tokens(tokenizer, "system", system)[0]
        for role, text in turns:
            ids += chatml.turn_tokens(tokenizer, role, text)[0]
        ids += chatml.assistant_header(tokenizer)
        if open_turn is not None:
            ids += tokenizer.encode(open_turn, allowed_special=set())
        return ids

    def render(self, messages, tools, tool_choice=None) -> str:
        system, turns, open_turn = self._turns(messages, effective_tools(tools, tool_choice))
        text = "".join(
            f"{IM_START}{role}\n{body}{IM_END}\n" for role, body in [("system", system), *turns]
        )
        return f"{text}{IM_START}assistant\n{open_turn or ''}"

    def stop_strings(self, tools) -> tuple[str, ...]:
        return react.STOP_WORDS if tools else ()

    def parse(self, text: str, tools) -> ParsedReply:
        """With tools: an Action becomes a tool call (content: its Thought), a Final Answer
        the content; anything else is returned as it is. Without tools: the text as is."""
        if not tools:
            return ParsedReply(text, ())
        step = react.parse_react(text)
        if step.action:
            arguments = _react_arguments(step, tools)
            if arguments is not None:
                call = ToolCall(new_call_id(), step.action, arguments)
                return ParsedReply(step.thought or None, (call,))
            return ParsedReply(text, ())  # unreadable arguments: show the client the text
        if step.final_answer is not None:
            return ParsedReply(step.final_answer, ())
        return ParsedReply(text, ())

    def _turns(self, messages, tools) -> tuple[str, list[tuple[str, str]], str | None]:
        """(system, complete (role, text) turns, text of the open assistant turn or None)."""
        msgs = list(messages)
        system = self.default_system
        if msgs and msgs[0].get("role") == "system":
            system, msgs = content_text(msgs[0].get("content")), msgs[1:]
        last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
        turns: list[list[str]] = []
        i = 0
        while i < len(msgs):
            m, role = msgs[i], msgs[i].get("role")
            after_tool = i > 0 and msgs[i - 1].get("role") == "tool"
            i += 1
            if role in ("system", "user"):
                text = content_text(m.get("content"))
                if role == "user" and tools and i - 1 == last_user:
                    text = react.react_query(tools, text)
                turns.append([role, text])
            elif role == "assistant":
                results = []
                while m.get("tool_calls") and i < len(msgs) and msgs[i].get("role") == "tool":
                    results.append(msgs[i])
                    i += 1
                text = _assistant_react_text(m, results, tools)
                if after_tool and turns and turns[-1][0] == "assistant":
                    turns[-1][1] += "\n" + text  # the same ReAct turn, after an observation
                else:
                    turns.append(["assistant", text])
            elif role == "tool":
                raise TemplateError(
                    "a tool message must follow an assistant message with tool_calls"
                )
            else:
                raise TemplateError(f"unknown message role {role!r}")
        open_turn = None
        if msgs and msgs[-1].get("role") == "tool":  # the model continues after the observation
            open_turn = turns.pop()[1]
        return system, [(r, t) for r, t in turns], open_turn


def _assistant_react_text(message: dict, results: list[dict], tools) -> str:
    """One assistant message (and the tool results that answer its calls) as ReAct text."""
    content = content_text(message.get("content")).strip()
    calls = message.get("tool_calls") or []
    if not calls:
        if tools and not content.startswith("Thought:"):
            return f"Thought: I now know the final answer.\nFinal Answer: {content}"
        return content
    by_id = {r.get("tool_call_id"): r for r in results if r.get("tool_call_id")}
    unmatched = [r for r in results if r.get("tool_call_id") not in _call_ids(calls)]
    steps = []
    for n, call in enumerate(calls):
        fn = call.get("function") or {}
        if not isinstance(fn.get("name"), str):
            raise TemplateError("an assistant tool_call needs function.name")
        args = fn.get("arguments", "{}")
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        step = react.format_step(content if n == 0 else None, fn["name"], args)
        result = by_id.get(call.get("id")) or (unmatched.pop(0) if unmatched else None)
        if result is not None:
            step += react.format_observation(content_text(result.get("content")))
        steps.append(step)
    if unmatched:
        raise TemplateError("a tool message answers none of the preceding tool_calls")
    return "\n".join(steps)


def _call_ids(calls) -> set:
    return {c.get("id") for c in calls if c.get("id")}


def _react_arguments(step: react.ReactStep, tools) -> str | None:
    """JSON arguments of a ReAct action: its Action Input read with json5; failing that, for a
    tool with a single string parameter (the code interpreter's `code`, which the model writes
    as a fenced block, not JSON), the raw input as that parameter. None if neither works."""
    try:
        return react.arguments_json(step.action_input or "")
    except ValueError:
        pass
    tool = next((t for t in tools if t.name == step.action), None)
    props = tool.parameters.get("properties", {}) if tool else {}
    if len(props) == 1:
        ((pname, schema),) = props.items()
        if isinstance(schema, dict) and schema.get("type") == "string":
            return json.dumps({pname: step.action_input}, ensure_ascii=False)
    return None


# ------------------------------------------------------------------------------- hf-jinja

# Private-use markers around special-token text in user strings (as transformers marks them):
# what lies between them is encoded as plain text.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


class HFJinja(ChatTemplate):
    """A checkpoint's Jinja chat template, rendered as transformers renders it."""

    name = "hf-jinja"

    def __init__(self, source: str | list, special_tokens: dict[str, Any] | None = None):
        """`source`: the `chat_template` value (a string, or transformers' list of
        {"name", "template"}); `special_tokens`: bos_token, eos_token, ... as the template sees
        them."""
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            if not all(isinstance(v, str) for v in named.values()) or not named:
                raise TemplateError("chat_template list entries need a name and a template")
            self._sources = named
        elif isinstance(source, str):
            self._sources = {"default": source}
        else:
            raise TemplateError("chat_template must be a string or a list of named templates")
        self.special_tokens = dict(special_tokens or {})
        for s in self._sources.values():
            _compile(s)  # a broken template fails at load, not on the first request

    def source(self, tools) -> str:
        """transformers' choice: "tool_use" when tools are given and it exists, else
        "default" (or the only template)."""
        if tools and "tool_use" in self._sources:
            return self._sources["tool_use"]
        if "default" in self._sources:
            return self._sources["default"]
        if len(self._sources) == 1:
            return next(iter(self._sources.values()))
        raise TemplateError(f"no default chat template among {sorted(self._sources)}")

    def render(self, messages, tools, tool_choice=None, *, add_generation_prompt=True) -> str:
        return self._render(messages, effective_tools(tools, tool_choice), add_generation_prompt)

    def prompt_ids(self, tokenizer, messages, tools, tool_choice=None) -> list[int]:
        tools = effective_tools(tools, tool_choice)
        token_re, marked_re = _marker(tuple(tokenizer.special_ids))
        pieces = marked_re.split(self._render(messages, tools, True, mark=token_re))
        # pieces: text, marked token (or None for a lone marker), text, ...
        ids: list[int] = []
        for n, piece in enumerate(pieces):
            if piece:
                ids += tokenizer.encode(piece, allowed_special=set() if n % 2 else "all")
        return ids

    def parse(self, text: str, tools) -> ParsedReply:
        if not tools:
            return ParsedReply(text, ())
        content, calls = hermes.parse_tool_calls(text)
        return ParsedReply(content, tuple(calls))

    def _render(self, messages, tools, add_generation_prompt, mark=None) -> str:
        import jinja2

        chat = [_template_message(m) for m in messages]
        schemas = [t.openai() for t in tools] if tools else None
        if mark is not None:
            chat, schemas = _mark(chat, mark), _mark(schemas, mark)
        try:
            return _compile(self.source(tools)).render(
                messages=chat,
                tools=schemas,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template: {e.message or type(e).__name__}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # A template doing string operations on input it did not expect (a list, a number).
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _template_message(message: dict) -> dict:
    """A message as chat templates expect it: None-valued keys dropped (transformers does
    this), content as text, and tool-call arguments as objects rather than JSON text."""
    out = {k: v for k, v in message.items() if v is not None}
    if "content" in out:
        out["content"] = content_text(out["content"])
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            call = dict(call)
            fn = dict(call.get("function") or {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except ValueError:
                    pass  # not JSON: the template gets the text
            call["function"] = fn
            calls.append(call)
        out["tool_calls"] = calls
    return out


@functools.lru_cache(maxsize=8)
def _marker(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(special-token text, a marked token or a lone marker) patterns for a vocabulary."""
    alts = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) or "(?!)"
    marked = f"{_MARK_START}({alts}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
    return re.compile(alts), re.compile(marked)


def _mark(obj, pattern: re.Pattern):
    """Wrap special-token text in every string value (not dict keys) with the markers; markers
    already in the input are removed first so they cannot be forged."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return pattern.sub(lambda m: f"{_MARK_START}{m.group()}{_MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_mark(v, pattern) for v in obj]
    return obj


def _generation_extension():
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers):
        renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """Compile like transformers: sandboxed, immutable, trim/lstrip blocks, loop controls,
    `raise_exception`, `tojson` that keeps non-ASCII and does not HTML-escape,
    `strftime_now`."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_generation_extension(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template line {e.lineno}: {e.message}") from None


# ------------------------------------------------------------------------------ selection


def find_chat_template(checkpoint: str | Path) -> tuple[str | list, dict] | None:
    """(chat_template, special tokens) of a checkpoint, or None. Looked for in its tokenizer/
    folder (params exports) and the folder itself (HF directories): `chat_template.jinja`
    first (where transformers now saves it), then tokenizer_config.json's "chat_template"."""
    for where in (Path(checkpoint) / "tokenizer", Path(checkpoint)):
        config = _read_config(where / "tokenizer_config.json")
        specials = _special_tokens(config)
        jinja_file = where / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8"), specials
        if config.get("chat_template"):
            return config["chat_template"], specials
    return None


def template_for(
    checkpoint: str | Path, tokenizer=None, override: str | None = None
) -> ChatTemplate:
    """The checkpoint's template: hf-jinja when it ships a chat template, else chatml-react.
    `override`: "chatml" or "hf" (ValueError when "hf" has no template to use)."""
    del tokenizer  # the choice depends on the files only; kept for the interface
    if override not in (None, "chatml", "hf"):
        raise TemplateError(f"unknown template {override!r} (choose chatml or hf)")
    if override == "chatml":
        return ChatMLReact()
    found = find_chat_template(checkpoint)
    if found is not None:
        return HFJinja(*found)
    if override == "hf":
        raise TemplateError(
            f"{checkpoint} has no chat template (no chat_template.jinja, no chat_template in "
            "tokenizer_config.json): use --template chatml"
        )
    return ChatMLReact()


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TemplateError(f"{path} is not readable JSON: {e}") from None
    return config if isinstance(config, dict) else {}


# The named special tokens transformers (v5) passes to every template render.
_NAMED_SPECIALS = tuple(f"{n}_token" for n in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))


def _special_tokens(config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config.json, as text (AddedToken dicts read
    for their content; absent or null ones left out, as transformers leaves them out)."""
    out = {}
    for key in _NAMED_SPECIALS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
