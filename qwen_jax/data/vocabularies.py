"""Our tokenizers as `seqio.Vocabulary`, so Tasks declare them like any seqio vocabulary.

One class serves every backend (Qwen tiktoken, Qwen2 HF files, SentencePiece): it wraps a
`Tokenizer` from `load_tokenizer(spec)`, loaded lazily, so registering Tasks costs nothing and
the Qwen vocab is fetched only when a pipeline first encodes with it.

Conventions (differences from seqio's defaults, which assume a T5 SentencePiece vocab):
- corpus text is encoded with special tokens disabled: a document that contains the string
  `<|endoftext|>` cannot inject a document boundary;
- `eos_id` is `<|endoftext|>`; `pad_id` is the tokenizer's (Qwen: `<|endoftext|>`, our
  SentencePiece models: 0). Qwen's id 0 is the real token "!", so seqio's own feature
  converters (which treat id 0 as padding) must not be used with the Qwen vocab: our
  `pipeline.get_iterator` computes loss weights from explicit masks instead.
"""

from __future__ import annotations

import numpy as np
import seqio

from qwen_jax.data.tf_setup import tf
from qwen_jax.tokenizer.base import Tokenizer
from qwen_jax.tokenizer.load import load_tokenizer


class TokenizerVocabulary(seqio.Vocabulary):
    """`seqio.Vocabulary` over a `Tokenizer` given directly or as a `load_tokenizer` spec."""

    def __init__(self, spec: str | Tokenizer = "qwen"):
        super().__init__(extra_ids=0)
        self._spec = spec if isinstance(spec, str) else None
        self._tok = None if isinstance(spec, str) else spec

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self._spec)
        return self._tok

    @property
    def name(self) -> str:
        return self.tokenizer.name

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def unk_id(self) -> int | None:
        return None

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, allowed_special=set())

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(int(i) for i in ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(b) -> np.ndarray:
            b = b.item() if isinstance(b, np.ndarray) else b  # eager mode passes a 0-d array
            return np.asarray(self._encode(b.decode("utf-8")), np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(arr: np.ndarray) -> np.ndarray:
            if arr.ndim == 1:
                return np.asarray(self._decode(arr).encode("utf-8"), dtype=object)
            return np.asarray([self._decode(row).encode("utf-8") for row in arr], dtype=object)

        out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, TokenizerVocabulary):
            return False
        if self._spec is not None and self._spec == other._spec:
            return True
        return self.name == other.name

    def __hash__(self) -> int:
        return hash(TokenizerVocabulary)  # constant: hashing must not load a vocabulary

    def __repr__(self) -> str:
        return f"TokenizerVocabulary({self._spec or self.name!r})"
