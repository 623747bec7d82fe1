"""Packing token sequences into fixed-length rows with seqio DecoderFeatureConverter features.

Row features, int32 [T] each (a batch stacks B rows):
  decoder_target_tokens   the tokens to predict
  decoder_input_tokens    the autoregressive inputs: within each segment the targets shifted
                          right by one; a segment's first input is `bos_id` (`<|endoftext|>`: in
                          Qwen's concatenated pretraining stream a document follows one), or,
                          for a document continued from the previous row, its preceding token
  decoder_loss_weights    1 where the target is learned (0 on padding, on SFT prompt tokens)
  decoder_segment_ids     1, 2, ... per packed example; 0 on padding
  decoder_positions       0, 1, ... restarting at each segment
Padding holds `pad_id` tokens with segment 0 and weight 0. Attention must not cross segments.

Two ways an example enters rows:
  split (lm):   rows are filled completely; a document that does not fit continues at the
                start of the next row (Qwen: "concatenated and cut to the context length");
  whole (sft):  an example that does not fit the rest of a row starts the next row; one longer
                than T is truncated to T (counted).
With pack=False every row holds one example (lm documents are still cut into rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

FEATURES = (
    "decoder_target_tokens",
    "decoder_input_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


@dataclasses.dataclass
class Example:
    """One tokenized example and where it came from (for the resumable state)."""

    task: int  # index into the iterator's task list
    epoch: int
    index: int  # `_index`: position in that task's pass over its shard
    tokens: np.ndarray  # int32 [n]
    weights: np.ndarray  # int32 [n]
    splittable: bool  # lm documents may continue into the next row
    offset: int = 0  # tokens[:offset] were emitted in earlier rows


class Packer:
    """Builds rows one at a time; `carry` is the example that continues into the next row."""

    def __init__(self, length: int, bos_id: int, pad_id: int, pack: bool = True):
        self.length, self.bos_id, self.pad_id, self.pack = length, bos_id, pad_id, pack
        self.carry: Example | None = None
        self.truncated = 0
        self._arange = np.arange(length, dtype=np.int32)

    def empty_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """[batch_size, T] arrays holding only padding."""
        out = {k: np.zeros([batch_size, self.length], np.int32) for k in FEATURES}
        out["decoder_target_tokens"][:] = self.pad_id
        out["decoder_input_tokens"][:] = self.pad_id
        return out

    def row(
        self,
        out: dict[str, np.ndarray],
        r: int,
        pull: Callable[[], Example | None],
        on_place: Callable[[Example, int], None],
    ) -> bool:
        """Fill row `r` of `out` (an `empty_batch`) from `carry` then `pull()`; False when
        there was no data left at all. `on_place(example, n_tokens)` hears of every piece."""
        T = self.length
        target, inputs = out["decoder_target_tokens"][r], out["decoder_input_tokens"][r]
        weights, segments = out["decoder_loss_weights"][r], out["decoder_segment_ids"][r]
        positions = out["decoder_positions"][r]
        pos, seg = 0, 0
        while pos < T:
            ex, self.carry = self.carry or pull(), None
            if ex is None:
                break
            if not ex.splittable and len(ex.tokens) > T:
                ex.tokens, ex.weights = ex.tokens[:T], ex.weights[:T]
                self.truncated += 1
            remaining = len(ex.tokens) - ex.offset
            if not ex.splittable and remaining > T - pos:
                self.carry = ex  # starts the next row
                break
            take = min(remaining, T - pos)
            seg += 1
            lo, hi, end = ex.offset, ex.offset + take, pos + take
            target[pos:end] = ex.tokens[lo:hi]
            weights[pos:end] = ex.weights[lo:hi]
            segments[pos:end] = seg
            positions[pos:end] = self._arange[:take]
            inputs[pos] = self.bos_id if lo == 0 else ex.tokens[lo - 1]
            inputs[pos + 1 : end] = ex.tokens[lo : hi - 1]
            on_place(ex, take)
            pos = end
            if hi < len(ex.tokens):
                ex.offset = hi
                self.carry = ex
            if not self.pack:
                break
        return seg > 0
