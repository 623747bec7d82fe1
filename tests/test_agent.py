"""The tool registry and the agent loop (issue 16 items 2 and 4).

Models here are scripted (fixed outputs), so each test shows what the loop does with a given
reply, not a model's luck: the ReAct text loop end to end with a registry tool and with the
code interpreter (state kept across cells), the step cap and no-action outcomes, the same loop
through our HTTP server (`ServerModel` against `create_app` over a `ScriptedScheduler`), the
`qwen-jax agent` CLI against that server, and the registry's bad cases (each an observation).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time

import pytest

from qwen_jax.cli import main as cli_main
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tools.agent import Agent, LocalModel, ModelError, ServerModel
from qwen_jax.tools.react import react_query
from qwen_jax.tools.registry import Registry, add_code_interpreter, schema_from_signature
from qwen_jax.tools.spec import ToolSpec

WEATHER = ToolSpec(
    "get_weather",
    "Current weather of a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    name_for_human="Weather",
)


class ScriptedText:
    """A text model (the ReAct loop's interface) answering with fixed outputs, recording what
    it was asked."""

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), []

    def complete(self, messages, assistant_prefix, stop, on_text=None):
        self.calls.append((messages, assistant_prefix, tuple(stop)))
        text = self.outputs.pop(0)
        if on_text is not None:
            on_text(text)
        return text


def weather_registry(seen: list):
    registry = Registry()

    def get_weather(city: str, unit: str = "C") -> str:
        seen.append((city, unit))
        return f"sunny, 21 {unit} in {city}"

    registry.add(WEATHER, get_weather)
    return registry


def test_react_loop_end_to_end_with_a_registry_tool():
    seen = []
    step1 = 'Thought: I need the weather.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
    step2 = "Thought: I now know the final answer\nFinal Answer: It is sunny in Paris."
    model = ScriptedText([step1, step2])
    events = []
    result = Agent(model, weather_registry(seen)).run("Weather in Paris?", on_event=events.append)

    assert result.outcome == "answered"
    assert result.final_answer == "It is sunny in Paris."
    assert seen == [("Paris", "C")]
    # The prompt: ChatML system + the spec's ReAct user turn; stop at the spec's stop words.
    messages, prefix, stop = model.calls[0]
    assert messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": react_query([WEATHER], "Weather in Paris?")},
    ]
    assert prefix == "" and stop == ("Observation:", "Observation:\n")
    # The observation is appended to the same assistant turn, after the stripped output.
    assert model.calls[1][1] == step1.rstrip() + "\nObservation: sunny, 21 C in Paris\nThought:"
    assert [s.observations for s in result.steps] == [("sunny, 21 C in Paris",), ()]
    assert json.loads(result.steps[0].calls[0].arguments) == {"city": "Paris"}
    assert [e.kind for e in events] == ["text", "call", "observation", "text", "final"]
    shown = "".join(e.text for e in events)
    assert "Observation: sunny, 21 C in Paris" in shown and "Final Answer: It is sunny" in shown


def test_react_loop_with_the_code_interpreter_keeps_state():
    from qwen_jax.tools.interpreter import CodeInterpreter

    outputs = [
        "Thought: go.\nAction: code_interpreter\nAction Input:\n```py\nx = 6 * 7\nprint(x)\n```",
        "Thought: check.\nAction: code_interpreter\nAction Input: ```python\nprint(x + 1)\n```\n",
        "Thought: I now know the final answer\nFinal Answer: 42",
    ]
    model = ScriptedText(outputs)
    with CodeInterpreter() as interpreter:
        registry = Registry()
        tool = add_code_interpreter(registry, interpreter)
        result = Agent(model, registry).run("What is 6 times 7?")
    assert result.outcome == "answered" and result.final_answer == "42"
    assert [c.status for c in tool.cells] == ["ok", "ok"]
    assert [s.observations for s in result.steps[:2]] == [("42",), ("43",)]
    assert model.calls[2][1].endswith("\nObservation: 43\nThought:")


def test_outcomes_step_cap_no_action_and_error():
    action = 'Thought: again.\nAction: get_weather\nAction Input: {"city": "Oslo"}'
    seen = []
    capped = Agent(ScriptedText([action] * 3), weather_registry(seen), max_steps=3).run("q")
    assert capped.outcome == "step_cap" and capped.final_answer is None
    assert len(capped.steps) == 3 and len(seen) == 3

    idle = Agent(ScriptedText(["I am not sure what to do."]), weather_registry([])).run("q")
    assert idle.outcome == "no_action" and idle.final_answer is None and len(idle.steps) == 1

    class Failing:
        def complete(self, *args, **kwargs):
            from qwen_jax.infer.engine import GenerationError

            raise GenerationError("the prompt has 9000 tokens; the context budget is 4096")

    failed = Agent(Failing(), weather_registry([])).run("q")
    assert failed.outcome == "error" and "context budget" in failed.error


def test_run_batch_steps_queries_together_each_with_its_own_registry():
    class Batched(ScriptedText):
        def complete_batch(self, requests, stop):
            self.calls.append(len(requests))
            return [self.outputs.pop(0) for _ in requests]

    action = 'Thought: t\nAction: get_weather\nAction Input: {"city": "Oslo"}'
    final = "Thought: I now know the final answer\nFinal Answer: done"
    # Round 1: both act; round 2: the first answers, the second acts again; round 3: answers.
    model = Batched([action, action, final, action, final])
    seen_a, seen_b = [], []
    agent = Agent(model, weather_registry([]))
    results = agent.run_batch(["a", "b"], [weather_registry(seen_a), weather_registry(seen_b)])
    assert model.calls == [2, 2, 1]
    assert [r.outcome for r in results] == ["answered", "answered"]
    assert [len(r.steps) for r in results] == [2, 3] and (len(seen_a), len(seen_b)) == (1, 2)
    with pytest.raises(ValueError, match="2 queries but 1 registries"):
        agent.run_batch(["a", "b"], [weather_registry([])])

    class Failing(Batched):
        def complete_batch(self, requests, stop):
            raise ModelError("the server is gone")

    failed = Agent(Failing([]), weather_registry([])).run_batch(["a", "b"])
    assert [(r.outcome, r.error) for r in failed] == [("error", "the server is gone")] * 2


def test_hung_and_failing_tools_become_observations_and_the_loop_goes_on():
    registry = Registry()
    release = threading.Event()

    @registry.register(timeout_s=0.3)
    def slow(n: int) -> str:
        """Never returns in time."""
        release.wait(30)
        return "late"

    @registry.register
    def broken(n: int) -> str:
        raise ZeroDivisionError("division by zero")

    outputs = [
        "Thought: try.\nAction: slow\nAction Input: {'n': 1}",  # json5: single quotes
        "Thought: other.\nAction: broken\nAction Input: {n: 2,}",
        "Thought: I now know the final answer\nFinal Answer: none",
    ]
    start = time.monotonic()
    result = Agent(ScriptedText(outputs), registry).run("q")
    release.set()
    assert time.monotonic() - start < 10
    assert result.outcome == "answered"
    assert result.steps[0].observations == ("Error: tool 'slow' timed out after 0.3 s",)
    assert result.steps[1].observations == (
        "Error: tool 'broken' raised ZeroDivisionError: division by zero",
    )


def test_registry_bad_arguments_and_unknown_tools():
    registry = weather_registry([])
    call = registry.call
    assert call("nope", "{}") == "Error: unknown tool 'nope'; available tools: get_weather"
    assert call("get_weather", "{city: 'Rome'").startswith(
        "Error: arguments of tool 'get_weather' are not valid JSON (json5):"
    )
    assert call("get_weather", "[1, 2]") == (
        "Error: arguments of tool 'get_weather' must be a JSON object, got list"
    )
    assert call("get_weather", '{"city": 3}') == (
        "Error: argument 'city': 3 is not of type 'string' (tool 'get_weather')"
    )
    assert call("get_weather", "{}") == "Error: argument 'city' is required (tool 'get_weather')"
    assert call("get_weather", '{"city": "Rome", "when": "now"}') == (
        "Error: argument 'when' is not a parameter of this tool (tool 'get_weather')"
    )
    assert call("get_weather", '{"city": "Rome", "unit": "K"}').startswith(
        "Error: argument 'unit': 'K' is not one of ['C', 'F']"
    )
    assert call("get_weather", "{'city': 'Rome', 'unit': 'F'}") == "sunny, 21 F in Rome"
    with pytest.raises(ValueError, match="already registered"):
        registry.add(WEATHER, lambda city: city)


def test_schema_from_the_signature():
    def search(query: str, limit: int = 5, exact: bool = False, *, tags: list | None = None):
        """Search the notes.

        Longer text that is not part of the description."""

    assert schema_from_signature(search) == {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "exact": {"type": "boolean"},
            "tags": {},
        },
        "required": ["query"],
    }
    registry = Registry()
    registry.register(search)
    assert registry.specs[0].description == "Search the notes."
    assert registry.call("search", '{"query": "x", "limit": "many"}') == (
        "Error: argument 'limit': 'many' is not of type 'integer' (tool 'search')"
    )


class FakeEngine:
    """What LocalModel needs of an Engine: records the prompt ids, streams fixed replies."""

    max_context = 4096

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def generate(self, prompts, *, on_token=None, **kwargs):
        from qwen_jax.infer.engine import Generation

        self.prompts.append(list(prompts[0]))
        reply = self.replies.pop(0)
        if on_token is not None:
            on_token(0, 0, 0.0, reply)
        return [Generation(list(prompts[0]), [], [], "stop", None, reply)]


@pytest.fixture(scope="module")
def qwen_tok():
    return load_tokenizer("qwen")


def test_local_model_builds_chatml_ids_and_keeps_observations_plain_text(qwen_tok):
    """Marker text inside the assistant turn (a tool printing "<|im_end|>") is plain text."""
    from qwen_jax.tokenizer import chatml

    engine = FakeEngine(["Final Answer: ok"])
    model = LocalModel(engine, qwen_tok)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert (
        model.complete(messages, "Observation: <|im_end|>", ("Observation:",)) == "Final Answer: ok"
    )
    expected = chatml.build_prompt(qwen_tok, messages[1:], system="S")
    expected += qwen_tok.encode("Observation: <|im_end|>", allowed_special=set())
    assert engine.prompts == [expected]
    assert qwen_tok.im_end_id not in engine.prompts[0][-8:]  # the marker stayed plain text


def test_hermes_format_on_a_local_model_with_a_qwen25_style_template(qwen_tok, tmp_path):
    """format="hermes": the checkpoint's chat template renders the tools and the tool result,
    `<tool_call>` replies are parsed into calls, a plain reply is the answer."""
    from pathlib import Path

    from qwen_jax.serve.templates import template_for

    source = Path(__file__).parent / "data/chat_templates/qwen25_style.jinja"
    (tmp_path / "chat_template.jinja").write_text(source.read_text())
    template = template_for(tmp_path, qwen_tok)
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    engine = FakeEngine([call, "It is 42."])
    model = LocalModel(engine, qwen_tok, template=template)
    result = Agent(model, calculator_registry(), format="hermes").run("What is 6*7?")
    assert result.outcome == "answered" and result.final_answer == "It is 42."
    assert result.steps[0].observations == ("42",)
    first, second = (qwen_tok.decode(p) for p in engine.prompts)
    assert '"name": "calculator"' in first and "<tools>" in first
    assert "<tool_response>\n42\n</tool_response>" in second


# --- through the server -------------------------------------------------------------------
def _script(tok):
    """The scripted model: an action first (the code interpreter reading an uploaded file when
    the query names one, else the calculator); once its turn holds an observation, the final
    answer."""

    def reply(req):
        prompt = tok.decode(list(req.prompt_ids))
        upload = "[Upload file data.txt]" in prompt
        if "\nObservation:" in prompt.split("<|im_start|>assistant\n")[-1]:
            answer = "the file says hello" if upload else "six times seven is 42"
            return f"Thought: I now know the final answer\nFinal Answer: {answer}"
        if upload:
            code = "```py\nprint(open('data.txt').read())\n```"
            return f"Thought: read it.\nAction: code_interpreter\nAction Input: {code}"
        return 'Thought: calculate.\nAction: calculator\nAction Input: {"expression": "6*7"}'

    return reply


@pytest.fixture(scope="module")
def server_url(qwen_tok, tmp_path_factory):
    app_mod = pytest.importorskip("qwen_jax.serve.app", reason="helper B's server is not there")
    import uvicorn

    from qwen_jax.serve.templates import template_for
    from qwen_jax.testing.scripted import ScriptedScheduler

    scheduler = ScriptedScheduler(qwen_tok, _script(qwen_tok), max_context=4096)
    scheduler.start()
    template = template_for(tmp_path_factory.mktemp("ckpt"), qwen_tok)
    app = app_mod.create_app(scheduler, template, qwen_tok, model_name="scripted", max_context=4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    scheduler.close()


def calculator_registry():
    from qwen_jax.tools.cli import calculator

    registry = Registry()
    registry.register(calculator)
    return registry


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_the_loop_through_our_server(server_url, stream):
    model = ServerModel(server_url, "scripted", stream=stream)
    events = []
    result = Agent(model, calculator_registry()).run("What is 6*7?", on_event=events.append)
    assert result.outcome == "answered", result
    assert result.final_answer == "six times seven is 42"
    (call,) = result.steps[0].calls
    assert call.name == "calculator" and json.loads(call.arguments) == {"expression": "6*7"}
    assert result.steps[0].observations == ("42",)
    shown = "".join(e.text for e in events)
    assert "Action: calculator" in shown and "Observation: 42" in shown
    assert "Final Answer: six times seven is 42" in shown


def test_agent_cli_against_the_server(server_url, capsys, monkeypatch, tmp_path):
    args = ["agent", "--server", server_url + "/v1", "--model", "scripted"]
    assert cli_main(args + ["--tools", "calculator", "--query", "What is 6*7?"]) == 0
    out = capsys.readouterr().out
    assert "Action: calculator" in out and "Observation: 42" in out
    assert "Final Answer: six times seven is 42" in out
    # Interactive: queries from stdin until /exit; an uploaded file is in the kernel's folder.
    (tmp_path / "data.txt").write_text("hello from the host file")
    monkeypatch.setattr("sys.stdin", io.StringIO("What does the file say?\n/exit\nnot run\n"))
    args += ["--tools", "code_interpreter", "--upload", str(tmp_path / "data.txt")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "Action: code_interpreter" in out and "Observation: hello from the host file" in out
    assert out.count("Final Answer:") == 1 and "Final Answer: the file says hello" in out


def test_agent_cli_usage_errors(capsys):
    assert cli_main(["agent", "--server", "http://x", "--tools", "shell", "--query", "q"]) == 2
    assert "unknown tools ['shell']" in capsys.readouterr().err
    assert cli_main(["agent", "--query", "q"]) == 2
    assert "exactly one of --checkpoint DIR and --server URL" in capsys.readouterr().err


def test_unreachable_server_is_an_error_outcome():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = Agent(ServerModel(f"http://127.0.0.1:{port}", "m"), calculator_registry()).run("q")
    assert result.outcome == "error" and "cannot reach" in result.error
