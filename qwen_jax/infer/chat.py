"""`qwen-jax chat`: interactive ChatML conversation, and `ChatSession`, the API it is built on.

Prompts follow Qwen's make_context (spec §5.1, qwen_jax.tokenizer.chatml.build_prompt): system
turn, as much history as fits the window (oldest turns dropped first), the new user turn, then
`<|im_start|>assistant\\n`. Generation stops at `<|im_end|>`, `<|im_start|>` or `<|endoftext|>`.
Sampling defaults are Qwen-Chat's released generation config (top-p 0.8, repetition penalty
1.1, 512 new tokens, window 6144).

Commands at the prompt: /clear (forget the history), /system TEXT (new system prompt, clears
the history), /exit (or end of input). A turn that fails prints its error and the conversation
goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from qwen_jax.infer.engine import Engine, Generation
from qwen_jax.infer.options import (
    USER_ERRORS,
    UsageError,
    add_sampling_args,
    load_from_args,
    model_parser,
    run_cli,
    sampling_from_args,
    warn_unknown,
)
from qwen_jax.infer.sampling import SamplingParams

CHAT_SAMPLING = SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.1)
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_WINDOW = 6144


class ChatSession:
    """A conversation with history. `send(text)` returns the assistant's `Generation`.

    Each turn samples with `sampling.seed + turn`, so a replayed conversation is reproducible.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        *,
        system: str | None = None,
        sampling: SamplingParams = CHAT_SAMPLING,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_window_tokens: int = DEFAULT_WINDOW,
        stop_strings: Sequence[str] = (),
    ):
        from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM

        if tokenizer is None or tokenizer.im_start_id is None or tokenizer.im_end_id is None:
            raise UsageError("chat needs a tokenizer with <|im_start|>/<|im_end|> tokens")
        self.engine, self.tok = engine, tokenizer
        self.system = DEFAULT_SYSTEM if system is None else system
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        # The prompt must leave room for at least one new token in the context.
        self.window = min(max_window_tokens, engine.max_context - 1)
        self.stop_strings = tuple(stop_strings)
        self.history: list[dict[str, str]] = []
        self.turn = 0

    def clear(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    def prompt_ids(self, user_text: str) -> list[int]:
        from qwen_jax.tokenizer.chatml import build_prompt

        messages = [*self.history, {"role": "user", "content": user_text}]
        return build_prompt(self.tok, messages, system=self.system, max_window_tokens=self.window)

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Generation:
        """One user turn; `on_text` receives the reply's text as it streams."""
        from qwen_jax.tokenizer import chatml

        tok = self.tok
        try:
            ids = self.prompt_ids(user_text)
        except ValueError as e:  # system + query alone exceed the window
            raise UsageError(str(e)) from None
        sampling = dataclasses.replace(self.sampling, seed=self.sampling.seed + self.turn)
        res = self.engine.generate(
            [ids],
            max_new_tokens=self.max_new_tokens,
            sampling=sampling,
            stop_ids=chatml.stop_ids(tok),
            stop_strings=self.stop_strings,
            tokenizer=tok,
            on_token=None if on_text is None else lambda r, t, lp, delta: on_text(delta),
        )[0]
        self.turn += 1
        self.history += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": res.text},
        ]
        return res


def build_parser() -> argparse.ArgumentParser:
    p = model_parser("qwen-jax chat", __doc__.split("\n\n")[0])
    p.add_argument("--system", help="system prompt (default: 'You are a helpful assistant.')")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument(
        "--max-window",
        type=int,
        default=DEFAULT_WINDOW,
        help="most prompt tokens kept (history is dropped from the oldest turn)",
    )
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    add_sampling_args(p, CHAT_SAMPLING)
    return p


def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    sampling = sampling_from_args(args)
    if args.max_new_tokens < 1 or args.max_window < 1:
        raise UsageError("--max-new-tokens and --max-window must be >= 1")
    engine, tok = load_from_args(args)
    session = ChatSession(
        engine,
        tok,
        system=args.system,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        max_window_tokens=args.max_window,
        stop_strings=args.stop,
    )
    interactive = stdin.isatty()
    failed = turns = 0
    print("/clear resets the history, /system TEXT sets the system prompt, /exit quits",
          file=sys.stderr)  # fmt: skip
    while True:
        if interactive:
            print("\nuser> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/clear":
            session.clear()
            continue
        if text.startswith("/system "):
            session.clear(system=text[len("/system ") :])
            continue
        if not text.strip():
            continue
        if interactive:
            print("assistant> ", end="", file=sys.stderr, flush=True)
        turns += 1
        try:
            res = session.send(text, on_text=lambda d: (stdout.write(d), stdout.flush()))
        except USER_ERRORS as e:
            failed += 1
            print(f"qwen-jax chat: error: {e}", file=sys.stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        warn_unknown("qwen-jax chat", tok, res.token_ids)
    if failed:  # a script must see that a turn produced no reply
        print(f"qwen-jax chat: error: {failed} of {turns} turn(s) failed", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    return run_cli("qwen-jax chat", build_parser(), run, argv)
