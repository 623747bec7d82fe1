"""Document-level text stages run by corpus sources before tokenization (spec §4.1):
NFC normalization, exact dedup on a hash of normalized text, and rule-based quality filters.

These are pure functions of one document (dedup: of the document and the set of keys seen so
far). Sources apply them while reading, in storage order and *before* the resume point, so a
resumed run drops exactly the duplicates an uninterrupted run would have dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter

from qwen_jax.tokenizer.base import nfc

__all__ = ["QualityRules", "dedup_key", "nfc"]

_WS = re.compile(r"\s+")
_SYMBOL = re.compile(r"[^\w\s]|_")  # neither letter/digit nor whitespace
_NON_WS = re.compile(r"\S")


def dedup_key(text: str) -> bytes:
    """128-bit hash of the text after NFC, whitespace-run collapsing and stripping: copies that
    differ only in spacing or Unicode composition are duplicates."""
    norm = _WS.sub(" ", nfc(text)).strip()
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


@dataclasses.dataclass(frozen=True)
class QualityRules:
    """Rule-based quality filter; `check(text)` returns the name of the first failed rule.

    min_chars / max_chars: document length bounds (characters).
    max_symbol_ratio: fraction of non-whitespace characters that are neither letters nor digits
      (markup, boilerplate, mojibake score high; code legitimately sits near 0.3).
    max_dup_line_fraction: fraction of substantive lines (>= `min_line_chars` after stripping)
      that repeat an earlier line of the same document (Gopher-style repetition filter).
    """

    min_chars: int = 64
    max_chars: int = 1_000_000
    max_symbol_ratio: float = 0.3
    max_dup_line_fraction: float = 0.3
    min_line_chars: int = 12

    def check(self, text: str) -> str | None:
        n = len(text)
        if n < self.min_chars:
            return "too_short"
        if n > self.max_chars:
            return "too_long"
        visible = len(_NON_WS.findall(text))
        if visible and len(_SYMBOL.findall(text)) / visible > self.max_symbol_ratio:
            return "symbol_ratio"
        lines = [
            s for s in (line.strip() for line in text.splitlines()) if len(s) >= self.min_line_chars
        ]
        if lines:
            dups = sum(c - 1 for c in Counter(lines).values())
            if dups / len(lines) > self.max_dup_line_fraction:
                return "repeated_lines"
        return None
