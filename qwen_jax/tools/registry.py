"""The tool registry: what the agent may call, argument validation, and calls that never raise.

A tool is a `ToolSpec` (name, description, JSON Schema of its arguments) and a Python callable.
Register a function and its schema is read from the signature (int -> integer, float -> number,
str -> string, bool -> boolean, list -> array, dict -> object; parameters without a default are
required; the docstring's first paragraph is the description), or give the schema (or a whole
ToolSpec) explicitly:

    registry = Registry()

    @registry.register
    def get_weather(city: str, unit: str = "C") -> str:
        "Current weather of a city."

    registry.add(CODE_INTERPRETER, InterpreterTool(interpreter), raw=True, timeout_s=None)

`call(name, arguments, timeout_s)` returns the observation text the model sees next. Everything
that can go wrong becomes that text, as users of OpenAI-style function calling expect the model
to read and correct (never an exception into the agent loop):
    unknown tool          "Error: unknown tool 'x'; available tools: a, b"
    arguments not JSON    "Error: arguments of tool 'x' are not valid JSON (json5): ..."
    schema violation      "Error: argument 'city': 3 is not of type 'string' (tool 'x')"
    missing argument      "Error: argument 'city' is required (tool 'x')"
    the tool raises       "Error: tool 'x' raised ValueError: ..."
    the tool hangs        "Error: tool 'x' timed out after 30 s"
Arguments are read with json5 (spec §6: ReAct action inputs are often not strict JSON). A tool
registered `raw=True` (the code interpreter) receives the argument text unparsed: its input is
code, usually in a fenced block rather than a JSON object.

Timeouts: the call runs in a daemon thread that is abandoned when the time is up (Python threads
cannot be killed). A tool that must really be stopped (user code) runs in its own process: the
code interpreter enforces its own CPU/wall/memory limits in its sandboxed kernel.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import threading
import typing
from collections.abc import Callable
from typing import Any

from qwen_jax.tools.spec import ToolSpec

DEFAULT_TIMEOUT_S = 30.0
_JSON_TYPES = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    list: "array",
    dict: "object",
}


@dataclasses.dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    fn: Callable[..., Any]
    raw: bool = False  # fn(text) with the argument text as written, no JSON parsing
    timeout_s: float | None = DEFAULT_TIMEOUT_S  # None: no limit here (the tool has its own)


class Registry:
    """Named tools and the one way to call them (`call`)."""

    def __init__(self):
        self._tools: dict[str, Tool] = {}

    # --- declaring tools -----------------------------------------------------------------
    def add(
        self,
        spec: ToolSpec,
        fn: Callable[..., Any],
        *,
        raw: bool = False,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ) -> Tool:
        """Register `fn` under `spec`; ValueError if the name is taken."""
        if spec.name in self._tools:
            raise ValueError(f"tool {spec.name!r} is already registered")
        tool = Tool(spec, fn, raw, timeout_s)
        self._tools[spec.name] = tool
        return tool

    def register(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: dict | None = None,
        name_for_human: str | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ):
        """Register a function (also usable as `@registry.register` or
        `@registry.register(name=..., parameters=...)`); returns the function unchanged."""

        def decorate(f: Callable[..., Any]):
            spec = ToolSpec(
                name=name or f.__name__,
                description=description if description is not None else _doc(f),
                parameters=parameters if parameters is not None else schema_from_signature(f),
                name_for_human=name_for_human,
            )
            self.add(spec, f, timeout_s=timeout_s)
            return f

        return decorate if fn is None else decorate(fn)

    @property
    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self._tools.values()]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    # --- calling -------------------------------------------------------------------------
    def call(self, name: str, arguments: str | None, timeout_s: float | None = None) -> str:
        """Run tool `name` on `arguments` (JSON/json5 text of an object; "" or None = {}) and
        return the observation; errors are returned as "Error: ..." text (module docstring).
        `timeout_s` overrides the tool's own limit."""
        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return f"Error: unknown tool {name!r}; available tools: {known}"
        if tool.raw:
            args, kwargs = (arguments or "",), {}
        else:
            parsed = parse_arguments(tool.spec, arguments)
            if isinstance(parsed, str):
                return parsed
            args, kwargs = (), parsed
        limit = tool.timeout_s if timeout_s is None else timeout_s
        return _run(tool, args, kwargs, limit)


