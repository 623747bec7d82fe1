"""The OpenAI-compatible server through the official `openai` client (and raw HTTP for what
the client cannot send), against uvicorn on a loopback port.

One server per module hosts three apps: /real serves a tiny params export through the real
continuous-batching Scheduler (greedy outputs must equal `Engine.generate` alone and `qwen-jax
generate`), /react and /hf serve the same tokenizer through a ScriptedScheduler with the
chatml-react (Qwen v1) and hf-jinja (Qwen2-style template written here) templates, so the
tool-call replies are fixed texts rather than a model's luck.
"""

import base64
import collections
import concurrent.futures
import json
import socket
import threading
import time

import httpx2
import numpy as np
import openai
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from qwen_jax import cli
from qwen_jax.checkpoint import save_params
from qwen_jax.infer import generate_cli
from qwen_jax.infer.load import load_engine
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.serve.app import create_app
from qwen_jax.serve.protocol import token_piece
from qwen_jax.serve.scheduler import Scheduler
from qwen_jax.serve.templates import template_for
from qwen_jax.testing.scripted import ScriptedScheduler

# 256 byte tokens + Qwen's 208 specials = 464 ids: eod 256, im_start 257, im_end 258.
CFG = C.tiny(vocab_size=512, init_std=0.1, seq_length=32, max_position_embeddings=256)
NAME = "tiny"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "city name"}},
            "required": ["city"],
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
# Byte-level vocab: a token per byte. Every prompt the model sees has 65-128 tokens (one prompt
# bucket; a chat prompt is 57 tokens + its content), so each jitted step compiles once.
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was"

# A Qwen2.5-style chat template (the parts that matter: tools in the system turn, <tool_call>
# JSON in assistant turns, tool results as <tool_response> in a user turn).
QWEN2_TEMPLATE = "\n".join(
    [
        r"{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}",
        r"{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}",
        r"{{- '<|im_start|>system\n' + system }}",
        r"{%- if tools %}",
        r"{{- '\n\n# Tools\n\nYou are provided with function signatures within "
        r"<tools></tools> XML tags:\n<tools>' }}",
        r"{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}",
        r"""{{- '\n</tools>\n\nFor each function call, return a json object with function """
        r"""name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"""
        r"""{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}""",
        r"{%- endif %}",
        r"{{- '<|im_end|>\n' }}",
        r"{%- for message in messages %}",
        r"{%- if message.role == 'user' or (message.role == 'assistant' and not "
        r"message.tool_calls) %}",
        r"{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}",
        r"{%- elif message.role == 'assistant' %}",
        r"{{- '<|im_start|>assistant' }}",
        r"{%- if message.content %}{{- '\n' + message.content }}{%- endif %}",
        r"{%- for call in message.tool_calls %}",
        r"""{{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + """
        r"""(call.function.arguments | tojson) + '}\n</tool_call>' }}""",
        r"{%- endfor %}",
        r"{{- '<|im_end|>\n' }}",
        r"{%- elif message.role == 'tool' %}",
        r"{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- "
        r"'<|im_start|>user' }}{%- endif %}",
        r"{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}",
        r"{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- "
        r"'<|im_end|>\n' }}{%- endif %}",
        r"{%- endif %}",
        r"{%- endfor %}",
        r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}",
    ]
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_api")
    vocab = root / "qwen.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    save_params(create_model(CFG, seed=5), root / "export", tokenizer_files=[vocab])
    (root / "qwen2").mkdir()
    (root / "qwen2" / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": QWEN2_TEMPLATE, "eos_token": "<|im_end|>"})
    )
    return root


