"""Training throughput on the bench shape: one jitted step (AdamW + clip), timed after warm-up.

Two workloads share the one train step (train/step.py build_steps) and the LM objective:
  * train: pretraining rows (every token weighted);
  * sft / sft_lora: chat SFT rows (bench_shapes: conversations packed SFT_CONVERSATION tokens
    apart, the loss on each one's second half), all weights trained or LoRA adapters on a frozen
    base (bench_shapes.LORA); with memory figures, the issue's LoRA-vs-full comparison.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from qwen_jax.bench_shapes import (
    LORA,
    PEAK_RSS_METHOD,
    SFT_CONVERSATION,
    TRAIN_BATCH,
    TRAIN_LEN,
    baseline_rss,
    emit,
    peak_rss,
    reset_peak_rss,
)
from qwen_jax.model.config import QwenConfig
from qwen_jax.sharding import MeshConfig, make_mesh
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.metrics import measured_cpu_matmul_peak
from qwen_jax.train.objectives import ObjectiveConfig
from qwen_jax.train.optim import OptimConfig
from qwen_jax.train.step import build_steps


def _pretrain_batch(vocab: int) -> dict[str, np.ndarray]:
    """TRAIN_BATCH x TRAIN_LEN random tokens, one sequence per row, every target weighted."""
    toks = np.random.default_rng(0).integers(0, vocab, size=(TRAIN_BATCH, TRAIN_LEN + 1))
    toks = toks.astype(np.int32)
    return {
        "decoder_input_tokens": toks[:, :-1],
        "decoder_target_tokens": toks[:, 1:],
        "decoder_loss_weights": np.ones((TRAIN_BATCH, TRAIN_LEN), np.int32),
        "decoder_segment_ids": np.ones((TRAIN_BATCH, TRAIN_LEN), np.int32),
        "decoder_positions": np.tile(np.arange(TRAIN_LEN, dtype=np.int32), (TRAIN_BATCH, 1)),
    }


def _sft_batch(vocab: int) -> dict[str, np.ndarray]:
    """TRAIN_BATCH x TRAIN_LEN packed SFT rows: TRAIN_LEN // SFT_CONVERSATION conversations per
    row (segment ids 1.., positions restarting), targets weighted on each one's second half (the
    response; the ChatML mask sets about that fraction on real chats)."""
    n = TRAIN_LEN // SFT_CONVERSATION
    rng = np.random.default_rng(0)
    toks = rng.integers(0, vocab, size=(TRAIN_BATCH, n, SFT_CONVERSATION + 1)).astype(np.int32)
    in_conv = np.arange(SFT_CONVERSATION, dtype=np.int32)
    rows = (TRAIN_BATCH, TRAIN_LEN)
    return {
        "decoder_input_tokens": toks[..., :-1].reshape(rows),
        "decoder_target_tokens": toks[..., 1:].reshape(rows),
        "decoder_loss_weights": np.broadcast_to(
            (in_conv >= SFT_CONVERSATION // 2).astype(np.int32), (TRAIN_BATCH, n, SFT_CONVERSATION)
        ).reshape(rows),
        "decoder_segment_ids": np.repeat(np.arange(1, n + 1, dtype=np.int32), SFT_CONVERSATION)[
            None
        ].repeat(TRAIN_BATCH, 0),
        "decoder_positions": np.tile(in_conv, (TRAIN_BATCH, n)),
    }


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _run_steps(cfg: QwenConfig, host: dict[str, np.ndarray], steps: int) -> dict:
    """Build, compile, warm up and time the train step of `cfg` on `host` (one device).

    Returns step_s (median), opt_state_bytes and trained_params (exact, from the state),
    step_bytes (the compiled step's argument + temp bytes, XLA memory_analysis) and
    peak_rss_bytes (bench_shapes.PEAK_RSS_METHOD).
    """
    baseline = baseline_rss()
    config = TrainConfig(
        model_preset="tiny",
        optim=OptimConfig(peak_lr=1e-4, warmup_steps=1, total_steps=1000),
        objective=ObjectiveConfig(loss_chunk=TRAIN_LEN),
        mesh=MeshConfig(1, 1, 1),
    )
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    built = build_steps(config, cfg, mesh)
    with jax.set_mesh(mesh):
        batch = built.device_batch(host)
        compiled = built.train.lower(built.sharded_abstract_state(), batch).compile()
        mem = compiled.memory_analysis()
        state = built.init()
        for _ in range(2):  # compile + one warm step
            state, metrics = built.train(state, batch)
        jax.block_until_ready(metrics)
        reset_peak_rss()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, metrics = built.train(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        peak = peak_rss() - baseline
    return {
        "step_s": float(np.median(times)),
        "opt_state_bytes": _nbytes(state["opt_state"]),
        "trained_params": sum(x.size for x in jax.tree.leaves(state["params"])),
        "step_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes if mem else None,
        "peak_rss_bytes": peak,
    }


def bench_train(cfg: QwenConfig, steps: int = 5) -> dict:
    """Tokens/s and MFU of the full train step (forward, backward, clip, AdamW) on one device."""
    step_s = _run_steps(cfg, _pretrain_batch(cfg.vocab_size), steps)["step_s"]
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


def lora_config(cfg: QwenConfig) -> QwenConfig:
    """`cfg` with bench_shapes.LORA's adapters (the base frozen, fp32)."""
    return cfg.replace(
        lora_rank=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        lora_targets=tuple(LORA["targets"]),
    )


def step_flops_per_token(cfg: QwenConfig, seq_len: int, trained_params: int) -> float:
    """FLOPs per token of the step as run: with LoRA the frozen weights get no weight gradient,
    so each base matmul costs 2 (forward) + 2 (input gradient) per weight instead of 6, and each
    adapter weight 6; attention's score and value products keep their 3 passes."""
    if not cfg.lora_rank:
        return cfg.flops_per_token(seq_len)
    base = cfg.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0)
    dense = base.flops_per_token(0)  # 6 x the matmul weights
    return 4 / 6 * dense + (base.flops_per_token(seq_len) - dense) + 6.0 * trained_params


