"""Input-pipeline throughput: packed tokens/s from `get_iterator` on this machine.

Builds the embedded demo corpus and its SentencePiece vocab into a work directory (or reuses
them), then times batches of the demo pretraining mixture (and, with --qwen, the same data
through the real Qwen tokenizer). Prints one JSON line per figure:
    {"figure": "input_tokens_per_s", "value": ..., "vocab": ..., ...}
Tokens counted = every position of every [batch, sequence_length] batch (packing fills rows,
so padding is ~0 for pretraining), the quantity a training step consumes. The timed batches
(default 1000 x 8 x 256 = 2M tokens) dwarf what read-ahead buffers hold after the warm-up.

    python benchmarks/input_pipeline.py [--workdir DIR] [--batches 1000] [--qwen]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _prepare(workdir: Path, vocab_size: int) -> tuple[Path, Path]:
    from qwen_jax.data.demo_corpus import build_demo
    from qwen_jax.tokenizer.spm import train_sentencepiece

    data = workdir / "data"
    if not (data / "manifest.json").exists():
        build_demo(data)
    model = workdir / "spm" / "tokenizer.model"
    if not model.exists():
        inputs = sorted(str(p) for p in data.glob("pretrain/*/train*.jsonl"))
        train_sentencepiece(inputs, workdir / "spm", vocab_size)
    return data, model


def measure(name, data_dir, vocab, seq_len, batch, batches, warmup) -> dict:
    from qwen_jax.data.pipeline import get_iterator

    t0 = time.perf_counter()
    it = get_iterator(
        name,
        split="train",
        sequence_length=seq_len,
        batch_size=batch,
        seed=0,
        data_dir=str(data_dir),
        vocab=str(vocab),
    )
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    learned = 0
    for _ in range(batches):
        learned += int(next(it)["decoder_loss_weights"].sum())
    dt = time.perf_counter() - t1
    return {
        "tokens_per_s": batches * batch * seq_len / dt,
        "learned_fraction": learned / (batches * batch * seq_len),
        "startup_s": first,
        "seconds": dt,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    p.add_argument("--mixture", default="demo_pretrain_v1")
    p.add_argument("--sequence-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--qwen", action="store_true", help="also measure with the Qwen tokenizer")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        data, model = _prepare(workdir, args.vocab_size)
        vocabs = [("sentencepiece", model)] + ([("qwen", "qwen")] if args.qwen else [])
        for label, vocab in vocabs:
            r = measure(
                args.mixture,
                data,
                vocab,
                args.sequence_length,
                args.batch_size,
                args.batches,
                args.warmup,
            )
            print(
                json.dumps(
                    {
                        "figure": "input_tokens_per_s",
                        "value": round(r["tokens_per_s"]),
                        "vocab": label,
                        "mixture": args.mixture,
                        "batch": [args.batch_size, args.sequence_length],
                        "learned_fraction": round(r["learned_fraction"], 4),
                        "startup_s": round(r["startup_s"], 2),
                        "seconds": round(r["seconds"], 2),
                        "cpus": os.cpu_count(),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