def _serve(app):
    """uvicorn on a free loopback port in a background thread; returns (url, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(30)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def env(assets):
    """The server (three apps), the reference engine and the scripts of the scripted apps."""
    engine, tok = load_engine(assets / "export")  # also the reference (generate is read-only)
    chatml = template_for(assets / "export", tok)
    hf = template_for(assets / "qwen2", tok)
    assert (chatml.name, hf.name) == ("chatml-react", "hf-jinja")
    real = Scheduler(engine, tok, max_batch=8, max_queue=64, prefill_chunk=64)
    scripts = {"react": collections.deque(), "hf": collections.deque()}
    # The ReAct instruction alone is ~850 byte tokens: the scripted apps get a long context.
    react_sched = ScriptedScheduler(
        tok, lambda r: scripts["react"].popleft(), max_context=4096, max_queue=2
    )
    hf_sched = ScriptedScheduler(tok, lambda r: scripts["hf"].popleft(), max_context=4096)
    apps = {
        "real": create_app(real, chatml, tok, model_name=NAME, max_context=real.max_context),
        "react": create_app(react_sched, chatml, tok, model_name=NAME, max_context=4096),
        "hf": create_app(hf_sched, hf, tok, model_name=NAME, max_context=4096),
    }
    for s in (real, react_sched, hf_sched):
        s.start()
    url, stop = _serve(Starlette(routes=[Mount(f"/{k}", app=a) for k, a in apps.items()]))
    yield dict(
        url=url, tok=tok, engine=engine, chatml=chatml, hf=hf, real=real,
        react=react_sched, hf_sched=hf_sched, scripts=scripts,
    )  # fmt: skip
    stop()
    for s in (real, react_sched, hf_sched):
        s.close()


def _client(env, app="real") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{env['url']}/{app}/v1", api_key="none", max_retries=0, timeout=60
    )


def _chat_ref(env, messages, max_tokens):
    """Engine.generate alone on the chat template's prompt ids (what the server must equal)."""
    tok, tpl = env["tok"], env["chatml"]
    ids = tpl.prompt_ids(tok, messages, None)
    (ref,) = env["engine"].generate(
        [ids], max_new_tokens=max_tokens, stop_ids=tpl.stop_ids(tok), tokenizer=tok
    )
    return ids, ref


def _pieces(env, token_ids):
    stops = set(env["chatml"].stop_ids(env["tok"]))
    return [token_piece(env["tok"], t)[0] for t in token_ids if t not in stops]


def _metrics(env) -> dict:
    text = httpx2.get(f"{env['url']}/real/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_models_health_and_metrics_format(env):
    models = _client(env).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx2.get(f"{env['url']}/real/health").status_code == 200
    m = _metrics(env)
    for key in ("qwen_jax_requests_running", "qwen_jax_requests_waiting",
                "qwen_jax_generated_tokens_total", "qwen_jax_time_to_first_token_seconds_count",
                'qwen_jax_requests_total{finish_reason="cancelled"}'):  # fmt: skip
        assert key in m, key


def test_chat_greedy_equals_engine_generate(env):
    messages = [{"role": "user", "content": "Tell me about the best of times, and the worst."}]
    ids, ref = _chat_ref(env, messages, 12)
    client = _client(env)
    resp = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2
    )
    choice = resp.choices[0]
    assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (
        len(ids),
        len(ref.token_ids),
    )
    lp = choice.logprobs.content
    assert [c.token for c in lp] == _pieces(env, ref.token_ids)
    stops = set(env["chatml"].stop_ids(env["tok"]))
    ref_lp = [p for t, p in zip(ref.token_ids, ref.logprobs) if t not in stops]
    np.testing.assert_allclose([c.logprob for c in lp], ref_lp, rtol=0, atol=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob for c in lp)

    stream = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == ref.text and reasons == [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completions_equal_qwen_jax_generate(env, assets, capsys):
    client = _client(env)
    resp = client.completions.create(model=NAME, prompt=TEXT, max_tokens=8, temperature=0)
    code = generate_cli.main(
        ["--checkpoint", str(assets / "export"), "--prompt", TEXT, "--max-new-tokens", "8"]
    )
    assert code == 0 and capsys.readouterr().out == resp.choices[0].text + "\n"
    ids = env["tok"].encode(TEXT)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, n=2)
    assert [c.text for c in by_ids.choices] == [resp.choices[0].text] * 2
    assert [c.index for c in by_ids.choices] == [0, 1]
    # Sampled: a seed gives the same choices again, and the n choices draw differently.
    kw = dict(model=NAME, prompt=ids, max_tokens=8, temperature=1.0, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text


def test_sixteen_concurrent_requests_each_equal_alone(env):
    client = _client(env)
    cases = [
        ([{"role": "user", "content": f"Question {i:02d}:" + " ok" * i}], 4 + i % 7)
        for i in range(16)
    ]

    def ask(case):
        messages, max_tokens = case
        kw = dict(model=NAME, messages=messages, temperature=0, max_tokens=max_tokens)
        if len(messages[0]["content"]) % 2:  # half of them stream
            chunks = list(client.chat.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], None
        resp = client.chat.completions.create(**kw, logprobs=True)
        pieces = [c.token for c in resp.choices[0].logprobs.content]
        return resp.choices[0].message.content, resp.choices[0].finish_reason, pieces

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, cases))
    assert len({len(m[0]["content"]) for m, _ in cases}) == 16
    for (messages, max_tokens), (text, reason, pieces) in zip(cases, got):
        _, ref = _chat_ref(env, messages, max_tokens)
        assert (text, reason) == (ref.text, ref.finish_reason)
        if pieces is not None:
            assert pieces == _pieces(env, ref.token_ids)


