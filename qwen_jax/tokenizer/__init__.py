"""Tokenizers: Qwen v1 tiktoken BPE, Qwen1.5/2 Hugging Face BPE files, SentencePiece; ChatML.

Public API:
    load_tokenizer(spec) -> Tokenizer          "qwen" or a path (see load.py)
    Tokenizer                                  the protocol (base.py)
    chatml.render / build_prompt / sft_example
    train_sentencepiece(inputs, out_dir, vocab_size)
"""

from qwen_jax.tokenizer.base import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN_SPECIAL_TOKENS,
    StreamDetokenizer,
    Tokenizer,
)
from qwen_jax.tokenizer.load import load_tokenizer


def train_sentencepiece(*args, **kwargs):
    """See `qwen_jax.tokenizer.spm.train_sentencepiece`."""
    from qwen_jax.tokenizer.spm import train_sentencepiece as train

    return train(*args, **kwargs)


__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN_SPECIAL_TOKENS",
    "StreamDetokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
]
