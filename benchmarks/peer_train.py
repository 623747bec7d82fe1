"""The training peer: transformers `Qwen2ForCausalLM`, PyTorch eager on CPU, bench shape.

Same shape (qwen_jax.benchmark.BENCH_CONFIG), same workload (batch 4 x 256, next-token CE,
global-norm clip 1.0, AdamW (0.9, 0.95, 1e-8, wd 0.1)), fp32, threads = CPU cores, and the same
JSON line as `qwen-jax bench --what train`, with "impl": "transformers".

  python benchmarks/peer_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.peer_infer import peer_model
from qwen_jax.benchmark import BENCH_CONFIG, TRAIN_BATCH, TRAIN_LEN, emit
from qwen_jax.model.config import QwenConfig


def peer_train(cfg: QwenConfig, steps: int = 5) -> dict:
    model = peer_model(cfg).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, cfg.vocab_size, size=(TRAIN_BATCH, TRAIN_LEN + 1)))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    return emit(
        "train_tokens_per_s",
        TRAIN_BATCH * TRAIN_LEN / step_s,
        "tokens/s",
        impl="transformers",
        step_ms=1000 * step_s,
        batch=TRAIN_BATCH,
        seq=TRAIN_LEN,
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    peer_train(BENCH_CONFIG, p.parse_args().steps)
