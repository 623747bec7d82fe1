"""Packed batches: several documents per row, positions restarting per document, padding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def packed_batch(b: int, t: int, vocab: int, seed: int = 0):
    """Rows of 1-3 documents with per-document positions and trailing padding (segment 0).

    Returns (tokens [B, T], positions [B, T], segment_ids [B, T]) as jax arrays.
    """
    rng = np.random.default_rng(seed)
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for row in range(b):
        used = t - int(rng.integers(0, t // 4))
        cuts = [
            0,
            *sorted(rng.choice(np.arange(2, used - 1), int(rng.integers(0, 3)), False)),
            used,
        ]
        for doc, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            seg[row, lo:hi] = doc
            pos[row, lo:hi] = np.arange(hi - lo)
    tokens = rng.integers(0, vocab, size=(b, t))
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def packed_segments(b: int, t: int, rng) -> np.ndarray:
    """1-4 packed documents per row, numbered from 1; rows alternate right / left padding."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        pad = int(rng.integers(1, t // 8))
        docs = int(rng.integers(1, 5))
        cuts = np.sort(rng.choice(np.arange(1, t - pad), docs - 1, replace=False))
        ids = np.searchsorted(cuts, np.arange(t - pad), side="right") + 1
        if row % 2:
            seg[row, pad:] = ids  # left padding (prefill of a left-padded batch)
        else:
            seg[row, : t - pad] = ids
    return seg