def bench_sft(cfg: QwenConfig, steps: int = 5, lora: bool = False) -> list[dict]:
    """Chat SFT on one device, all weights trained (figures "sft_*") or LoRA ("sft_lora_*"):
    tokens/s, MFU, optimizer-state bytes, the compiled step's bytes and the peak RSS growth.
    Run it in a fresh process per variant: the RSS figure counts what the process allocates."""
    name = "sft_lora" if lora else "sft"
    model_cfg = lora_config(cfg) if lora else cfg
    r = _run_steps(model_cfg, _sft_batch(cfg.vocab_size), steps)
    tokens = TRAIN_BATCH * TRAIN_LEN
    # Attention counted over the conversations (the useful causal triangle), as train counts it
    # over its rows.
    flops = step_flops_per_token(model_cfg, SFT_CONVERSATION, r["trained_params"])
    peak = measured_cpu_matmul_peak()
    common = dict(impl="qwen-jax", batch=TRAIN_BATCH, seq=TRAIN_LEN, packing=True)
    if lora:
        common.update(lora_rank=LORA["rank"], lora_targets=list(LORA["targets"]))
    return [
        emit(
            f"{name}_tokens_per_s",
            tokens / r["step_s"],
            "tokens/s",
            step_ms=1000 * r["step_s"],
            trained_params=r["trained_params"],
            **common,
        ),
        emit(
            f"{name}_mfu",
            flops * tokens / r["step_s"] / peak,
            "fraction of measured fp32 matmul peak",
            flops_per_token=flops,
            peak_flops=peak,
            **common,
        ),
        emit(
            f"{name}_opt_state_bytes",
            r["opt_state_bytes"],
            "bytes",
            method="sum of the optimizer state's arrays",
            **common,
        ),
        emit(
            f"{name}_peak_rss_bytes", r["peak_rss_bytes"], "bytes", method=PEAK_RSS_METHOD, **common
        ),
        emit(
            f"{name}_step_bytes",
            r["step_bytes"],
            "bytes",
            method="XLA memory_analysis of the compiled step: argument + temp bytes",
            **common,
        ),
    ]
