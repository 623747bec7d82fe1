"""Shared fixtures for trainer tests: the demo corpus and a small SentencePiece vocab, built once
per session into a temporary directory (about 15 s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> tuple[Path, Path]:
    from qwen_jax.data.demo_corpus import build_demo
    from qwen_jax.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("demo_assets")
    build_demo(root / "data")
    inputs = sorted(str(f) for f in (root / "data" / "pretrain").glob("*/train-*"))
    spm = train_sentencepiece(inputs, root / "tokenizer", 1024, max_chars=2_000_000)
    return root / "data", Path(spm)
