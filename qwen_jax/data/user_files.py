"""User files as a training dataset: `--config.data.mixture=/data/corpus/*.jsonl`.

A dataset spec is a registered seqio Task or Mixture name, or user files: a path or glob, or
several separated by commas, local or gs://, of
  .jsonl   one document per line, its "text" field (other fields are ignored);
  .txt     one document per FILE (what a corpus of text files means: paragraphs and code keep
           their line breaks; a single large .txt is one long document, split across rows by
           packing as any long document is);
optionally gzipped (.jsonl.gz, .txt.gz). The files are registered on the fly as a versioned lm
Task named from their absolute patterns and the tokenizer (`user_files_<crc32>_v1`), serving the
same files as every split (train, validation, test): pass other files as data.eval_mixture for
a held-out set. Documents are used as given: NFC-normalised, no dedup, no quality filter.
Sharding, shuffling and resume are those of every corpus task (qwen_jax.data.sources).
"""

from __future__ import annotations

import json
import os
import zlib

import seqio

from qwen_jax.data import mixtures  # noqa: F401  (registers the Tasks and Mixtures)
from qwen_jax.data.tasks import add_corpus_task
from qwen_jax.data.tf_setup import tf
from qwen_jax.data.vocabularies import TokenizerVocabulary

SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
SPLITS = ("train", "validation", "test")


def registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def _absolute(pattern: str) -> str:
    return pattern if "://" in pattern else os.path.abspath(os.path.expanduser(pattern))


def dataset_name(spec: str, vocab=None) -> str:
    """The registered Task/Mixture name for `spec`, registering user files as a Task first.

    vocab: the tokenizer (a `load_tokenizer` spec, Tokenizer or TokenizerVocabulary) the Task
    declares; None = Qwen's. Raises ValueError for a name that is neither registered nor a
    path of a supported kind, FileNotFoundError for a pattern that matches no file.
    """
    if spec in registered_names():
        return spec
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns or not all(p.endswith(SUFFIXES) for p in patterns):
        raise ValueError(
            f"dataset {spec!r} is neither a registered task or mixture ({registered_names()}) "
            f"nor user files (a path or glob ending in one of {SUFFIXES})"
        )
    patterns = [_absolute(p) for p in patterns]
    for p in patterns:
        if not tf.io.gfile.glob(p):
            raise FileNotFoundError(f"dataset {spec!r}: no file matches {p}")
    if not isinstance(vocab, TokenizerVocabulary):
        vocab = TokenizerVocabulary(vocab or "qwen")
    key = json.dumps([patterns, vocab.tokenizer.name])
    name = f"user_files_{zlib.crc32(key.encode()):08x}_v1"
    if name not in seqio.TaskRegistry.names():
        add_corpus_task(
            name,
            "lm",
            {split: patterns for split in SPLITS},
            vocab=vocab,
            quality=None,
            dedup=False,
            text_unit="file",
        )
    return name
