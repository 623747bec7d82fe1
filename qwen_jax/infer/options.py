"""Command-line options shared by `qwen-jax generate`, `chat`, `eval ppl` and `eval run`."""

from __future__ import annotations

import argparse
import sys

from qwen_jax.checkpoint import CheckpointError
from qwen_jax.infer.engine import GenerationError
from qwen_jax.infer.load import TokenizerMismatch, load_engine, model_config
from qwen_jax.infer.longctx import parse_windows
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.infer.text import count_unknown
from qwen_jax.tokenizer.load import TokenizerLoadError


class UsageError(ValueError):
    """Flags that cannot be honoured together; the CLI prints the message and exits 2."""


# What the CLIs report as "error: <message>" (exit 2) instead of a traceback.
USER_ERRORS = (
    UsageError,
    GenerationError,
    TokenizerMismatch,
    TokenizerLoadError,
    CheckpointError,
    FileNotFoundError,
)


def run_cli(prog: str, parser: argparse.ArgumentParser, run, argv: list[str]) -> int:
    """Parse argv and call run(args); a user error prints "<prog>: error: ..." and returns 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def model_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A CLI parser that starts with the model flags (`add_model_args`)."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True, help="params export or HF checkpoint directory")
    g.add_argument(
        "--tokenizer",
        help="tokenizer spec ('qwen', a vocabulary file or folder); default: the checkpoint's own",
    )
    g.add_argument(
        "--allow-vocab-mismatch",
        action="store_true",
        help="accept a tokenizer with far fewer ids than the checkpoint has embedding rows; "
        "generated ids it cannot decode show as <unk:ID>",
    )
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype override")
    g.add_argument(
        "--int8",
        action="store_true",
        help="serve weight-only int8 dense weights (qwen_jax.model.quantize)",
    )
    g.add_argument(
        "--mesh", help="run sharded on a mesh preset over all devices (dp, fsdp, fsdp_tp)"
    )
    g.add_argument(
        "--max-context",
        type=int,
        help="most positions a row may reach (default: the config's max_position_embeddings)",
    )
    lc = p.add_argument_group("long context (default: as the checkpoint's config says)")
    lc.add_argument(
        "--ntk", action=argparse.BooleanOptionalAction, default=None, help="dynamic NTK RoPE"
    )
    lc.add_argument(
        "--logn", action=argparse.BooleanOptionalAction, default=None, help="LogN query scaling"
    )
    lc.add_argument(
        "--window",
        help="per-layer attention windows, lowest layer first: '256*2,512*2,0*4' (0 = full), "
        "one value for every layer, or 'off'",
    )


def add_sampling_args(p: argparse.ArgumentParser, defaults: SamplingParams) -> None:
    """The sampling flags. --top-k/--top-p default to None ("not given") so that
    `sampling_from_args` can tell a filter the user asked for from the verb's default."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, help=f"0 = off (default {defaults.top_k})")
    g.add_argument("--top-p", type=float, help=f"1 = off (default {defaults.top_p})")
    g.add_argument(
        "--repetition-penalty", type=float, default=defaults.repetition_penalty, help="1 = off"
    )
    g.add_argument("--seed", type=int, default=defaults.seed)
    p.set_defaults(sampling_defaults=defaults)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags. Filters the user passed with greedy decoding are a
    conflict; the verb's default filters (chat's top-p 0.8) simply do not apply to greedy."""
    given_k, given_p = args.top_k is not None, args.top_p is not None
    if args.temperature == 0 and ((given_k and args.top_k) or (given_p and args.top_p < 1)):
        flags = "/".join(f for f, on in (("--top-k", given_k), ("--top-p", given_p)) if on)
        raise UsageError(
            f"{flags} filter a sampled distribution but --temperature 0 means greedy decoding; "
            "set --temperature > 0 or drop the filter"
        )
    defaults: SamplingParams = args.sampling_defaults
    greedy = args.temperature == 0
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k if given_k else (0 if greedy else defaults.top_k),
            top_p=args.top_p if given_p else (1.0 if greedy else defaults.top_p),
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_from_args(args: argparse.Namespace):
    """(Engine, tokenizer or None) from the model flags."""
    mesh = None
    if args.mesh:
        from qwen_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
    windows = None
    if args.window is not None:
        try:
            windows = parse_windows(args.window, model_config(args.checkpoint).num_layers)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.max_context is not None and args.max_context < 2:
        raise UsageError(f"--max-context must be >= 2, got {args.max_context}")
    return load_engine(
        args.checkpoint,
        tokenizer=args.tokenizer,
        ntk=args.ntk,
        logn=args.logn,
        windows=windows,
        dtype=args.dtype,
        max_context=args.max_context,
        mesh=mesh,
        int8=args.int8,
        allow_vocab_mismatch=args.allow_vocab_mismatch,
    )


def warn_unknown(prog: str, tokenizer, token_ids) -> int:
    """One stderr line when generated ids had no text in the tokenizer (shown as <unk:ID>);
    returns their number."""
    n = count_unknown(tokenizer, token_ids)
    if n:
        print(
            f"{prog}: warning: {n} generated token id(s) have no text in tokenizer "
            f"{tokenizer.name} ({tokenizer.vocab_size} ids); shown as <unk:ID>",
            file=sys.stderr,
        )
    return n
