"""Qwen v1 tokenizer: byte-level BPE over a `qwen.tiktoken` ranks file (spec §3).

151,643 regular tokens (ids 0..151642, one `base64(bytes) rank` line each), then
`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645 and `<|extra_0..204|>`.
Pre-tokenization is cl100k's regex with `\\p{N}` instead of `\\p{N}{1,3}`: digits split one per
token. Encoding runs in tiktoken's Rust core; we add NFC and Qwen's `allowed_special` contract.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Sequence

import tiktoken

from qwen_jax.tokenizer.assets import sha256_file
from qwen_jax.tokenizer.base import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN_SPECIAL_TOKENS,
    AllowedSpecial,
    nfc,
    resolve_allowed,
)

# Qwen's PAT_STR, verbatim (spec §3).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `.tiktoken` file, checking that ranks are exactly 0..n-1 (else a clear error)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a `base64 rank` line ({e})") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


class QwenTiktokenizer:
    """The Qwen v1 tokenizer (see module docstring); implements `base.Tokenizer`."""

    def __init__(self, path: str | os.PathLike):
        ranks = read_tiktoken_ranks(path)
        n = len(ranks)
        self.special_ids = {tok: n + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self._id_to_special = {i: t.encode() for t, i in self.special_ids.items()}
        self.vocab_size = n + len(QWEN_SPECIAL_TOKENS)  # 151,851 for the real file
        self.eod_id = self.special_ids[ENDOFTEXT]
        self.im_start_id = self.special_ids[IM_START]
        self.im_end_id = self.special_ids[IM_END]
        self.pad_id = self.eod_id  # Qwen's configs pad with <|endoftext|>
        self.name = f"qwen-tiktoken:{sha256_file(path)[:12]}"

    def encode(self, text: str, *, allowed_special: AllowedSpecial = "all") -> list[int]:
        allowed = resolve_allowed(allowed_special, self.special_ids)
        # disallowed_special=(): specials outside `allowed` are plain text, never an error.
        return self._enc.encode(nfc(text), allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        allowed = resolve_allowed(allowed_special, self.special_ids)
        texts = [nfc(t) for t in texts]
        if not allowed:
            return self._enc.encode_ordinary_batch(texts, num_threads=4)
        return self._enc.encode_batch(
            texts, num_threads=4, allowed_special=allowed, disallowed_special=()
        )

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except KeyError:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            ) from None

    def id_to_piece(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