def parse_arguments(spec: ToolSpec, arguments: str | None) -> dict | str:
    """The argument object of a call, validated against `spec.parameters`, or the error
    observation (a str starting with "Error:")."""
    import json5
    import jsonschema

    text = (arguments or "").strip() or "{}"
    try:
        value = json5.loads(text)
    except ValueError as e:  # json5 raises ValueError subclasses for every syntax error
        return f"Error: arguments of tool {spec.name!r} are not valid JSON (json5): {e}"
    if not isinstance(value, dict):
        kind = type(value).__name__
        return f"Error: arguments of tool {spec.name!r} must be a JSON object, got {kind}"
    validator = jsonschema.Draft202012Validator(spec.parameters)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return value
    return f"Error: {_describe(error)} (tool {spec.name!r})"


def _describe(error) -> str:
    """One line for a jsonschema error, naming the argument as users know it."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [r for r in error.validator_value if r not in error.instance]
        where = f"{path}." if path else ""
        return f"argument '{where}{missing[0]}' is required"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return f"argument '{extra[0]}' is not a parameter of this tool"
    if not path:
        return f"arguments: {error.message}"
    return f"argument '{path}': {error.message}"


def _run(tool: Tool, args: tuple, kwargs: dict, timeout_s: float | None) -> str:
    """Call the tool (in a daemon thread when it has a time limit); its result as text, or
    the error/timeout text. Without a limit it runs in the caller's thread: the code
    interpreter's kernel is bound to the thread that started it (the sandbox's parent-death
    signal fires when that thread ends), so it must not start in a short-lived thread."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = tool.fn(*args, **kwargs)
        except BaseException as e:  # the observation reports it; the loop must go on
            box["error"] = e

    if timeout_s is None:
        target()
    else:
        thread = threading.Thread(target=target, name=f"tool-{tool.spec.name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            return f"Error: tool {tool.spec.name!r} timed out after {timeout_s:g} s"
    if "error" in box:
        e = box["error"]
        return f"Error: tool {tool.spec.name!r} raised {type(e).__name__}: {e}"
    return as_text(box.get("result"))


def as_text(result: Any) -> str:
    """A tool's return value as observation text: str as is, None as "", else JSON."""
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    return json.dumps(result, ensure_ascii=False, default=str)


def schema_from_signature(fn: Callable[..., Any]) -> dict:
    """JSON Schema of `fn`'s keyword-callable parameters (module docstring's mapping)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to untyped parameters
        hints = {}
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        prop = {}
        kind = _JSON_TYPES.get(typing.get_origin(hints.get(p.name)) or hints.get(p.name))
        if kind:
            prop["type"] = kind
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _doc(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ").strip()


class InterpreterTool:
    """The `code_interpreter` tool over one `CodeInterpreter` (one kernel per conversation).

    Register it raw (`registry.add(CODE_INTERPRETER, tool, raw=True, timeout_s=None)`): the
    input is code in a fenced block, a {"code": ...} object or bare code
    (`interpreter.extract_code`), and the kernel enforces its own limits. Every `CellResult` is
    kept in `cells` (ci_math scores executability and the execution output from them).
    """

    def __init__(self, interpreter):
        self.interpreter = interpreter
        self.cells: list = []

    def __call__(self, code: str) -> str:
        from qwen_jax.tools.interpreter import extract_code

        cell = self.interpreter.run(extract_code(code))
        self.cells.append(cell)
        return cell.observation()


def add_code_interpreter(registry: Registry, interpreter) -> InterpreterTool:
    """Register the report's single `code_interpreter` tool (spec §6) over `interpreter`."""
    from qwen_jax.tools.interpreter import CODE_INTERPRETER

    tool = InterpreterTool(interpreter)
    registry.add(CODE_INTERPRETER, tool, raw=True, timeout_s=None)
    return tool
