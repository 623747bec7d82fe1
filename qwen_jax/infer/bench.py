"""Inference figures for `qwen-jax bench --what prefill,decode` (design.md §5).

prefill_tokens_per_s: B x T prompt tokens written into a fresh KV cache, next-token logits out.
decode_tokens_per_s:  greedy generation of NEW tokens after a PROMPT-token prompt, batch B,
                      prefill included, as transformers' `generate` is timed by the peer.
At batch 1 decode is memory bound: every token reads all weights (the embedding table only one
row) and the KV cache. `decode_bandwidth_fraction` = measured tokens/s / (memory bandwidth /
bytes read per token), with the read bandwidth measured in the same run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_jax.bench_shapes import (
    DECODE_NEW,
    DECODE_PROMPT,
    PREFILL_BATCH,
    PREFILL_LEN,
    emit,
)
from qwen_jax.model.config import QwenConfig


def _engine(cfg: QwenConfig):
    from qwen_jax.infer.engine import Engine
    from qwen_jax.model.factory import create_model

    return Engine(create_model(cfg, seed=0), max_context=max(cfg.max_position_embeddings, 1024))


def _prompts(cfg: QwenConfig, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(cfg.vocab_size, 151_643), size=(batch, length)).tolist()


def _best_of(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth_gbs(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: bytes read / time of a jitted sum over a `mib` MiB fp32 array.

    Decode reads weights and writes almost nothing, so the bound is the read rate with every
    core reading (XLA splits the reduction over the cores, as it splits the decode matmuls).
    A single-threaded numpy copy (the first measure used here) reads half as fast on this
    machine, and the decode beat it, so it was no bound.
    """
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    t = _best_of(lambda: total(x).block_until_ready(), repeats)
    return x.nbytes / t / 1e9


def decode_bytes_per_token(cfg: QwenConfig, context: int, batch: int = 1) -> int:
    """Bytes one decode step must read: all weights but the embedding table (one row per
    sequence), plus K and V of `context` cached positions per sequence."""
    itemsize = np.dtype(cfg.param_dtype).itemsize
    weights = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (not cfg.tie_embeddings)
    embed_rows = batch * cfg.hidden_size
    cache = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    return itemsize * (weights + embed_rows + cache)


def bench_prefill(cfg: QwenConfig, repeats: int = 5, shape: str = "bench") -> dict:
    engine = _engine(cfg)
    prompts = _prompts(cfg, PREFILL_BATCH, PREFILL_LEN)

    def run():
        logits = engine.prefill(prompts)[0]
        jax.block_until_ready(logits)

    t = _best_of(run, repeats)
    return emit(
        "prefill_tokens_per_s",
        PREFILL_BATCH * PREFILL_LEN / t,
        "tokens/s",
        impl="qwen-jax",
        batch=PREFILL_BATCH,
        seq=PREFILL_LEN,
        seconds=t,
        shape=shape,
    )


def bench_decode(cfg: QwenConfig, batch: int, repeats: int = 2, shape: str = "bench") -> dict:
    engine = _engine(cfg)
    prompts = _prompts(cfg, batch, DECODE_PROMPT, seed=batch)

    def run():
        out = engine.generate(prompts, max_new_tokens=DECODE_NEW)
        assert all(len(o.token_ids) == DECODE_NEW for o in out)

    t = _best_of(run, repeats)
    rate = batch * DECODE_NEW / t
    row = emit(
        "decode_tokens_per_s",
        rate,
        "tokens/s",
        impl="qwen-jax",
        batch=batch,
        prompt=DECODE_PROMPT,
        new=DECODE_NEW,
        seconds=t,
        shape=shape,
    )
    if batch == 1:
        bw = memory_bandwidth_gbs()
        per_token = decode_bytes_per_token(cfg, DECODE_PROMPT + DECODE_NEW // 2)
        bound = bw * 1e9 / per_token
        emit("memory_bandwidth", bw, "GB/s", method="jitted XLA sum over 512 MiB, bytes read")
        emit(
            "decode_bandwidth_fraction",
            rate / bound,
            "fraction",
            impl="qwen-jax",
            batch=1,
            shape=shape,
            bytes_per_token=per_token,
            bound_tokens_per_s=bound,
        )
    return row
