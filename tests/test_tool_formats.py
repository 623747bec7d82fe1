"""Tool declarations, Qwen's ReAct prompt and parser (spec §6), and the Qwen2.5 `<tool_call>`
parser.

The expected ReAct prompt below is the spec's template with the two tools of Qwen's own
walkthrough (examples/react_prompt.md) filled in by hand, character for character: it is not
built with the renderer under test.
"""

import json

import pytest

from qwen_jax.tools import hermes, react
from qwen_jax.tools.spec import ToolCall, ToolSpec, ToolSpecError, tools_from_openai

SEARCH = ToolSpec(
    name="quark_search",
    name_for_human="夸克搜索",
    description="夸克搜索是一个通用搜索引擎，可用于访问互联网、查询百科知识、了解时事新闻等。",
    parameters={
        "type": "object",
        "properties": {"search_query": {"type": "string", "description": "搜索关键词或短语"}},
        "required": ["search_query"],
    },
)
IMAGE = ToolSpec(
    name="image_gen",
    name_for_human="通义万相",
    description="通义万相是一个AI绘画（图像生成）服务，输入文本描述，返回根据文本作画得到的图片的URL",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "中文关键词，描述了希望图像具有什么内容"},
            "n": {"type": "integer", "minimum": 1},
        },
        "required": ["query"],
    },
)

EXPECTED_PROMPT = (
    "Answer the following questions as best you can. You have access to the following tools:\n"
    "\n"
    "quark_search: Call this tool to interact with the 夸克搜索 API. What is the 夸克搜索 API "
    "useful for? 夸克搜索是一个通用搜索引擎，可用于访问互联网、查询百科知识、了解时事新闻等。 "
    'Parameters: [{"name": "search_query", "description": "搜索关键词或短语", "required": true, '
    '"schema": {"type": "string"}}] Format the arguments as a JSON object.\n'
    "\n"
    "image_gen: Call this tool to interact with the 通义万相 API. What is the 通义万相 API useful "
    "for? 通义万相是一个AI绘画（图像生成）服务，输入文本描述，返回根据文本作画得到的图片的URL "
    'Parameters: [{"name": "query", "description": "中文关键词，描述了希望图像具有什么内容", '
    '"required": true, "schema": {"type": "string"}}, {"name": "n", "description": "", '
    '"required": false, "schema": {"type": "integer", "minimum": 1}}] Format the arguments as a '
    "JSON object.\n"
    "\n"
    "Use the following format:\n"
    "\n"
    "Question: the input question you must answer\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of [quark_search,image_gen]\n"
    "Action Input: the input to the action\n"
    "Observation: the result of the action\n"
    "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
    "Thought: I now know the final answer\n"
    "Final Answer: the final answer to the original input question\n"
    "\n"
    "Begin!\n"
    "\n"
    "Question: 我是老板，我说啥你做啥。现在给我画个五彩斑斓的黑。"
)


def test_react_prompt_two_tools_matches_the_spec_exactly():
    got = react.react_query([SEARCH, IMAGE], "我是老板，我说啥你做啥。现在给我画个五彩斑斓的黑。")
    assert got == EXPECTED_PROMPT


def test_tool_description_defaults_the_human_name_and_keeps_non_ascii():
    tool = ToolSpec.from_openai(SEARCH.openai())  # OpenAI tools carry no name_for_human
    assert tool.name_for_human is None
    desc = react.tool_description(tool)
    assert desc.startswith(
        "quark_search: Call this tool to interact with the quark_search API. "
        "What is the quark_search API useful for? 夸克搜索是"
    )
    assert '"搜索关键词或短语"' in desc  # ensure_ascii=False, as the spec says
    with pytest.raises(ValueError, match="at least one tool"):
        react.react_instruction([])


# ------------------------------------------------------------------------------ the parser


def test_parser_takes_the_last_action():
    text = (
        'Thought: first I search\nAction: quark_search\nAction Input: {"search_query": "a"}\n'
        "Observation: made up\nThought: now draw\nAction: image_gen\n"
        "Action Input: {'query': '黑', n: 2,}\nObservation:"
    )
    step = react.parse_react(text)
    assert (step.thought, step.action) == ("now draw", "image_gen")
    assert step.action_input == "{'query': '黑', n: 2,}"
    # json5 reads what models write (single quotes, bare keys, trailing commas); out comes JSON.
    assert json.loads(react.arguments_json(step.action_input)) == {"query": "黑", "n": 2}


def test_parser_restores_an_eaten_stop_word():
    # Generation stopped on "Observation:" and the stop string was cut from the text.
    eaten = react.parse_react('Thought: t\nAction: quark_search\nAction Input: {"q": 1}\n  ')
    kept = react.parse_react(
        'Thought: t\nAction: quark_search\nAction Input: {"q": 1}\nObservation:'
    )
    assert eaten == kept
    assert (eaten.action, eaten.action_input) == ("quark_search", '{"q": 1}')
    # A reply that starts with the action (no thought) still parses.
    bare = react.parse_react('Action: image_gen\nAction Input: {"query": "x"}')
    assert (bare.thought, bare.action) == (None, "image_gen")


def test_parser_final_answer_and_no_action():
    step = react.parse_react("Thought: I now know the final answer\nFinal Answer: 42 is it.\n")
    assert step == react.ReactStep("I now know the final answer", None, None, "42 is it.")
    none = react.parse_react("I think the answer is 42.")
    assert none == react.ReactStep(None, None, None, None)
    # "Action:" without "Action Input:" is not an action.
    assert react.parse_react("Thought: x\nAction: quark_search\n").action is None


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{'query': ", "not valid JSON"),
        ("search for cats", "not valid JSON"),
        ('["a", "b"]', "must be a JSON object, got list"),
        ("{x: Infinity}", "NaN or Infinity"),
    ],
)
def test_malformed_arguments_are_a_one_line_error(bad, msg):
    with pytest.raises(ValueError, match=msg) as e:
        react.arguments_json(bad)
    assert "\n" not in str(e.value)


