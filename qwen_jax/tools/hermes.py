"""The Qwen2/2.5 native ("Hermes") tool-call format: parse `<tool_call>` blocks out of a reply.

Qwen2.5's chat template lists the tools as JSON inside `<tools></tools>` in the system turn and
asks for each call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

Tool results come back in the user turn as `<tool_response>...</tool_response>`. Rendering is
the checkpoint's own Jinja template (qwen_jax/serve/templates.py); `tools_system_prompt` writes
the same system text for models served without one (the agent's `format="hermes"`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from qwen_jax.tools.spec import ToolCall, ToolSpec

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# A closed block, or an unclosed one running to the end (generation stopped at <|im_end|> or
# ran out of tokens before `</tool_call>`).
_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply.

    content is the text outside the `<tool_call>` blocks, stripped (None when empty). A reply
    that is nothing but one bare JSON object {"name": ..., "arguments": ...} is a call too
    (models often drop the tags). If any block does not hold a valid call, the whole reply is
    returned as content with no calls, so a client sees what the model wrote rather than half
    of it.
    """
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        call = _call_from_json(text.strip()) if text.strip().startswith("{") else None
        if call is not None:
            return None, [call]
        return (text if text.strip() else None), []
    calls = []
    for m in blocks:
        call = _call_from_json(m.group(1).strip())
        if call is None:
            return text, []
        calls.append(call)
    content = _BLOCK.sub("", text).strip()
    return (content or None), calls


def _call_from_json(body: str) -> ToolCall | None:
    """A ToolCall from `{"name": str, "arguments": object | JSON text}`; None if it is not
    one. ("parameters" is accepted for "arguments", as some fine-tunes write it.)"""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments double-encoded as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    try:
        return ToolCall.new(obj["name"], args)
    except ValueError:  # NaN/Infinity cannot be re-serialized as strict JSON
        return None


def tools_system_prompt(tools: Sequence[ToolSpec], system: str | None = None) -> str:
    """The system turn's text Qwen2.5's template writes when tools are given: the system prompt
    (Qwen2.5's default when None), then the tool signatures and the call format."""
    sigs = "".join("\n" + json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    return (
        f"{DEFAULT_SYSTEM if system is None else system}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>{sigs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def format_tool_call(call: ToolCall) -> str:
    """One call as the model writes it (arguments compact, as Qwen2.5's template renders)."""
    args = json.dumps(json.loads(call.arguments), ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{call.name}", "arguments": {args}}}\n</tool_call>'


def format_tool_response(content: str) -> str:
    """One tool result as Qwen2.5's template writes it in the user turn."""
    return f"<tool_response>\n{content}\n</tool_response>"
