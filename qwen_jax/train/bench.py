"""Training throughput on the bench shape: one jitted AdamW+clip step, timed after warm-up."""

from __future__ import annotations

import time

import jax
import numpy as np

from qwen_jax.bench_shapes import TRAIN_BATCH, TRAIN_LEN, emit
from qwen_jax.model.config import QwenConfig
from qwen_jax.sharding import MeshConfig, make_mesh
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.metrics import measured_cpu_matmul_peak
from qwen_jax.train.objectives import ObjectiveConfig
from qwen_jax.train.optim import OptimConfig
from qwen_jax.train.step import build_steps


def bench_train(cfg: QwenConfig, steps: int = 5) -> dict:
    """Tokens/s and MFU of the full train step (forward, backward, clip, AdamW) on one device."""
    config = TrainConfig(
        model_preset="tiny",
        optim=OptimConfig(peak_lr=1e-4, warmup_steps=1, total_steps=1000),
        objective=ObjectiveConfig(loss_chunk=TRAIN_LEN),
        mesh=MeshConfig(1, 1, 1),
    )
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    built = build_steps(config, cfg, mesh)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(TRAIN_BATCH, TRAIN_LEN + 1)).astype(np.int32)
    host = {
        "decoder_input_tokens": toks[:, :-1],
        "decoder_target_tokens": toks[:, 1:],
        "decoder_loss_weights": np.ones((TRAIN_BATCH, TRAIN_LEN), np.int32),
        "decoder_segment_ids": np.ones((TRAIN_BATCH, TRAIN_LEN), np.int32),
        "decoder_positions": np.tile(np.arange(TRAIN_LEN, dtype=np.int32), (TRAIN_BATCH, 1)),
    }
    with jax.set_mesh(mesh):
        batch = built.device_batch(host)
        state = built.init()
        for _ in range(2):  # compile + one warm step
            state, metrics = built.train(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = built.train(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = TRAIN_BATCH * TRAIN_LEN
    peak = measured_cpu_matmul_peak()
    mfu = cfg.flops_per_token(TRAIN_LEN) * tokens / step_s / peak
    row = emit(
        "train_tokens_per_s",
        tokens / step_s,
        "tokens/s",
        impl="qwen-jax",
        step_ms=1000 * step_s,
        batch=TRAIN_BATCH,
        seq=TRAIN_LEN,
    )
    emit(
        "train_mfu", mfu, "fraction of measured fp32 matmul peak", impl="qwen-jax", peak_flops=peak
    )
    return row
