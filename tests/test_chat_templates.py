"""Chat templates: the checkpoint's Jinja template rendered as transformers renders it, and Qwen
v1's ChatML with the ReAct function-calling mapping (spec §5.1, §6).

The independent check for "hf-jinja" is transformers itself: a PreTrainedTokenizerFast built
from the same tiny byte-level tokenizer.json, with the Qwen2.5-style template in
tests/data/chat_templates, must give the same text (`apply_chat_template(tokenize=False)`) and
the same ids (`tokenize=True, sanitize_control_tokens=True`) as our renderer.
"""

import json
from pathlib import Path

import pytest

from qwen_jax.serve.templates import (
    ChatMLReact,
    HFJinja,
    ParsedReply,
    TemplateError,
    template_for,
)
from qwen_jax.tokenizer import chatml, load_tokenizer
from qwen_jax.tools import react
from qwen_jax.tools.spec import ToolSpec

TEMPLATE = (Path(__file__).parent / "data/chat_templates/qwen25_style.jinja").read_text()
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED = ("<tool_call>", "</tool_call>")  # non-special added tokens, as in Qwen2.5's vocab

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather für a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "city name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time"}}
TOOLS = [ToolSpec.from_openai(WEATHER), ToolSpec.from_openai(CLOCK)]


