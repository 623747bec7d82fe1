"""The inference peer: transformers `Qwen2ForCausalLM`, PyTorch eager on CPU, bench shape.

Same shape (qwen_jax.benchmark.BENCH_CONFIG), same workloads and the same JSON lines as
`qwen-jax bench --what prefill,decode`, with "impl": "transformers". Threads = CPU cores.

  python benchmarks/peer_infer.py [--what prefill,decode] [--steps N]

prefill: one forward over B x T prompt tokens filling a fresh cache, logits of the last
position only (`logits_to_keep=1`, what `generate` does). decode: `generate` greedy, exactly
NEW new tokens (min_new_tokens = max_new_tokens), prefill included.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_jax.benchmark import (
    BENCH_CONFIG,
    DECODE_BATCHES,
    DECODE_NEW,
    DECODE_PROMPT,
    PREFILL_BATCH,
    PREFILL_LEN,
    emit,
)
from qwen_jax.model.config import QwenConfig


def peer_model(cfg: QwenConfig) -> Qwen2ForCausalLM:
    """A randomly initialised transformers model of `cfg`'s shape (fp32, eval mode)."""
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base,
        rms_norm_eps=cfg.rms_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config).eval()


def _prompts(cfg: QwenConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(cfg.vocab_size, 151_643), size=(batch, length))
    return torch.tensor(ids, dtype=torch.long)


def _best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def peer_prefill(cfg: QwenConfig = BENCH_CONFIG, repeats: int = 5, model=None) -> dict:
    model = model or peer_model(cfg)
    ids = _prompts(cfg, PREFILL_BATCH, PREFILL_LEN)
    t = _best_of(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), repeats)
    return emit(
        "prefill_tokens_per_s",
        PREFILL_BATCH * PREFILL_LEN / t,
        "tokens/s",
        impl="transformers",
        batch=PREFILL_BATCH,
        seq=PREFILL_LEN,
        seconds=t,
        threads=torch.get_num_threads(),
    )


@torch.inference_mode()
def peer_decode(cfg: QwenConfig = BENCH_CONFIG, batch: int = 1, repeats: int = 2, model=None):
    model = model or peer_model(cfg)
    ids = _prompts(cfg, batch, DECODE_PROMPT, seed=batch)
    mask = torch.ones_like(ids)

    def run():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=DECODE_NEW,
            min_new_tokens=DECODE_NEW,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == DECODE_PROMPT + DECODE_NEW

    t = _best_of(run, repeats)
    return emit(
        "decode_tokens_per_s",
        batch * DECODE_NEW / t,
        "tokens/s",
        impl="transformers",
        batch=batch,
        prompt=DECODE_PROMPT,
        new=DECODE_NEW,
        seconds=t,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="prefill,decode")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (prefill)")
    args = p.parse_args()
    model = peer_model(BENCH_CONFIG)
    wanted = [w.strip() for w in args.what.split(",")]
    if "prefill" in wanted:
        peer_prefill(BENCH_CONFIG, args.steps, model=model)
    if "decode" in wanted:
        for b in DECODE_BATCHES:
            peer_decode(BENCH_CONFIG, b, model=model)


if __name__ == "__main__":
    main()
