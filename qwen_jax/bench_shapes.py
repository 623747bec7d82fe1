"""The benchmark shapes and workloads (design.md §5) as plain data, plus `emit` and the RSS probe.

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

import ctypes
import json
from pathlib import Path

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
# Chat SFT (issue 13), full and LoRA, on "bench" with the train batch (TRAIN_BATCH x TRAIN_LEN):
# each row packs TRAIN_LEN // SFT_CONVERSATION conversations (attention never crosses them) and
# the loss is on the second half of each (the assistant's response), so half the weights are set.
SFT_CONVERSATION = 64
# LoRA: the official Qwen recipe (rank 64, alpha 16, dropout 0.05) on every dense projection,
# named as HF Qwen2 / PEFT name them (qwen_jax.model.lora takes these names as aliases).
LORA = dict(
    rank=64,
    alpha=16.0,
    dropout=0.05,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"),
)


def emit(figure: str, value: float, unit: str, **extra) -> dict:
    """Print one figure as a JSON line and return it."""
    row = {"figure": figure, "value": value, "unit": unit, **extra}
    print(json.dumps(row), flush=True)
    return row


# How both sides measure a training workload's peak memory on CPU (Linux /proc), in one process
# per workload: the baseline is the process's resident set before the model is built; after the
# warm-up steps the heap is trimmed and the kernel's high-water mark reset (clear_refs 5), so
# set-up and compile-time transients do not count; the figure is the high-water mark over the
# timed steps minus the baseline: model, gradients, optimizer state, activations, allocator
# caches and (ours) the compiled executables.
PEAK_RSS_METHOD = (
    "VmHWM over the timed steps (trimmed, reset after warm-up) - VmRSS before the model"
)


def _trim() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim): memory freed stops counting."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_bytes(key: str) -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields[key].split()[0]) * 1024


def baseline_rss() -> int:
    """This process's resident bytes, freed heap trimmed first (PEAK_RSS_METHOD's baseline)."""
    _trim()
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Trim the heap, then set this process's RSS high-water mark to its current RSS (Linux
    >= 4.0): what set-up and compilation allocated and freed stops counting."""
    _trim()
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes (since the last `reset_peak_rss`)."""
    return _status_bytes("VmHWM")
