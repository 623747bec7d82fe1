"""Streaming text for one generated row: incremental detokenization and stop strings.

Byte-level BPE can split one UTF-8 character over several tokens, and a stop string (ReAct's
"Observation:") can arrive over several tokens, so text is released only once it is final:
`push` returns the new text that can no longer change or turn out to begin a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwen_jax.tokenizer.base import StreamDetokenizer, decode_marking_unknown


def _pending_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopChecker:
    """Accumulates one row's text and watches it for stop strings.

    `text` is the final text (cut before the stop string that ended the row, if any).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.stops = tuple(s for s in stop_strings if s)
        # Embeddings are padded past the tokenizer (151,936 rows for 151,851 ids): such ids
        # have no text and show as `<unk:ID>` markers (counted in `unknown`), never vanish.
        self._detok = StreamDetokenizer(tokenizer)
        self._text = ""
        self._emitted = 0
        self.hit: str | None = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def unknown(self) -> int:
        """How many pushed ids the tokenizer could not decode (shown as `<unk:ID>`)."""
        return self._detok.unknown

    def push(self, token_id: int) -> tuple[str, str | None]:
        """Add a token: returns (newly final text, the stop string it completed or None)."""
        if self.hit is not None:
            return "", self.hit
        start = max(0, len(self._text) - max((len(s) for s in self.stops), default=0))
        self._text += self._detok.push(token_id)
        found = [(i, s) for s in self.stops if (i := self._text.find(s, start)) >= 0]
        if found:
            cut, self.hit = min(found)  # the earliest stop string in the text ends the row
            self._text = self._text[:cut]
            return self._release(cut), self.hit
        return self._release(len(self._text) - _pending_prefix(self._text, self.stops)), None

    def finish(self) -> str:
        """End of the row: release everything still held back."""
        if self.hit is None:
            self._text += self._detok.flush()
        return self._release(len(self._text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out = self._text[self._emitted : upto]
        self._emitted = upto
        return out


def count_unknown(tokenizer, token_ids) -> int:
    """How many of `token_ids` the tokenizer has no text for (what a CLI warns about after
    generation; they show as `<unk:ID>` in the text)."""
    return decode_marking_unknown(tokenizer, token_ids)[1]
