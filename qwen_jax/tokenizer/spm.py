"""SentencePiece tokenizers: loading any `.model`, and training the small BPE vocabularies the
embedded demo uses so tiny models stay tiny.

Training settings and why:
- `model_type=bpe`, `byte_fallback`: no `<unk>` ever; unseen characters become UTF-8 bytes.
- `split_digits`: digits one per token, as Qwen does (arithmetic needs it).
- identity normalization, no dummy prefix, no whitespace collapsing, whitespace-only pieces:
  exact round trips, and code indentation becomes a few whitespace pieces. We apply NFC
  ourselves, as for the Qwen tokenizer.
- Qwen's `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (and some `<|extra_i|>`) reserved as
  user-defined symbols: single ids, ChatML works unchanged. Ids: pad 0, unk 1, then the specials.
SentencePiece always matches user-defined symbols in text, so `allowed_special` is enforced by
cutting disallowed surface forms after their first character before encoding: with no dummy
prefix, encoding two pieces separately only forbids a merge across the cut.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

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

_Type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type


class SentencePieceTokenizer:
    """A SentencePiece model as a `base.Tokenizer`.

    Special tokens are the model's user-defined pieces (Qwen's names in our trained models).
    A foreign model without `<|endoftext|>` uses its `</s>` as end of document and has no ChatML
    ids (`im_start_id is None`).
    """

    def __init__(self, path: str | os.PathLike):
        data = Path(path).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
        types = [p.type for p in proto.pieces]
        self.vocab_size = len(types)
        self.special_ids = {
            p.piece: i for i, p in enumerate(proto.pieces) if p.type == _Type.USER_DEFINED
        }
        self._splitter = SpecialSplitter(self.special_ids)
        if ENDOFTEXT in self.special_ids:
            self.eod_id = self.special_ids[ENDOFTEXT]
        elif self._sp.eos_id() >= 0:
            self.eod_id = self._sp.eos_id()
        else:
            raise ValueError(f"{path}: SentencePiece model has neither {ENDOFTEXT} nor </s>")
        self.im_start_id = self.special_ids.get(IM_START)
        self.im_end_id = self.special_ids.get(IM_END)
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id
        self.name = f"sentencepiece:{hashlib.sha256(data).hexdigest()[:12]}"
        self._bytes = [_piece_bytes(p.piece, t) for p, t in zip(proto.pieces, types)]

    def _ordinary_texts(self, text: str, allowed: frozenset) -> list[str | int]:
        """Split at allowed specials; cut disallowed surface forms so SP cannot match them."""
        out: list[str | int] = []
        for piece in self._splitter.split(text, allowed):
            if isinstance(piece, int):
                out.append(piece)
                continue
            blocked = frozenset(self.special_ids) - allowed
            for seg in self._splitter.split(piece, blocked):
                if isinstance(seg, int):  # a disallowed special typed in the text
                    form = self._sp.id_to_piece(seg)
                    out += [form[:1], form[1:]]
                else:
                    out.append(seg)
        return out

    def encode(self, text: str, *, allowed_special: AllowedSpecial = "all") -> list[int]:
        return self.encode_batch([text], allowed_special=allowed_special)[0]

    def encode_batch(
        self, texts: Sequence[str], *, allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        allowed = resolve_allowed(allowed_special, self.special_ids)
        pieces = [self._ordinary_texts(nfc(t), allowed) for t in texts]
        plain = [p for ps in pieces for p in ps if isinstance(p, str)]
        encoded = self._sp.encode(plain, num_threads=4) if plain else []
        return splice_specials(pieces, encoded)

    def decode(self, ids: Iterable[int]) -> str:
        return decode_bytes(self, ids)

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        return self._bytes[token_id]

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def _piece_bytes(piece: str, kind: int) -> bytes:
    if kind == _Type.BYTE:  # "<0xAB>"
        return bytes([int(piece[3:5], 16)])
    if kind in (_Type.CONTROL, _Type.UNKNOWN, _Type.UNUSED):
        return b""
    return piece.replace("\u2581", " ").encode()


def read_training_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents from training inputs: jsonl (`text`, or chat `messages`/`prompt`/`chosen`
    contents), any other file as one plain-text document, a directory as its `*.jsonl`
    files (recursively, sorted)."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.jsonl")) if p.is_dir() else [p]
    for p in files:
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if "text" in rec:
                        yield rec["text"]
                    for m in rec.get("messages", []):
                        yield m["content"]
                    for key in ("prompt", "chosen", "rejected"):
                        if isinstance(rec.get(key), str):
                            yield rec[key]
        else:
            yield p.read_text(encoding="utf-8", errors="replace")


def _chunks(docs: Iterable[str], max_chars: int = 3000) -> Iterator[str]:
    """SentencePiece skips "sentences" over max_sentence_length bytes: cut long documents at
    line boundaries (newlines stay inside pieces, so whitespace/newline tokens are learned)."""
    for doc in docs:
        buf = ""
        for line in doc.splitlines(keepends=True):
            if buf and len(buf) + len(line) > max_chars:
                yield buf
                buf = ""
            buf += line[: max_chars * 2]
        if buf:
            yield buf


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    num_extra: int = 8,
    max_chars: int = 20_000_000,
    seed: int = 0,
) -> Path:
    """Train a BPE SentencePiece model on `inputs`; write `out_dir/tokenizer.model`.

    At most `max_chars` characters of training text are used: a deterministic (seeded) sample
    of line-cut chunks when the inputs are larger. Returns the model path.
    """
    chunks = list(_chunks(nfc(d) for d in read_training_texts(inputs)))
    if not chunks:
        raise ValueError(f"no training text in {list(map(str, inputs))}")
    order = np.random.default_rng(seed).permutation(len(chunks))
    sample, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        sample.append(chunks[i])
        total += len(chunks[i])
    specials = [ENDOFTEXT, IM_START, IM_END] + [f"<|extra_{i}|>" for i in range(num_extra)]
    model = _BytesSink()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        user_defined_symbols=specials,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        max_sentence_length=16384,
        input_sentence_size=0,
        num_threads=2,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.model"
    path.write_bytes(model.data)
    return path


class _BytesSink:
    """`model_writer` target for SentencePieceTrainer (it calls `.write(bytes)`)."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data
