"""The training peer: transformers `Qwen2ForCausalLM`, PyTorch eager on CPU, bench shape.

Same shape (the "bench" row of qwen_jax/bench_shapes.py, read as a plain file: the peer never
imports qwen_jax), same workload (batch 4 x 256, next-token CE,
global-norm clip 1.0, AdamW (0.9, 0.95, 1e-8, wd 0.1)), fp32, threads = CPU cores, and the same
JSON line as `qwen-jax bench --what train`, with "impl": "transformers".

  python benchmarks/peer_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.peer_infer import _TABLE, BENCH_SHAPE, emit, peer_model

TRAIN_BATCH, TRAIN_LEN = _TABLE["TRAIN_BATCH"], _TABLE["TRAIN_LEN"]


def peer_train(shape: dict, steps: int = 5) -> dict:
    """Median step time of the full train step on a bench shape (QwenConfig keywords)."""
    model = peer_model(shape).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, shape["vocab_size"], size=(TRAIN_BATCH, TRAIN_LEN + 1)))
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
    peer_train(BENCH_SHAPE, p.parse_args().steps)
