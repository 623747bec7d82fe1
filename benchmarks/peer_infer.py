"""The inference peer: transformers `Qwen2ForCausalLM`, PyTorch eager on CPU, the bench shapes.

Same shapes and workloads (the table in qwen_jax/bench_shapes.py), same JSON lines as
`qwen-jax bench --what prefill,decode`, with "impl": "transformers". Threads = CPU cores.
Standalone: it never imports qwen_jax; it reads bench_shapes.py as a plain file (that module
imports nothing), so both sides run one table.

  python benchmarks/peer_infer.py [--what prefill,decode] [--steps N] [--shapes a,b]

prefill: one forward over B x T prompt tokens filling a fresh cache, logits of the last
position only (`logits_to_keep=1`, what `generate` does). decode: `generate` greedy, exactly
NEW new tokens (min_new_tokens = max_new_tokens), prefill included.
"""

from __future__ import annotations

import argparse
import os
import runpy
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

_TABLE = runpy.run_path(str(Path(__file__).resolve().parent.parent / "qwen_jax/bench_shapes.py"))
SHAPES, emit = _TABLE["SHAPES"], _TABLE["emit"]
PREFILL_BATCH, PREFILL_LEN = _TABLE["PREFILL_BATCH"], _TABLE["PREFILL_LEN"]
DECODE_PROMPT, DECODE_NEW = _TABLE["DECODE_PROMPT"], _TABLE["DECODE_NEW"]
DECODE_BATCHES, DECODE_SHAPES = _TABLE["DECODE_BATCHES"], _TABLE["DECODE_SHAPES"]
BENCH_SHAPE = SHAPES["bench"]


def peer_model(shape: dict) -> Qwen2ForCausalLM:
    """A randomly initialised transformers model of a bench shape (QwenConfig keywords; fp32,
    eval mode). Qwen2 always has q/k/v biases, as every bench shape does."""
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["ffn_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=shape.get("tie_embeddings", False),
        rope_theta=shape.get("rope_base", 10_000.0),
        rms_norm_eps=shape.get("rms_eps", 1e-6),
        max_position_embeddings=shape["max_position_embeddings"],
        use_sliding_window=False,
    )
    return Qwen2ForCausalLM(config).eval()


def _prompts(shape: dict, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, min(shape["vocab_size"], 151_643), size=(batch, length))
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
def peer_prefill(shape: dict = BENCH_SHAPE, repeats: int = 5, model=None, name="bench") -> dict:
    model = model or peer_model(shape)
    ids = _prompts(shape, PREFILL_BATCH, PREFILL_LEN)
    t = _best_of(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), repeats)
    return emit(
        "prefill_tokens_per_s",
        PREFILL_BATCH * PREFILL_LEN / t,
        "tokens/s",
        impl="transformers",
        batch=PREFILL_BATCH,
        seq=PREFILL_LEN,
        seconds=t,
        shape=name,
        threads=torch.get_num_threads(),
    )


@torch.inference_mode()
def peer_decode(
    shape: dict = BENCH_SHAPE, batch: int = 1, repeats: int = 2, model=None, name="bench"
) -> dict:
    model = model or peer_model(shape)
    ids = _prompts(shape, batch, DECODE_PROMPT, seed=batch)
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
        shape=name,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="prefill,decode")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (prefill)")
    p.add_argument("--shapes", default=",".join(DECODE_SHAPES), help="decode shapes")
    args = p.parse_args()
    wanted = [w.strip() for w in args.what.split(",")]
    if "prefill" in wanted:
        peer_prefill(BENCH_SHAPE, args.steps)
    if "decode" in wanted:
        # As `qwen-jax bench`: best of min(steps, 2) whole generations.
        for name in args.shapes.split(","):
            model = peer_model(SHAPES[name])
            for b in DECODE_BATCHES:
                peer_decode(SHAPES[name], b, min(args.steps, 2), model=model, name=name)


if __name__ == "__main__":
    main()