def call(id_, name, args: dict) -> dict:
    """An OpenAI tool_calls entry (arguments as JSON text, as clients send them)."""
    fn = {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
    return {"id": id_, "type": "function", "function": fn}


CONVERSATIONS = {
    "plain": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Say <|im_end|> and <tool_call> literally"},
    ],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Paris and 北京?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                call("c1", "get_weather", {"city": "Paris"}),
                call("c2", "get_weather", {"city": "北京", "unit": "c"}),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain <|im_start|>, 12"},
    ],
    "after_answer": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("c9", "now", {})]},
        {"role": "tool", "tool_call_id": "c9", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """A byte-level BPE (one token per byte, no merges) with Qwen's ChatML specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False) for t in ADDED])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def hf_tok(tokenizer_json):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TEMPLATE,
    )


def transformers_messages(messages):
    """The same conversation as transformers documents it: tool-call arguments as dicts."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items()}
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {
                    **c,
                    "function": {
                        **c["function"],
                        "arguments": json.loads(c["function"]["arguments"]),
                    },
                }
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


# ------------------------------------------------------------------------------ hf-jinja


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [False, True])
def test_hf_jinja_matches_transformers_text_and_ids(name, with_tools, tok, hf_tok):
    messages = CONVERSATIONS[name]
    template = HFJinja(TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tools = TOOLS if with_tools else None
    # Tools reach templates in canonical OpenAI form (description and parameters always
    # present: OpenAI reads a missing `parameters` as an empty object).
    hf_tools = [t.openai() for t in TOOLS] if with_tools else None
    assert not with_tools or hf_tools[0] == WEATHER
    hf_msgs = transformers_messages(messages)
    expected = hf_tok.apply_chat_template(
        hf_msgs, tools=hf_tools, add_generation_prompt=True, tokenize=False
    )
    text = template.render(messages, tools)
    assert text == expected
    assert text.endswith("<|im_start|>assistant\n")
    assert ("# Tools" in text) == with_tools
    expected_ids = hf_tok.apply_chat_template(
        hf_msgs,
        tools=hf_tools,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    ids = template.prompt_ids(tok, messages, tools)
    assert ids == expected_ids
    # Special-token text typed by users stays text: the template's own turns are the only
    # <|im_start|> tokens.
    assert ids.count(tok.im_start_id) == text.count("<|im_start|>") - _typed(
        messages, "<|im_start|>"
    )
    assert ids.count(tok.im_end_id) == text.count("<|im_end|>") - _typed(messages, "<|im_end|>")


# Block tags on their own indented lines: only trim_blocks + lstrip_blocks (as transformers
# sets them) make this render as ChatML.
NO_DASH_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def test_hf_jinja_whitespace_control_matches_transformers(hf_tok):
    messages = CONVERSATIONS["plain"][1:]
    text = HFJinja(NO_DASH_TEMPLATE).render(messages, None)
    assert text == chatml.render(messages, add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(
        messages, chat_template=NO_DASH_TEMPLATE, add_generation_prompt=True, tokenize=False
    )


def _typed(messages, token: str) -> int:
    return sum(str(m.get("content")).count(token) for m in messages)


def test_hf_jinja_parse_stops_and_tool_choice(tok):
    template = HFJinja(TEMPLATE)
    reply = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    parsed = template.parse(reply, TOOLS)
    assert parsed.content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Rome"})
    ]
    assert template.parse(reply, None) == ParsedReply(reply, ())  # no tools: text as is
    assert template.stop_strings(TOOLS) == ()
    assert set(template.stop_ids(tok)) == {tok.special_ids[t] for t in SPECIALS}
    msgs = CONVERSATIONS["plain"]
    assert template.render(msgs, TOOLS, "none") == template.render(msgs, None)
    only_clock = template.render(msgs, TOOLS, {"type": "function", "function": {"name": "now"}})
    assert '"name": "now"' in only_clock and "get_weather" not in only_clock
    with pytest.raises(ValueError, match="not in tools"):
        template.render(msgs, TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice must be"):
        template.render(msgs, TOOLS, "sometimes")


def test_hf_jinja_errors_are_one_line_value_errors():
    with pytest.raises(TemplateError, match="unknown role: critic"):
        HFJinja(TEMPLATE).render([{"role": "critic", "content": "x"}], None)
    with pytest.raises(TemplateError, match="chat template line 1"):
        HFJinja("{% for m in messages %}")
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"  # the sandbox refuses it
    with pytest.raises(TemplateError, match="chat template"):
        HFJinja(escape).render([{"role": "user", "content": "x"}], None)
    mutate = "{% set _ = messages.append(1) %}x"  # immutable sandbox: no mutation of inputs
    with pytest.raises(TemplateError, match="chat template"):
        HFJinja(mutate).render([{"role": "user", "content": "x"}], None)
    # The helpers transformers gives templates exist here too.
    helpers = (
        "{{ {'a': '<ü>'} | tojson }}{% generation %}g{% endgeneration %}"
        "{{ strftime_now('%Y')|length }}"
    )
    assert HFJinja(helpers).render([], None, add_generation_prompt=False) == '{"a": "<ü>"}g4'


# ------------------------------------------------------------------------------ template_for


def test_template_for_picks_by_checkpoint_files(tmp_path, tok):
    hf_dir, export, bare = tmp_path / "hf", tmp_path / "export", tmp_path / "bare"
    for d in (hf_dir, export / "tokenizer", bare):
        d.mkdir(parents=True)
    config = {"chat_template": TEMPLATE, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (export / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

    for ckpt in (hf_dir, export):
        t = template_for(ckpt, tok)
        assert isinstance(t, HFJinja) and t.name == "hf-jinja"
        assert t.special_tokens == {"eos_token": "<|im_end|>"}
        assert isinstance(template_for(ckpt, tok, "chatml"), ChatMLReact)
    assert template_for(bare, tok).name == "chatml-react"
    assert template_for(tmp_path / "nothing_here", tok).name == "chatml-react"
    with pytest.raises(ValueError, match="has no chat template"):
        template_for(bare, tok, "hf")
    with pytest.raises(ValueError, match="unknown template 'jinja'"):
        template_for(hf_dir, tok, "jinja")

    # transformers' newer layout: chat_template.jinja next to the config wins.
    (bare / "chat_template.jinja").write_text("{{ messages[0].content }}!")
    assert template_for(bare, tok).render([{"role": "user", "content": "hi"}], None) == "hi!"
    # Named templates: "tool_use" when tools are given, "default" otherwise.
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    t = template_for(hf_dir, tok, "hf")
    assert (t.render([], None), t.render([], TOOLS)) == ("D", "T")
    (hf_dir / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not readable JSON"):
        template_for(hf_dir, tok)


# ------------------------------------------------------------------------------ chatml-react


def test_chatml_without_tools_is_plain_chatml(tok):
    template = ChatMLReact()
    msgs = CONVERSATIONS["plain"]
    assert template.render(msgs, None) == chatml.render(msgs, add_generation_prompt=True)
    assert template.prompt_ids(tok, msgs, None) == chatml.build_prompt(tok, msgs)
    assert template.stop_strings(None) == ()
    assert template.stop_ids(tok) == tuple(chatml.stop_ids(tok))
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert template.render(parts, None).endswith(
        "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_react_maps_tool_calls_like_qwens_api(tok):
    template = ChatMLReact()
    instruction = react.react_instruction(TOOLS)  # checked against the spec in test_tool_formats
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{instruction}\n\nQuestion: Weather in Paris and 北京?<|im_end|>\n"
        "<|im_start|>assistant\n"
        'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: sunny, 21\n"
        'Thought: \nAction: get_weather\nAction Input: {"city": "北京", "unit": "c"}\n'
        "Observation: rain <|im_start|>, 12"
    )
    msgs = CONVERSATIONS["tool_round_trip"]
    assert template.render(msgs, TOOLS) == expected
    # Results matched by tool_call_id, whatever order they come in.
    assert template.render([msgs[0], msgs[1], msgs[3], msgs[2]], TOOLS) == expected
    # The open assistant turn: no <|im_end|> after the last observation, and the typed
    # <|im_start|> inside a tool result is text, not a token.
    ids = template.prompt_ids(tok, msgs, TOOLS)
    assert ids[-4:] == tok.encode(", 12", allowed_special=set())
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2
    assert template.stop_strings(TOOLS) == ("Observation:", "Observation:\n")


def test_chatml_react_history_and_final_answer_rewrite(tok):
    template = ChatMLReact()
    instruction = react.react_instruction(TOOLS)
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nTime?<|im_end|>\n"
        "<|im_start|>assistant\nThought: Checking.\nAction: now\nAction Input: {}\n"
        "Observation: 12:00\n"
        "Thought: I now know the final answer.\nFinal Answer: It is noon.<|im_end|>\n"
        f"<|im_start|>user\n{instruction}\n\nQuestion: Thanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATIONS["after_answer"], TOOLS) == expected
    ids = template.prompt_ids(tok, CONVERSATIONS["after_answer"], TOOLS)
    assert tok.decode(ids) == expected
    # tool_choice "none": no instruction, no rewrite into ReAct's final-answer form.
    plain = template.render(CONVERSATIONS["after_answer"], TOOLS, "none")
    assert "Answer the following" not in plain and "It is noon.<|im_end|>" in plain
    with pytest.raises(ValueError, match="must follow an assistant message with tool_calls"):
        template.render([{"role": "tool", "tool_call_id": "x", "content": "r"}], TOOLS)
    extra = {"role": "tool", "tool_call_id": "c7", "content": "r"}
    with pytest.raises(ValueError, match="answers none of the preceding tool_calls"):
        template.render([*CONVERSATIONS["after_answer"][:4], extra], TOOLS)
    with pytest.raises(ValueError, match="unknown message role 'critic'"):
        template.render([{"role": "critic", "content": "r"}], TOOLS)


def test_chatml_react_parse():
    template = ChatMLReact()
    reply = "Thought: need weather\nAction: get_weather\nAction Input: {city: 'Rome',}\n"
    parsed = template.parse(reply, TOOLS)
    assert parsed.content == "need weather"
    (c,) = parsed.tool_calls
    assert (c.name, json.loads(c.arguments)) == ("get_weather", {"city": "Rome"})
    assert c.id.startswith("call_")
    final = "Thought: I now know the final answer\nFinal Answer: Sunny in Rome."
    assert template.parse(final, TOOLS) == ParsedReply("Sunny in Rome.", ())
    assert template.parse("Just chatting.", TOOLS) == ParsedReply("Just chatting.", ())
    assert template.parse(reply, None) == ParsedReply(reply, ())  # no tools: no parsing
    # Arguments that are not JSON: the client sees what the model wrote, not a broken call.
    bad = "Thought: t\nAction: get_weather\nAction Input: Rome please"
    assert template.parse(bad, TOOLS) == ParsedReply(bad, ())
    # ...except for a tool whose one parameter is a string (the code interpreter's fenced code).
    code = ToolSpec(
        "code_interpreter",
        "Runs Python.",
        {"type": "object", "properties": {"code": {"type": "string"}}},
    )
    fenced = "Thought: compute\nAction: code_interpreter\nAction Input: ```py\nprint(2 ** 10)\n```"
    (c,) = template.parse(fenced, [code]).tool_calls
    assert json.loads(c.arguments) == {"code": "```py\nprint(2 ** 10)\n```"}
