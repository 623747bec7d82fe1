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
