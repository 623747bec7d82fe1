"""`qwen-jax serve`: an OpenAI-compatible server for a checkpoint, with continuous batching.

  qwen-jax serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8]
      [--max-context N] [--max-queue 64] [--int8] [--mesh PRESET] [--template chatml|hf]
      [--served-name NAME]

Then any OpenAI client works against http://HOST:PORT/v1 (`model` is the served name, by
default the checkpoint folder's name): chat and text completions, streaming, tools. The chat
template comes from the checkpoint: its tokenizer_config.json's `chat_template` (Qwen1.5/2/2.5),
else ChatML with Qwen's ReAct tool prompt (Qwen v1); --template overrides. Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen_jax.cli import UsageError
from qwen_jax.infer.options import load_from_args, model_parser, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = model_parser("qwen-jax serve", __doc__.split("\n\n")[0])
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch", type=int, default=8, help="decode slots (rows run together)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    g.add_argument(
        "--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per iteration"
    )
    g.add_argument(
        "--template",
        choices=("chatml", "hf"),
        help="chat template: chatml (+ ReAct tools) or hf (tokenizer_config.json's "
        "chat_template); default: hf when the checkpoint has one",
    )
    g.add_argument("--served-name", help="the model name clients use (default: folder name)")
    g.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return p


def _check_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_batch", "max_queue", "prefill_chunk"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qwen_jax.serve.app import create_app
    from qwen_jax.serve.scheduler import Scheduler
    from qwen_jax.serve.templates import template_for

    _check_flags(args)
    if Path(args.checkpoint).is_dir():  # template problems show before the weights load
        try:
            template_for(args.checkpoint, None, args.template)
        except ValueError as e:
            raise UsageError(str(e)) from None
    engine, tok = load_from_args(args)
    if tok is None:
        raise UsageError(f"{args.checkpoint} has no tokenizer files: pass --tokenizer")
    template = template_for(args.checkpoint, tok, args.template)
    name = args.served_name or Path(args.checkpoint).resolve().name
    try:
        scheduler = Scheduler(
            engine,
            tok,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            prefill_chunk=args.prefill_chunk,
        )
    except ValueError as e:  # e.g. a prefill chunk that is not a power of two
        raise UsageError(str(e)) from None
    app = create_app(scheduler, template, tok, model_name=name, max_context=scheduler.max_context)
    scheduler.start()
    try:
        print(
            f"qwen-jax serve: {name} ({template.name} template, {args.max_batch} slots, "
            f"context {scheduler.max_context}) on http://{args.host}:{args.port}/v1",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        scheduler.close()
    return 0


def main(argv: list[str]) -> int:
    return run_cli("qwen-jax serve", build_parser(), run, argv)
