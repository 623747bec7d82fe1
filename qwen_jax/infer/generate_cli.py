"""`qwen-jax generate`: continue a prompt with a checkpoint.

  qwen-jax generate --checkpoint DIR (--prompt TEXT | --prompt-ids 1,2,3) [--max-new-tokens N]
      [--temperature T --top-k K --top-p P --repetition-penalty R --seed S]
      [--stop STR ...] [--stop-id ID ...] [--ntk/--no-ntk --logn/--no-logn --window SPEC] [--json]

Text streams to stdout as it is generated. `--json` prints instead one object per prompt with
the prompt ids, the generated ids, their log-probabilities, the text and why generation ended.
Generated ids the tokenizer has no text for (embedding rows past its vocabulary) show as
`<unk:ID>` and are counted in one warning on stderr.
Repeating --prompt (or --prompt-ids) generates for all of them as one batch.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen_jax.infer.options import (
    UsageError,
    add_sampling_args,
    load_from_args,
    model_parser,
    run_cli,
    sampling_from_args,
    warn_unknown,
)
from qwen_jax.infer.sampling import SamplingParams


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    return ids


def build_parser() -> argparse.ArgumentParser:
    p = model_parser("qwen-jax generate", __doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument(
        "--prompt-ids", action="append", type=_parse_ids, help="prompt token ids '1,2,3'"
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_args(p, SamplingParams())
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-id", action="append", type=int, default=[], help="stop token id")
    p.add_argument(
        "--ignore-eod",
        action="store_true",
        help="do not stop at the tokenizer's end-of-text token",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    engine, tok = load_from_args(args)
    if args.prompt is not None:
        if tok is None:
            raise UsageError(
                f"{args.checkpoint} has no tokenizer: pass --tokenizer, or --prompt-ids"
            )
        prompts = [tok.encode(text, allowed_special="all") for text in args.prompt]
    else:
        prompts = args.prompt_ids
    if args.stop and tok is None:
        raise UsageError("--stop strings need a tokenizer (pass --tokenizer)")
    stop_ids = list(args.stop_id)
    if tok is not None and not args.ignore_eod:
        stop_ids.append(tok.eod_id)

    stream = not args.json and tok is not None and len(prompts) == 1
    on_token = None
    if stream:

        def on_token(row, token, logprob, delta):
            sys.stdout.write(delta)
            sys.stdout.flush()

    results = engine.generate(
        prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        stop_strings=args.stop,
        tokenizer=tok,
        on_token=on_token,
    )
    for res in results:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt_ids": res.prompt_ids,
                        "token_ids": res.token_ids,
                        "logprobs": res.logprobs,
                        "text": res.text,
                        "finish_reason": res.finish_reason,
                        "stop": res.stop,
                    },
                    ensure_ascii=False,
                )
            )
        elif stream:
            print()
        elif res.text is not None:
            print(res.text)
        else:
            print(",".join(map(str, res.token_ids)))
    if tok is not None:
        warn_unknown("qwen-jax generate", tok, [t for r in results for t in r.token_ids])
    return 0


def main(argv: list[str]) -> int:
    return run_cli("qwen-jax generate", build_parser(), run, argv)
