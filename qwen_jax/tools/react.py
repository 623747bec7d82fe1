"""Qwen's ReAct tool-use format (spec §6, [REACT]): the prompt, the stop words, the parser.

The instruction goes in the user turn; the model answers in the assistant turn with

    Thought: ...
    Action: <tool name>
    Action Input: <JSON object>

and stops at `Observation:` (STOP_WORDS). The caller runs the tool, appends
`\\nObservation: {result}` to the same assistant turn and lets the model continue, until it
writes `Thought: I now know the final answer` / `Final Answer: ...`.

The parser follows Qwen's reference (`parse_latest_plugin_call`): the tool name is the text
between the *last* `\\nAction:` and `\\nAction Input:`, the arguments the text from there to
`\\nObservation:` (re-appended when generation stopped on it and the stop word was cut off),
and arguments are read with json5 (models write single quotes, trailing commas).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from qwen_jax.tools.spec import ARGS_FORMATS, ToolSpec

STOP_WORDS = ("Observation:", "Observation:\n")

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} "
    "Parameters: {parameters} {args_format}"
)

REACT_INSTRUCTION = (
    ("Answer the following questions as best you can. You have access to the following tools:")
    + """

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
)

_THOUGHT, _ACTION, _INPUT, _OBS, _FINAL = (
    "\nThought:",
    "\nAction:",
    "\nAction Input:",
    "\nObservation:",
    "\nFinal Answer:",
)


def tool_description(tool: ToolSpec) -> str:
    """One tool's TOOL_DESC line; `{parameters}` is json.dumps of the Qwen parameter list with
    non-ASCII kept (ensure_ascii=False), as Qwen's reference prompt builder does; the last
    sentence follows the tool's args_format (JSON object, or a code block for the code
    interpreter, as Qwen's code-interpreter prompt has it)."""
    return TOOL_DESC.format(
        name_for_model=tool.name,
        name_for_human=tool.human_name,
        description_for_model=tool.description,
        parameters=json.dumps(tool.qwen_parameters(), ensure_ascii=False),
        args_format=ARGS_FORMATS[tool.args_format],
    )


def react_instruction(tools: Sequence[ToolSpec]) -> str:
    """The instruction from "Answer the following questions" to "Begin!" (descriptions joined
    by a blank line, names by "," with no space)."""
    if not tools:
        raise ValueError("the ReAct instruction needs at least one tool")
    return REACT_INSTRUCTION.format(
        tool_descs="\n\n".join(tool_description(t) for t in tools),
        tool_names=",".join(t.name for t in tools),
    )


def react_query(tools: Sequence[ToolSpec], query: str) -> str:
    """The user turn of a tool-using conversation: instruction, blank line, `Question: query`."""
    return f"{react_instruction(tools)}\n\nQuestion: {query}"


def format_step(thought: str | None, action: str, action_input: str) -> str:
    """An assistant step as the model writes it (no trailing newline; the observation, when it
    comes, starts with one)."""
    thought = (thought or "").strip()
    if thought.startswith("Thought:"):  # a client that kept the prefix in its content
        thought = thought[len("Thought:") :].lstrip()
    return f"Thought: {thought}\nAction: {action}\nAction Input: {action_input}"


def format_observation(result: str) -> str:
    """What follows a step once its tool has run: `\\nObservation: {result}`."""
    return f"{_OBS} {result}"


@dataclasses.dataclass(frozen=True)
class ReactStep:
    """One parsed model reply; fields are raw text (stripped), None where absent.

    Both `action` and `final_answer` can be set when a reply ran past a stop word; consumers
    give the action precedence, as Qwen's API does.
    """

    thought: str | None
    action: str | None
    action_input: str | None
    final_answer: str | None


def parse_react(text: str) -> ReactStep:
    """Parse a model reply (the text after the prompt). See the module docstring for the rule;
    a reply with neither an action nor a final answer gives both None."""
    t = "\n" + text  # so a reply that starts with "Action:" matches "\nAction:" too
    i, j, k = t.rfind(_ACTION), t.rfind(_INPUT), t.rfind(_OBS)
    action = action_input = None
    if 0 <= i < j:
        if k < j:  # generation stopped on "Observation:" and the stop word was cut off
            t = t.rstrip() + _OBS
            k = t.rfind(_OBS)
        action = t[i + len(_ACTION) : j].strip()
        action_input = t[j + len(_INPUT) : k].strip()
    f = t.rfind(_FINAL)
    final_answer = t[f + len(_FINAL) :].strip() if f >= 0 else None
    # The thought is the last one before what the step did (action, else final answer).
    anchor = i if action is not None else (f if f >= 0 else len(t))
    h = t.rfind(_THOUGHT, 0, anchor)
    thought = t[h + len(_THOUGHT) : anchor].strip() if h >= 0 else None
    return ReactStep(thought, action or None, action_input, final_answer)


def arguments_json(action_input: str) -> str:
    """An `Action Input` read with json5 and written back as JSON text; ValueError (one line)
    unless it is a JSON object."""
    import json5  # the serving extra; imported here so `import qwen_jax.tools` stays light

    try:
        value = json5.loads(action_input.strip())
    except Exception as e:  # json5 raises ValueError, but odd input can raise others
        raise ValueError(f"Action Input is not valid JSON: {_first_line(str(e))}") from None
    if not isinstance(value, dict):
        raise ValueError(f"Action Input must be a JSON object, got {type(value).__name__}")
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("Action Input has NaN or Infinity, which JSON cannot carry") from None


def _first_line(text: str, limit: int = 200) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
