"""The benchmarks run end to end on a tiny shape, ours and the transformers peer, and emit rows
that `benchmarks/run.py` pairs by (figure, batch, shape). Nothing is timed here: figures are
measured by `python -m benchmarks.run` on a quiet machine (design.md §5)."""

from __future__ import annotations

import pytest

from qwen_jax.bench_shapes import SHAPES
from qwen_jax.model.config import QwenConfig

# The bench shape cut down: same kind of model (untied, MHA), tiny widths and vocabulary.
TINY = {
    **SHAPES["bench"],
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 4,
    "head_dim": 16,
    "ffn_size": 128,
}


def _key(row: dict) -> tuple:
    from benchmarks.run import _key as run_key

    return run_key(row)


@pytest.mark.slow
def test_ours_and_the_peer_emit_matching_rows():
    pytest.importorskip("torch")
    from benchmarks.peer_infer import peer_decode, peer_prefill
    from benchmarks.peer_train import peer_train
    from qwen_jax.infer.bench import bench_decode, bench_prefill
    from qwen_jax.train.bench import bench_train

    cfg = QwenConfig(**TINY)
    ours = [
        bench_train(cfg, steps=1),
        bench_prefill(cfg, repeats=1),
        bench_decode(cfg, batch=2, repeats=1),
    ]
    peer = [
        peer_train(TINY, steps=1),
        peer_prefill(TINY, repeats=1),
        peer_decode(TINY, batch=2, repeats=1),
    ]
    assert [_key(r) for r in ours] == [_key(r) for r in peer]
    for row in ours + peer:
        assert row["value"] > 0, row


@pytest.mark.slow
def test_sft_full_and_lora_ours_and_trl_emit_matching_rows():
    """Chat SFT, all weights and LoRA, ours and TRL's SFTTrainer (+ PEFT): the figures both
    sides report pair up, are positive, and LoRA keeps less optimizer state than full on each."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from benchmarks.peer_sft import peer_sft
    from benchmarks.run import lora_vs_full
    from qwen_jax.train.bench import bench_sft

    cfg = QwenConfig(**TINY)
    ours = bench_sft(cfg, steps=1) + bench_sft(cfg, steps=1, lora=True)
    peer = peer_sft(TINY, steps=1) + peer_sft(TINY, steps=1, lora=True)
    for row in ours + peer:
        assert row["value"] > 0, row
    # Every peer figure has ours beside it (ours adds MFU and the compiled step's bytes).
    assert {_key(r) for r in peer} <= {_key(r) for r in ours}
    ratios = {(r["figure"], r["impl"]): r["value"] for r in lora_vs_full(ours + peer)}
    for impl in ("qwen-jax", "trl"):
        assert 0 < ratios["lora_vs_full_opt_state_bytes", impl] < 1, ratios
        assert ("lora_vs_full_tokens_per_s", impl) in ratios
        assert ("lora_vs_full_peak_rss_bytes", impl) in ratios
