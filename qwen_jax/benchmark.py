"""`qwen-jax bench --what {train,prefill,decode}`: one JSON object per figure on stdout.

The bench shape is design.md §5's: Qwen-v1-shaped, small enough for 2 CPU cores. Absolute numbers
on shared machines are noise; `benchmarks/run.py` measures the transformers peer in the same run
and reports ratios.
"""

from __future__ import annotations

import argparse
import json
import sys

from qwen_jax.model.config import QwenConfig

BENCH_CONFIG = QwenConfig(
    vocab_size=151_936,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    head_dim=64,
    ffn_size=1408,
    seq_length=2048,
    max_position_embeddings=4096,
)
# Workloads (design.md §5).
TRAIN_BATCH, TRAIN_LEN = 4, 256
PREFILL_BATCH, PREFILL_LEN = 4, 512
DECODE_PROMPT, DECODE_NEW, DECODE_BATCHES = 64, 128, (1, 8)


def emit(figure: str, value: float, unit: str, **extra) -> dict:
    """Print one figure as a JSON line and return it."""
    row = {"figure": figure, "value": value, "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row


def _runners():
    # Imported lazily: each workload pulls in only what it needs.
    def train(args):
        from qwen_jax.train.bench import bench_train

        return bench_train(BENCH_CONFIG, steps=args.steps)

    def prefill(args):
        from qwen_jax.infer.bench import bench_prefill

        return bench_prefill(BENCH_CONFIG, repeats=args.steps)

    def decode(args):
        from qwen_jax.infer.bench import bench_decode

        return [bench_decode(BENCH_CONFIG, batch=b) for b in DECODE_BATCHES]

    return {"train": train, "prefill": prefill, "decode": decode}


def main(argv: list[str]) -> int:
    runners = _runners()
    p = argparse.ArgumentParser(prog="qwen-jax bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="train,prefill,decode", help="comma list of workloads")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions per workload")
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.what.split(",") if w.strip()]
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
