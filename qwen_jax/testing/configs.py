"""Tiny configs derived from the real presets (design.md §4: `dataclasses.replace` of a preset)."""

from __future__ import annotations

from qwen_jax.model import config as C


def tiny_dispatch(**changes) -> C.QwenConfig:
    """QWEN_7B cut to 2 layers of 4 query / 2 kv heads (head dim 16) with per-layer windows
    (0, 7): the kernel-dispatch parity case (GQA + a traced window + packed rows)."""
    base = dict(num_heads=4, num_kv_heads=2, head_dim=16, num_layers=2, attn_windows=(0, 7))
    return C.tiny(C.QWEN_7B, **(base | changes))


def tiny_serving(**changes) -> C.QwenConfig:
    """The engine-level case: vocab 256, GQA (2 kv heads), windows (5, 0) so that both the
    window and a left-padding start bound a row's visible cache range."""
    base = dict(
        vocab_size=256,
        init_std=0.1,
        max_position_embeddings=128,
        num_kv_heads=2,
        attn_windows=(5, 0),
    )
    return C.tiny(**(base | changes))