def _tool_round_trip(env, app, reply, final_reply, result_marker):
    """A tool call from a scripted reply, then the conversation continued with its result."""
    client, script, sched = (
        _client(env, app),
        env["scripts"][app],
        env["react" if app == "react" else "hf_sched"],
    )
    script.append(reply)
    resp = client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    prompt = env["tok"].decode(sched.requests[-1].prompt_ids)
    assert "get_weather" in prompt and "What is the weather in Paris?" in prompt

    script.append(reply)  # the same call, streamed: held back, then one tool_calls delta
    chunks = list(
        client.chat.completions.create(model=NAME, messages=QUESTION, tools=[WEATHER], stream=True)
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    script.append(final_reply)
    follow = [
        *QUESTION,
        {"role": "assistant", "content": choice.message.content,
         "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]  # fmt: skip
    resp = client.chat.completions.create(model=NAME, messages=follow, tools=[WEATHER])
    assert resp.choices[0].finish_reason == "stop" and not resp.choices[0].message.tool_calls
    assert resp.choices[0].message.content == "It is sunny in Paris."
    prompt = env["tok"].decode(sched.requests[-1].prompt_ids)
    assert result_marker in prompt and '"Paris"' in prompt
    return sched.requests[-1]


def test_tool_calls_chatml_react(env):
    reply = (
        'Thought: I should look it up.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: (the model would invent one; generation stops before it)"
    )
    final = "Thought: I now know the final answer.\nFinal Answer: It is sunny in Paris."
    last = _tool_round_trip(env, "react", reply, final, "Observation: sunny, 21 C")
    assert "Observation:" in last.stop_strings


def test_tool_calls_hf_jinja(env):
    reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    last = _tool_round_trip(
        env, "hf", reply, "It is sunny in Paris.", "<tool_response>\nsunny, 21 C\n</tool_response>"
    )
    assert env["tok"].decode(last.prompt_ids).endswith("<|im_start|>assistant\n")


def test_request_fields_reach_the_scheduler(env):
    client, sched, script = _client(env, "react"), env["react"], env["scripts"]["react"]
    script.extend(["hello STOP world", "bye STOP"])
    resp = client.chat.completions.create(
        model=NAME, messages=QUESTION, n=2, seed=5, temperature=0.7, top_p=0.9, stop="STOP",
        max_completion_tokens=30, logprobs=True, top_logprobs=1, extra_body={"top_k": 7},
    )  # fmt: skip
    assert [c.message.content for c in resp.choices] == ["hello ", "bye "]
    assert [c.finish_reason for c in resp.choices] == ["stop", "stop"]
    a, b = sched.requests[-2:]
    assert (a.sampling.seed, b.sampling.seed) == (5, 6) and a.prompt_ids == b.prompt_ids
    assert (a.sampling.temperature, a.sampling.top_p, a.sampling.top_k) == (0.7, 0.9, 7)
    assert (a.max_tokens, a.stop_strings, a.top_logprobs) == (30, ("STOP",), 1)
    assert a.stop_ids == env["chatml"].stop_ids(env["tok"])
    assert resp.usage.prompt_tokens == len(a.prompt_ids)
    assert resp.usage.completion_tokens == len("hello STOP") + len("bye STOP")  # byte tokens
    assert [t.token for t in resp.choices[0].logprobs.content] == list("hello STOP")


BAD = [
    # (endpoint, body (bytes: sent raw), status, param, code, words in the message)
    ("chat", b'{"model": "tiny", "messages": [', 400, None, None, "not valid JSON"),
    ("chat", {"model": NAME}, 400, "messages", None, "required"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None,
     "'robot'"),
    ("chat", {"messages": [{"role": "user", "content": "x " * 200}]}, 400, "messages",
     "context_length_exceeded", "maximum context length is 256"),
    ("chat", {"messages": QUESTION, "n": 0}, 400, "n", None, "greater than or equal to 1"),
    ("chat", {"messages": QUESTION, "n": 9}, 400, "n", None, "less than or equal to 8"),
    ("chat", {"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", None,
     "greater than or equal to 1"),
    ("chat", {"messages": QUESTION, "max_tokens": 10**6}, 400, "max_tokens", None,
     "at most the context length 256"),
    ("chat", {"model": "gpt-4o", "messages": QUESTION}, 404, "model", "model_not_found",
     "`gpt-4o` does not exist"),
    ("chat", {"messages": QUESTION, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}]},
     400, "tools", None, "not a valid JSON Schema"),
    ("chat", {"messages": QUESTION, "tool_choice": "auto"}, 400, "tool_choice", None,
     "needs tools"),
    ("completions", {"prompt": [600]}, 400, None, None, "outside the model's vocabulary"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo", None, "echo is not supported"),
]  # fmt: skip


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(env):
    base = f"{env['url']}/real/v1"
    for endpoint, body, status, param, code, words in BAD:
        path = f"{base}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        r = (
            httpx2.post(path, content=body, headers={"content-type": "application/json"})
            if isinstance(body, bytes)
            else httpx2.post(path, json=body)
        )
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (status, param, code), (body, err)
        assert words in err["message"] and set(err) == {"message", "type", "param", "code"}
        ok = httpx2.post(f"{base}/completions", json={"prompt": TEXT, "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"]
    with pytest.raises(openai.BadRequestError) as e:  # what a client sees
        _client(env).chat.completions.create(model=NAME, messages=QUESTION, n=9)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    r = httpx2.get(f"{base}/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_full_queue_is_429_and_a_failed_generation_fails_alone(env):
    client, sched, script = _client(env, "react"), env["react"], env["scripts"]["react"]
    script.extend(["first", "second"])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with sched.paused():
            waiting = [
                pool.submit(client.chat.completions.create, model=NAME, messages=QUESTION)
                for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while sched.stats()["waiting"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=NAME, messages=QUESTION)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
    assert sorted(f.result().choices[0].message.content for f in waiting) == ["first", "second"]

    script.extend([RuntimeError("the device fell over"), "still here"])
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=NAME, messages=QUESTION)
    assert "the device fell over" in e.value.body["message"]
    ok = client.chat.completions.create(model=NAME, messages=QUESTION)
    assert ok.choices[0].message.content == "still here"


def test_disconnect_mid_stream_frees_the_slot(env):
    before = _metrics(env)
    body = {"prompt": TEXT, "max_tokens": 160, "ignore_eos": True, "stream": True}
    url = f"{env['url']}/real/v1/completions"
    with httpx2.stream("POST", url, json=body, timeout=120) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    deadline = time.monotonic() + 60  # alone, this test also waits for the decode compile
    while True:
        m = _metrics(env)
        if m["qwen_jax_requests_running"] == 0 and m["qwen_jax_requests_waiting"] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.02)
    cancelled = 'qwen_jax_requests_total{finish_reason="cancelled"}'
    assert m[cancelled] == before[cancelled] + 1
    generated = m["qwen_jax_generated_tokens_total"] - before["qwen_jax_generated_tokens_total"]
    assert generated < 160  # it did not run to its budget


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--template", "hf"], "has no chat template"),
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ],
)
def test_serve_cli_bad_flags_are_one_line_errors(assets, capsys, extra, words):
    code = cli.main(["serve", "--checkpoint", str(assets / "export"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qwen-jax serve: error:") and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_disconnect_while_waiting_for_a_whole_reply_cancels_it(env):
    """Non-streaming: nothing is sent until the reply ends, so the app must poll the client."""
    sched, script = env["react"], env["scripts"]["react"]
    script.append("x" * 200)  # 200 tokens at 20 ms each: 4 s unless cancelled
    before = sched.stats()["requests"].get("cancelled", 0)
    sched.token_delay_s = 0.02
    try:
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(
                f"{env['url']}/react/v1/chat/completions",
                json={"messages": QUESTION},
                timeout=0.5,
            )
        deadline = time.monotonic() + 2
        while sched.stats()["requests"].get("cancelled", 0) == before:
            assert time.monotonic() < deadline, sched.stats()
            time.sleep(0.01)
        assert sched.stats()["generated_tokens"] and sched.stats()["running"] == 0
    finally:
        sched.token_delay_s = 0.0
