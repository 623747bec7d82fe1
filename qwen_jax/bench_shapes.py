"""The benchmark shapes and workloads (design.md §5) as plain data, plus `emit`.

This module imports nothing from qwen_jax (nor jax): the library's bench (qwen_jax.benchmark,
qwen_jax.{train,infer}.bench) imports it, and the standalone transformers peers
(benchmarks/peer_*.py) read the same table without importing the library.

Shapes are `qwen_jax.model.config.QwenConfig` keyword arguments:
  * "bench": design.md's bench shape, Qwen-v1-shaped and small enough for 2 CPU cores (MHA,
    untied 151,936 vocab, fp32).
  * "qwen2.5-0.5b": Qwen2.5-0.5B's shape (24 layers, d 896, 14 query / 2 kv heads of 64, ffn
    4864, qkv bias, tied 151,936 vocab, rope base 1e6), random weights, fp32: decode on a real
    model's shape.
"""

from __future__ import annotations

import json

SHAPES: dict[str, dict] = {
    "bench": dict(
        vocab_size=151_936,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        ffn_size=1408,
        seq_length=2048,
        max_position_embeddings=4096,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151_936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        ffn_size=4864,
        qkv_bias=True,
        tie_embeddings=True,
        rope_base=1_000_000.0,
        seq_length=32_768,
        max_position_embeddings=32_768,
        model_type="qwen2",
    ),
}
# Workloads (design.md §5). Train and prefill run on "bench"; decode on every DECODE_SHAPES entry.
TRAIN_BATCH, TRAIN_LEN = 4, 256
PREFILL_BATCH, PREFILL_LEN = 4, 512
DECODE_PROMPT, DECODE_NEW, DECODE_BATCHES = 64, 128, (1, 8)
DECODE_SHAPES = ("bench", "qwen2.5-0.5b")


def emit(figure: str, value: float, unit: str, **extra) -> dict:
    """Print one figure as a JSON line and return it."""
    row = {"figure": figure, "value": value, "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row