def test_format_step_and_observation_round_trip_through_the_parser():
    text = react.format_step("Thought: look it up", "quark_search", '{"search_query": "x"}')
    assert text == 'Thought: look it up\nAction: quark_search\nAction Input: {"search_query": "x"}'
    text += react.format_observation("found")
    assert text.endswith("\nObservation: found")
    step = react.parse_react(text)
    assert (step.thought, step.action, step.action_input) == (
        "look it up",
        "quark_search",
        '{"search_query": "x"}',
    )


# ------------------------------------------------------------------------------ Hermes


def test_hermes_tagged_calls_and_surrounding_content():
    text = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "quark_search", "arguments": {"search_query": "巴黎"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "image_gen", "arguments": "{\\"query\\": \\"x\\"}"}\n</tool_call>'
    )
    content, calls = hermes.parse_tool_calls(text)
    assert content == "Let me check both."
    assert [c.name for c in calls] == ["quark_search", "image_gen"]
    assert [json.loads(c.arguments) for c in calls] == [{"search_query": "巴黎"}, {"query": "x"}]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_hermes_bare_json_unclosed_block_and_plain_text():
    content, calls = hermes.parse_tool_calls(' {"name": "f", "arguments": {"a": [1, 2]}} ')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"a": [1, 2]})
    ]
    # Generation stopped before </tool_call>: the block runs to the end.
    content, calls = hermes.parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n')
    assert content is None and calls[0].arguments == "{}"
    assert hermes.parse_tool_calls("Just an answer {not json}") == ("Just an answer {not json}", [])
    assert hermes.parse_tool_calls('{"answer": 1}') == ('{"answer": 1}', [])
    assert hermes.parse_tool_calls("  ") == (None, [])


@pytest.mark.parametrize(
    "block",
    [
        '{"name": "f", "arguments": {"a": 1}',  # truncated JSON
        '{"arguments": {"a": 1}}',  # no name
        '{"name": "f", "arguments": [1]}',  # arguments not an object
        '{"name": "f", "arguments": {"a": NaN}}',  # not representable as strict JSON
    ],
)
def test_hermes_broken_call_returns_everything_as_content(block):
    good = '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    assert [c.name for c in hermes.parse_tool_calls(f"ok {good}")[1]] == ["g"]
    text = f"ok {good}<tool_call>{block}</tool_call>"
    assert hermes.parse_tool_calls(text) == (text, [])


def test_hermes_renderers_write_the_format_the_parser_reads():
    call = ToolCall("call_1", "image_gen", '{"query": "黑"}')
    text = "Sure.\n" + hermes.format_tool_call(call)
    assert hermes.format_tool_call(call) == (
        '<tool_call>\n{"name": "image_gen", "arguments": {"query": "黑"}}\n</tool_call>'
    )
    content, calls = hermes.parse_tool_calls(text)
    assert content == "Sure." and (calls[0].name, calls[0].arguments) == (
        "image_gen",
        call.arguments,
    )
    assert hermes.format_tool_response("r") == "<tool_response>\nr\n</tool_response>"


# ------------------------------------------------------------------------------ ToolSpec


def test_toolspec_openai_round_trip_and_qwen_parameters():
    assert ToolSpec.from_openai(IMAGE.openai()) == dataclass_replace_human(IMAGE)
    assert IMAGE.qwen_parameters() == [
        {
            "name": "query",
            "description": "中文关键词，描述了希望图像具有什么内容",
            "required": True,
            "schema": {"type": "string"},
        },
        {
            "name": "n",
            "description": "",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
        },
    ]
    bare = ToolSpec.from_openai({"type": "function", "function": {"name": "now"}})
    assert (bare.description, bare.parameters, bare.qwen_parameters()) == (
        "",
        {"type": "object", "properties": {}},
        [],
    )
    assert tools_from_openai(None) is None and tools_from_openai([]) is None


def dataclass_replace_human(tool):
    import dataclasses

    return dataclasses.replace(tool, name_for_human=None)


@pytest.mark.parametrize(
    "tool, msg",
    [
        (
            {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}},
            "not a valid JSON Schema at type",
        ),
        (
            {"type": "function", "function": {"name": "f", "parameters": {"required": "x"}}},
            "not a valid JSON Schema at required",
        ),
        (
            {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
            '"type": "object"',
        ),
        (
            {"type": "function", "function": {"name": "f", "parameters": []}},
            "must be a JSON Schema object",
        ),
        ({"type": "function", "function": {"name": "bad name"}}, "tool name 'bad name' is invalid"),
        ({"type": "function", "function": {"name": "f", "description": 3}}, "must be a string"),
        ({"type": "code_interpreter"}, '"type": "function"'),
        ({"type": "function"}, 'needs a "function" object'),
    ],
)
def test_bad_tool_schema_is_a_one_line_value_error(tool, msg):
    with pytest.raises(ValueError, match=msg) as e:
        tools_from_openai([tool])
    assert str(e.value).startswith("tools[0]: ") and "\n" not in str(e.value)
    assert isinstance(e.value, ToolSpecError)


def test_duplicate_tool_names_are_refused():
    with pytest.raises(ToolSpecError, match="duplicate function name"):
        tools_from_openai([SEARCH.openai(), SEARCH.openai()])
