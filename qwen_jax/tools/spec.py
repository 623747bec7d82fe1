"""Tool declarations and tool calls, shared by the ReAct and Hermes formats, the server and the
agent.

A `ToolSpec` is one function the model may call: its name, what it is for, and its arguments
as a JSON Schema object. It converts to and from the OpenAI `tools=[...]` entry and to the
parameter list Qwen's ReAct prompt shows (spec §6, [REACT]):

    [{"name": "query", "description": "...", "required": true, "schema": {"type": "string"}}]

A `ToolCall` is one call the model made, with its arguments as JSON text (what OpenAI's
`tool_calls[i].function.arguments` carries).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets

# OpenAI's rule for function names; it also keeps names safe inside the ReAct prompt's
# comma-separated `[{tool_names}]` list and on one `Action:` line.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_EMPTY_OBJECT = {"type": "object", "properties": {}}


ARGS_FORMATS = {
    "json": "Format the arguments as a JSON object.",
    "code": "Enclose the code within triple backticks (`) at the beginning and end of the code.",
}


class ToolSpecError(ValueError):
    """A tool declaration that is not a valid OpenAI function tool (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One tool. `parameters` is a JSON Schema of type object (its `properties` are the
    arguments, `required` lists the mandatory ones)."""

    name: str  # name_for_model
    description: str  # description_for_model
    parameters: dict
    name_for_human: str | None = None  # defaults to name
    # How the ReAct prompt asks for the arguments (Qwen's `args_format`): "json" ends the tool's
    # description with "Format the arguments as a JSON object.", "code" (the code interpreter)
    # with "Enclose the code within triple backticks (`) at the beginning and end of the code."
    args_format: str = "json"

    def __post_init__(self):
        _check_name(self.name)
        _check_parameters(self.name, self.parameters)
        if self.args_format not in ARGS_FORMATS:
            raise ToolSpecError(
                f"tool {self.name!r}: args_format must be one of {sorted(ARGS_FORMATS)}, "
                f"got {self.args_format!r}"
            )

    @property
    def human_name(self) -> str:
        return self.name_for_human or self.name

    def openai(self) -> dict:
        """The OpenAI `tools` entry: {"type": "function", "function": {...}}."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    @classmethod
    def from_openai(cls, tool: dict) -> ToolSpec:
        """Read an OpenAI `tools` entry; ToolSpecError (a ValueError) names what is wrong."""
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolSpecError('a tool must be an object with "type": "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ToolSpecError('a tool needs a "function" object')
        name = fn.get("name")
        _check_name(name)
        description = fn.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise ToolSpecError(f"tool {name}: description must be a string")
        parameters = fn.get("parameters")
        parameters = dict(_EMPTY_OBJECT) if parameters is None else parameters
        return cls(name=name, description=description, parameters=parameters)

    def qwen_parameters(self) -> list[dict]:
        """The spec's ReAct parameter list: one {name, description, required, schema} per
        property, in declaration order; `schema` is the property's schema less its
        description (which moved up a level)."""
        required = set(self.parameters.get("required", ()))
        out = []
        for pname, prop in self.parameters.get("properties", {}).items():
            prop = prop if isinstance(prop, dict) else {}
            out.append(
                {
                    "name": pname,
                    "description": prop.get("description", ""),
                    "required": pname in required,
                    "schema": {k: v for k, v in prop.items() if k != "description"},
                }
            )
        return out


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call the model made. `arguments` is JSON text of an object."""

    id: str  # "call_<hex>"
    name: str
    arguments: str

    @classmethod
    def new(cls, name: str, arguments: dict) -> ToolCall:
        """A call with a fresh id; `arguments` is serialized as compact-ish JSON (non-ASCII
        kept as is, like Qwen's own API)."""
        return cls(new_call_id(), name, json.dumps(arguments, ensure_ascii=False, allow_nan=False))

    def openai(self) -> dict:
        """The OpenAI `tool_calls` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def tools_from_openai(tools: list | None) -> list[ToolSpec] | None:
    """Parse an OpenAI `tools` list (None or [] -> None); ToolSpecError names the bad entry."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ToolSpecError("tools must be a list")
    specs = []
    for i, tool in enumerate(tools):
        try:
            specs.append(ToolSpec.from_openai(tool))
        except ToolSpecError as e:
            raise ToolSpecError(f"tools[{i}]: {e}") from None
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ToolSpecError(f"tools: duplicate function name(s) {', '.join(dup)}")
    return specs or None


def _check_name(name) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolSpecError(
            f"tool name {name!r} is invalid (1-64 characters of a-z, A-Z, 0-9, _ and -)"
        )


def _check_parameters(name: str, parameters) -> None:
    """`parameters` must be a valid JSON Schema (Draft 2020-12) describing an object."""
    import jsonschema  # the serving extra; imported here so `import qwen_jax.tools` stays light

    if not isinstance(parameters, dict):
        raise ToolSpecError(f"tool {name}: parameters must be a JSON Schema object")
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise ToolSpecError(
            f"tool {name}: parameters is not a valid JSON Schema at {where}: "
            f"{_first_line(e.message)}"
        ) from None
    if parameters.get("type", "object") != "object":
        raise ToolSpecError(f'tool {name}: parameters must have "type": "object"')
    props = parameters.get("properties", {})
    if not isinstance(props, dict):
        raise ToolSpecError(f"tool {name}: parameters.properties must be an object")


def _first_line(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
