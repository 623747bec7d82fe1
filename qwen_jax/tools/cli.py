"""`qwen-jax agent`: a ReAct agent with tools (the code interpreter by default), on a local
checkpoint or against an OpenAI-compatible server.

    qwen-jax agent --checkpoint DIR [--tools code_interpreter,calculator] [--max-steps 8]
    qwen-jax agent --server http://127.0.0.1:8000/v1 --model qwen [--query "..."]

Queries come from stdin, one per line (each a new task; the interpreter's kernel, its variables
and files persist for the session), or once from --query. Thought / Action / Observation /
Final Answer are printed as they stream. --upload FILE copies a file into the kernel's
directory and names it in the query (`[Upload file NAME]`, as Qwen's code-interpreter prompt
does). Format: Qwen v1 checkpoints speak ReAct; checkpoints that ship a chat template (Qwen2,
Qwen2.5) speak their native `<tool_call>` format (--format overrides). Exit status: 0 when
every query was answered, 1 otherwise (step cap, no action, model error).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import operator
import sys
from pathlib import Path

from qwen_jax.tools.agent import Agent, AgentEvent, LocalModel, ServerModel
from qwen_jax.tools.registry import Registry, add_code_interpreter

TOOLS = ("code_interpreter", "calculator")
_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)}")

    return str(ev(ast.parse(expression, mode="eval").body))


def build_parser() -> argparse.ArgumentParser:
    from qwen_jax.infer.options import model_parser

    p = model_parser("qwen-jax agent", __doc__.split("\n\n")[0])
    for action in p._actions:  # argparse has no public way to relax an added flag
        if action.dest == "checkpoint":
            action.required = False
    g = p.add_argument_group("agent")
    g.add_argument("--server", help="OpenAI-compatible API base URL instead of --checkpoint")
    g.add_argument("--model", default="qwen", help="model name on the server (default: qwen)")
    g.add_argument("--api-key", help="bearer token for the server")
    g.add_argument(
        "--tools", default="code_interpreter", help=f"comma-separated: {','.join(TOOLS)}"
    )
    g.add_argument("--format", choices=("auto", "react", "hermes"), default="auto")
    g.add_argument("--max-steps", type=int, default=8, help="model calls per query (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="per model call")
    g.add_argument("--tool-timeout", type=float, default=30.0, help="seconds per tool call")
    g.add_argument("--system", help="system prompt (default: the format's own)")
    g.add_argument("--upload", action="append", default=[], type=Path, help="file for the kernel")
    g.add_argument("--query", help="answer this one query and exit (else read stdin)")
    return p


def _model(args):
    """(model, format) from the flags."""
    from qwen_jax.infer.options import UsageError, load_from_args

    if args.server:
        return ServerModel(args.server, args.model, api_key=args.api_key), "react"
    engine, tok = load_from_args(args)
    if tok is None:
        raise UsageError(f"the agent needs a tokenizer: {args.checkpoint} has none (--tokenizer)")
    template, fmt = None, args.format
    if fmt != "react":
        from qwen_jax.serve.templates import template_for

        try:
            template = template_for(args.checkpoint, tok, "hf" if fmt == "hermes" else None)
        except ValueError as e:  # --format hermes on a checkpoint without a chat template
            raise UsageError(str(e)) from None
        fmt = "hermes" if template.name == "hf-jinja" else "react"
    return LocalModel(engine, tok, template=template, max_new_tokens=args.max_new_tokens), fmt


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from qwen_jax.infer.options import UsageError

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    names = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in names if t not in TOOLS]
    if unknown:
        raise UsageError(f"unknown tools {unknown}; available: {', '.join(TOOLS)}")
    if bool(args.server) == bool(args.checkpoint):
        raise UsageError("give exactly one of --checkpoint DIR and --server URL")
    if args.max_steps < 1 or args.max_new_tokens < 1 or args.tool_timeout <= 0:
        raise UsageError("--max-steps, --max-new-tokens and --tool-timeout must be positive")
    for path in args.upload:
        if not path.is_file():
            raise UsageError(f"--upload {path}: no such file")
    if args.upload and "code_interpreter" not in names:
        raise UsageError("--upload needs the code_interpreter tool")

    model, fmt = _model(args)
    with contextlib.ExitStack() as stack:
        registry = Registry()
        uploaded = []
        if "code_interpreter" in names:
            from qwen_jax.tools.interpreter import CodeInterpreter

            interpreter = stack.enter_context(CodeInterpreter())
            uploaded = [interpreter.upload(path) for path in args.upload]
            add_code_interpreter(registry, interpreter)
        if "calculator" in names:
            registry.register(calculator, timeout_s=args.tool_timeout)
        agent = Agent(
            model,
            registry,
            format=fmt,
            max_steps=args.max_steps,
            system=args.system,
        )
        prefix = "".join(f"[Upload file {name}]\n" for name in uploaded)
        queries = [args.query] if args.query is not None else _lines(stdin)
        failed = total = 0
        for query in queries:
            total += 1
            failed += not _answer(agent, prefix + query, stdout)
            prefix = ""  # the files are in the kernel's directory from now on
    if failed:
        print(f"qwen-jax agent: error: {failed} of {total} query(ies) unanswered", file=sys.stderr)
        return 1
    return 0


def _lines(stdin):
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("\nquery> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text:
            yield text


def _answer(agent: Agent, query: str, stdout) -> bool:
    """Run one query, printing its events; True when it was answered."""

    def show(event: AgentEvent):
        if event.text:
            stdout.write(event.text)
            stdout.flush()

    result = agent.run(query, on_event=show)
    stdout.write("\n")
    stdout.flush()
    if result.outcome == "answered":
        return True
    why = {
        "step_cap": f"no final answer after {len(result.steps)} step(s) (--max-steps)",
        "no_action": "the model gave neither an action nor a final answer",
        "error": result.error,
    }[result.outcome]
    print(f"qwen-jax agent: {result.outcome}: {why}", file=sys.stderr)
    return False


def main(argv: list[str]) -> int:
    from qwen_jax.infer.options import run_cli

    return run_cli("qwen-jax agent", build_parser(), run, argv)
