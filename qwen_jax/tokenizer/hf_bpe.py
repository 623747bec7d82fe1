"""Qwen1.5/2/2.5 tokenizer files: `tokenizer.json`, or `vocab.json` + `merges.txt`.

These share Qwen v1's byte-level BPE (same ranks, same pre-tokenization regex, NFC); they
differ in the added tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` keep ids
151643..151645, then model-specific ones). Ordinary text is encoded by the Hugging Face
`tokenizers` package (Rust) with every added token *removed* from its table, so that the
`allowed_special` contract of `base.py` is enforced in one place (our `SpecialSplitter`) rather
than by `tokenizers`' own rules, which always match non-"special" added tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from qwen_jax.tokenizer.base import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    AllowedSpecial,
    SpecialSplitter,
    decode_bytes,
    nfc,
    resolve_allowed,
    splice_specials,
)
from qwen_jax.tokenizer.qwen_tiktoken import QWEN_PATTERN


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character table used by byte-level BPE files.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards in
    byte order.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


class HFBPETokenizer:
    """Qwen2-family byte-level BPE from Hugging Face files; implements `base.Tokenizer`."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer  # only this backend needs it

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path
        digest = hashlib.sha256()
        if path.is_file():  # tokenizer.json
            spec = json.loads(path.read_text(encoding="utf-8"))
            digest.update(path.read_bytes())
            added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
            spec["added_tokens"] = []
            self._hf = _HFTokenizer.from_str(json.dumps(spec))
        else:  # a directory with vocab.json + merges.txt (+ optional tokenizer_config.json)
            vocab, merges = path / "vocab.json", path / "merges.txt"
            for f in (vocab, merges):
                if not f.exists():
                    raise FileNotFoundError(f"{path}: no tokenizer.json and no {f.name}")
                digest.update(f.read_bytes())
            self._hf = _build_from_vocab_merges(vocab, merges)
            added = _added_tokens_from_config(path / "tokenizer_config.json")
            if not added:  # Qwen2 defaults: the three ChatML specials right after the BPE ranks
                n = self._hf.get_vocab_size(with_added_tokens=False)
                added = {ENDOFTEXT: n, IM_START: n + 1, IM_END: n + 2}
        if ENDOFTEXT not in added:
            raise ValueError(f"{path}: the added tokens lack {ENDOFTEXT}; not a Qwen tokenizer")
        self.special_ids = added
        self._splitter = SpecialSplitter(added)
        table = self._hf.get_vocab(with_added_tokens=False)
        self._bytes: dict[int, bytes] = {
            i: bytes(_UNICODE_TO_BYTE[c] for c in piece) for piece, i in table.items()
        }
        self._bytes.update({i: t.encode() for t, i in added.items()})
        self.vocab_size = max(self._bytes) + 1
        self.eod_id = added[ENDOFTEXT]
        self.im_start_id = added.get(IM_START)
        self.im_end_id = added.get(IM_END)
        self.pad_id = self.eod_id
        self.name = f"hf-bpe:{digest.hexdigest()[:12]}"

    def _ordinary(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, *, allowed_special: AllowedSpecial = "all") -> list[int]:
        return self.encode_batch([text], allowed_special=allowed_special)[0]

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        allowed = resolve_allowed(allowed_special, self.special_ids)
        pieces = [self._splitter.split(nfc(t), allowed) for t in texts]
        plain = self._ordinary([p for ps in pieces for p in ps if isinstance(p, str)])
        return splice_specials(pieces, plain)

    def decode(self, ids: Iterable[int]) -> str:
        return decode_bytes(self, ids)

    def token_bytes(self, token_id: int) -> bytes:
        try:
            return self._bytes[token_id]
        except KeyError:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            ) from None

    def id_to_piece(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def _build_from_vocab_merges(vocab: Path, merges: Path):
    """The pipeline Qwen2's tokenizer.json declares: NFC, regex split, byte-level BPE."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _HFTokenizer

    tok = _HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _added_tokens_from_config(config: Path) -> dict[str, int]:
    if not config.exists():
        return {}
    table = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    return {v["content"]: int(k) for k, v in table.items()}
