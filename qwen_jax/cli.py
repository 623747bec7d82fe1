"""`qwen-jax <verb> ...`: the single command-line entry point.

Each verb lives in its own module and owns its argument parsing (argparse, or absl flags with
ml_collections `--config` for the experiment-driven verbs). Modules are imported only when their
verb runs, so `qwen-jax tokenizer ...` never pays for TensorFlow or torch imports.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module, function taking argv[1:] of the verb and returning an exit code, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "tokenizer": ("qwen_jax.tokenizer.cli", "main", "encode/decode ids, train SentencePiece"),
    "data": ("qwen_jax.data.cli", "main", "build demo corpus, dedup, list/inspect tasks"),
    "convert": ("qwen_jax.checkpoint.convert", "main", "HF safetensors <-> Orbax params"),
    "eval": ("qwen_jax.evals.cli", "main", "benchmarks (run, fetch-data) and their sandbox"),
    "demo": ("qwen_jax.demo", "main", "the main job: data, vocab, train, export, sample"),
    "train": ("qwen_jax.train.cli", "train_main", "train from an experiment file"),
    "export": ("qwen_jax.train.export", "main", "training checkpoint -> params/HF export"),
    "compile": ("qwen_jax.train.cli", "compile_main", "AOT-compile a train step for a TPU slice"),
    "bench": ("qwen_jax.benchmark", "main", "benchmarks on design.md's bench shape (JSON lines)"),
    "generate": ("qwen_jax.infer.generate_cli", "main", "continue a prompt (KV-cache decoding)"),
    "chat": ("qwen_jax.infer.chat", "main", "interactive ChatML conversation"),
}


def _usage() -> str:
    lines = ["usage: qwen-jax <verb> [args...]", "", "verbs:"]
    width = max(len(v) for v in VERBS)
    lines += [f"  {verb.ljust(width)}  {help_}" for verb, (_, _, help_) in sorted(VERBS.items())]
    lines += ["", "`qwen-jax <verb> --help` describes each verb."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"qwen-jax: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = VERBS[verb]
    func = getattr(importlib.import_module(module_name), func_name)
    code = func(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
