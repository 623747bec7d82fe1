"""`qwen-jax bench --what {train,sft,sft_lora,prefill,decode}`: one JSON object per figure.

Shapes and workloads are the table in qwen_jax.bench_shapes: design.md §5's bench shape for
every figure, and Qwen2.5-0.5B's shape for decode too (`--shapes`). sft and sft_lora (chat SFT,
all weights or LoRA adapters) also print their optimizer-state and peak memory: run each in its
own process (benchmarks/run.py does) for the RSS figure to be the workload's. Absolute numbers
on shared machines are noise; `benchmarks/run.py` measures the transformers peer in the same run
and reports ratios.
"""

from __future__ import annotations

import argparse
import sys

from qwen_jax.bench_shapes import (  # noqa: F401  (re-exported for the bench modules)
    DECODE_BATCHES,
    DECODE_NEW,
    DECODE_PROMPT,
    DECODE_SHAPES,
    PREFILL_BATCH,
    PREFILL_LEN,
    SHAPES,
    TRAIN_BATCH,
    TRAIN_LEN,
    emit,
)
from qwen_jax.model.config import QwenConfig


def bench_config(shape: str) -> QwenConfig:
    """The QwenConfig of a named bench shape (qwen_jax.bench_shapes.SHAPES)."""
    if shape not in SHAPES:
        raise KeyError(f"unknown bench shape {shape!r}; choose from {sorted(SHAPES)}")
    return QwenConfig(**SHAPES[shape])


BENCH_CONFIG = bench_config("bench")


def _runners():
    # Imported lazily: each workload pulls in only what it needs.
    def train(args):
        from qwen_jax.train.bench import bench_train

        return bench_train(BENCH_CONFIG, steps=args.steps)

    def sft(args):
        from qwen_jax.train.bench import bench_sft

        return bench_sft(BENCH_CONFIG, steps=args.steps)

    def sft_lora(args):
        from qwen_jax.train.bench import bench_sft

        return bench_sft(BENCH_CONFIG, steps=args.steps, lora=True)

    def prefill(args):
        from qwen_jax.infer.bench import bench_prefill

        return bench_prefill(BENCH_CONFIG, repeats=args.steps)

    def decode(args):
        from qwen_jax.infer.bench import bench_decode

        # Decode is timed as the best of min(steps, 2) whole generations (each is 128 steps).
        repeats = min(args.steps, 2)
        return [
            bench_decode(bench_config(s), batch=b, repeats=repeats, shape=s)
            for s in args.shapes.split(",")
            for b in DECODE_BATCHES
        ]

    return {"train": train, "sft": sft, "sft_lora": sft_lora, "prefill": prefill, "decode": decode}


def main(argv: list[str]) -> int:
    runners = _runners()
    p = argparse.ArgumentParser(prog="qwen-jax bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--what", default="train,sft,sft_lora,prefill,decode", help="comma list of workloads"
    )
    p.add_argument("--steps", type=int, default=5, help="timed repetitions per workload")
    p.add_argument(
        "--shapes",
        default=",".join(DECODE_SHAPES),
        help=f"comma list of decode shapes, from {sorted(SHAPES)}",
    )
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.what.split(",") if w.strip()]
    bad_shapes = [s for s in args.shapes.split(",") if s not in SHAPES]
    if bad_shapes:
        print(f"qwen-jax bench: unknown shape(s) {bad_shapes}; choose from {sorted(SHAPES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    unknown = [w for w in wanted if w not in runners]
    if unknown:
        print(
            f"qwen-jax bench: unknown workload(s) {unknown}; choose from {sorted(runners)}",
            file=sys.stderr,
        )
        return 2
    for w in wanted:
        runners[w](args)
    return 0
