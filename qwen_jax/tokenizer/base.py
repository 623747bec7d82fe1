"""The `Tokenizer` protocol every backend implements, Qwen's special tokens, and shared helpers.

Backends: Qwen v1 tiktoken BPE (`qwen_tiktoken.py`), Qwen1.5/2/2.5 Hugging Face files
(`hf_bpe.py`), SentencePiece (`spm.py`). They differ in how ordinary text becomes ids; the
special-token semantics are the same everywhere and follow tiktoken's `allowed_special`:

- `allowed_special="all"`: the surface form of a special token in the text (`<|im_end|>`)
  becomes that token's single id. Use for text the program itself wrote (ChatML scaffolding).
- `allowed_special=set()` (or a subset): other special surface forms are encoded as plain text,
  so a user who types `<|im_end|>` cannot close a turn. Use for all user and corpus content.

Text is NFC-normalized before encoding (Qwen's `tokenize()` does the same), so decode(encode(s))
== s for NFC text; non-NFC input comes back in its NFC form.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Iterable, Sequence, Set
from typing import Literal, Protocol, runtime_checkable

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen v1: 3 named specials then <|extra_0|> .. <|extra_204|>, ids from 151643 (spec §3).
QWEN_NUM_EXTRA = 205
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(
    f"<|extra_{i}|>" for i in range(QWEN_NUM_EXTRA)
)

AllowedSpecial = Literal["all"] | Set[str]


@runtime_checkable
class Tokenizer(Protocol):
    """What trainers, inference and evals code against.

    `vocab_size` counts the ids the tokenizer can emit (151,851 for Qwen v1); model embeddings
    are usually padded beyond it. `pad_id` is what right-padding uses (Qwen: `<|endoftext|>`).
    `im_start_id`/`im_end_id` are None only for foreign vocabularies without ChatML tokens.
    """

    name: str  # backend + content fingerprint, e.g. "qwen-tiktoken:b2b1b8dfb5cc"
    vocab_size: int
    eod_id: int
    im_start_id: int | None
    im_end_id: int | None
    pad_id: int
    special_ids: dict[str, int]

    def encode(self, text: str, *, allowed_special: AllowedSpecial = "all") -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def id_to_piece(self, token_id: int) -> str: ...


def nfc(text: str) -> str:
    """NFC-normalize (fast path: most text already is)."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def resolve_allowed(allowed_special: AllowedSpecial, special_ids: dict[str, int]) -> frozenset:
    """`"all"` -> every special; a set -> itself, validated against the vocabulary."""
    if allowed_special == "all":
        return frozenset(special_ids)
    unknown = set(allowed_special) - set(special_ids)
    if unknown:
        raise ValueError(f"allowed_special names tokens this vocabulary lacks: {sorted(unknown)}")
    return frozenset(allowed_special)


class SpecialSplitter:
    """Splits text at the surface forms of an allowed set of special tokens.

    `split(text, allowed)` -> list of str (ordinary text) and int (special id) pieces. Longer
    surface forms win where two could match at the same place (regex alternation order).
    """

    def __init__(self, special_ids: dict[str, int]):
        self.special_ids = dict(special_ids)
        self._patterns: dict[frozenset, re.Pattern | None] = {}

    def _pattern(self, allowed: frozenset) -> re.Pattern | None:
        if allowed not in self._patterns:
            forms = sorted(allowed, key=len, reverse=True)
            self._patterns[allowed] = (
                re.compile("|".join(re.escape(f) for f in forms)) if forms else None
            )
        return self._patterns[allowed]

    def split(self, text: str, allowed: frozenset) -> list[str | int]:
        pattern = self._pattern(allowed)
        if pattern is None:
            return [text] if text else []
        pieces: list[str | int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                pieces.append(text[pos : m.start()])
            pieces.append(self.special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces


def splice_specials(pieces: list[list[str | int]], encoded: list[list[int]]) -> list[list[int]]:
    """Rebuild each text's ids: its plain-text pieces take the next entries of `encoded` (the
    batch-encoded plain pieces, in order); special-token ids stay where they were."""
    out, k = [], 0
    for ps in pieces:
        ids: list[int] = []
        for p in ps:
            if isinstance(p, str):
                ids += encoded[k]
                k += 1
            else:
                ids.append(p)
        out.append(ids)
    return out


def decode_bytes(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Decode through `token_bytes` (invalid UTF-8 across a cut becomes U+FFFD, like Qwen)."""
    return b"".join(tok.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")


def unknown_marker(token_id: int) -> str:
    """The visible stand-in for an id the tokenizer has no text for (an embedding row past the
    tokenizer's ids, or a gap in its table): `<unk:123456>`."""
    return f"<unk:{token_id}>"


class StreamDetokenizer:
    """Incremental detokenization for streaming generation.

    `push(id)` returns the text that became complete with this token: a multi-byte UTF-8
    character split over several byte-level tokens is held back until its last byte arrives.
    An id the tokenizer cannot decode (outside [0, vocab_size), or without bytes) is never
    dropped silently: it becomes `unknown_marker(id)` in the text and is counted in `unknown`
    (generation from a model whose embedding has more rows than the tokenizer has ids).
    `Tokenizer.decode` itself stays strict and raises ValueError for such ids.
    """

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.unknown = 0

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        data = None
        if 0 <= token_id < self._tok.vocab_size:
            try:
                data = self._tok.token_bytes(token_id)
            except ValueError:
                data = None
        if data is None:
            self.unknown += 1
            # Bytes held back for an unfinished character are broken by the marker: flush them.
            return self.flush() + unknown_marker(token_id)
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def decode_marking_unknown(tok: Tokenizer, ids: Iterable[int]) -> tuple[str, int]:
    """(text, number of unknown ids): `decode` that renders ids the tokenizer cannot decode as
    `unknown_marker(id)` instead of raising."""
    detok = StreamDetokenizer(tok)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    return text, detok.unknown
