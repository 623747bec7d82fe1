"""The demo corpus and a small SentencePiece vocab: what the trainer and eval tests train on.

tests/conftest.py wraps `build_demo_assets` in a session fixture (`demo_assets`), built once per
session into a temporary directory (about 15 s).
"""

from __future__ import annotations

from pathlib import Path


def build_demo_assets(root: Path, vocab_size: int = 1024) -> tuple[Path, Path]:
    """Build the demo corpus under root/data and a BPE vocab under root/tokenizer.

    Returns (data_dir, sentencepiece model path).
    """
    from qwen_jax.data.demo_corpus import build_demo
    from qwen_jax.tokenizer import train_sentencepiece

    build_demo(root / "data")
    inputs = sorted(str(f) for f in (root / "data" / "pretrain").glob("*/train-*"))
    spm = train_sentencepiece(inputs, root / "tokenizer", vocab_size, max_chars=2_000_000)
    return root / "data", Path(spm)
