"""User files as a training dataset: `--config.data.mixture=/data/chats/*.jsonl`.

A dataset spec is a registered seqio Task or Mixture name, or user files: a path or glob, or
several separated by commas, local or gs://, optionally gzipped (.jsonl.gz, .txt.gz), of
  .jsonl   one record per line, of one of the task kinds (records.py has every format):
             lm          {"text": str}   one document (other fields are ignored)
             sft         {"messages": [{"role", "content"}, ...]}        (OpenAI style),
                         {"conversations": [{"from", "value"}, ...]}     (ShareGPT style) or
                         {"prompt": ..., "completion": ...}              (TRL's), each with
                         an optional "system"
             preference  {"prompt": str | [turns] (or "messages": [turns]),
                          "chosen": str | [turns], "rejected": str | [turns]}
             prompt      {"prompt": str | [turns], "answer"?: str}
  .txt     one lm document per FILE (what a corpus of text files means: paragraphs and code
           keep their line breaks; a single large .txt is one long document, split across rows
           by packing as any long document is).
The kind is read from the first record of the first file (sorted): chosen+rejected ->
preference, messages / conversations / completion -> sft, text -> lm, prompt -> prompt,
anything else -> lm (whose records then fail as lacking "text", naming file, line and keys).
Override the kind with a prefix on the whole spec: "sft:/data/chats/*.jsonl",
"preference:gs://b/pairs.jsonl", "lm:a.jsonl,b.jsonl" (also "prompt:"). Every file of a spec
must hold records of that kind: a record that is not is malformed, skipped and counted, up to
1% of the records read (the run's `data.max_bad_fraction`); past it the read fails naming the
file, the count and the commonest reason.

The files are registered on the fly as a versioned Task named from their absolute patterns,
the kind and the tokenizer (`user_files_<crc32>_v1` for lm, `user_files_<kind>_<crc32>_v1`
otherwise), serving the same files as every split (train, validation, test): pass other files
as data.eval_mixture for a held-out set. Records are used as given: NFC-normalised, no dedup,
no quality filter. Sharding, shuffling and resume are those of every corpus task
(qwen_jax.data.sources).
"""

from __future__ import annotations

import json
import os
import zlib

import seqio

from qwen_jax.data import mixtures  # noqa: F401  (registers the Tasks and Mixtures)
from qwen_jax.data.records import detect_kind
from qwen_jax.data.sources import file_format, open_binary
from qwen_jax.data.tasks import KINDS, add_corpus_task
from qwen_jax.data.tf_setup import tf
from qwen_jax.data.vocabularies import TokenizerVocabulary

SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
SPLITS = ("train", "validation", "test")
_PROBE_LINES = 100  # lines read for the first parseable record when detecting the kind


def registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def _absolute(pattern: str) -> str:
    return pattern if "://" in pattern else os.path.abspath(os.path.expanduser(pattern))


def split_kind(spec: str) -> tuple[str | None, str]:
    """("sft", "/a/*.jsonl") for "sft:/a/*.jsonl"; (None, spec) without a kind prefix."""
    head, sep, rest = spec.partition(":")
    if sep and head.strip() in KINDS:
        return head.strip(), rest
    return None, spec


def detect_file_kind(path: str) -> str:
    """The kind of the first JSON record of `path`; lm for a .txt file and for records of no
    known kind (the reader then reports them as lm records without "text", with file, line
    and keys)."""
    if file_format(path) == "text":
        return "lm"
    with open_binary(path) as f:
        for n, line in enumerate(f, 1):
            if n > _PROBE_LINES:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # blank or malformed: the reader counts it; look at the next line
            return detect_kind(obj) or "lm"
    return "lm"


def dataset_name(spec: str, vocab=None) -> str:
    """The registered Task/Mixture name for `spec`, registering user files as a Task first.

    vocab: the tokenizer (a `load_tokenizer` spec, Tokenizer or TokenizerVocabulary) the Task
    declares; None = Qwen's. Raises ValueError for a name that is neither registered nor a
    path of a supported kind, FileNotFoundError for a pattern
    that matches no file.
    """
    if spec in registered_names():
        return spec
    kind, paths = split_kind(spec)
    patterns = [p.strip() for p in paths.split(",") if p.strip()]
    if not patterns or not all(p.endswith(SUFFIXES) for p in patterns):
        raise ValueError(
            f"dataset {spec!r} is neither a registered task or mixture ({registered_names()}) "
            f"nor user files (a path or glob ending in one of {SUFFIXES}, optionally after a "
            f"kind prefix {', '.join(k + ':' for k in KINDS)})"
        )
    patterns = [_absolute(p) for p in patterns]
    matches = []
    for p in patterns:
        found = tf.io.gfile.glob(p)
        if not found:
            raise FileNotFoundError(f"dataset {spec!r}: no file matches {p}")
        matches += found
    if kind is None:
        kind = detect_file_kind(sorted(matches)[0])
    if kind != "lm" and any(file_format(m) == "text" for m in matches):
        raise ValueError(f"dataset {spec!r}: {kind} records come in .jsonl files, not .txt")
    if not isinstance(vocab, TokenizerVocabulary):
        vocab = TokenizerVocabulary(vocab or "qwen")
    if kind == "lm":  # the name lm specs had before kinds existed: saved runs resume with it
        key = json.dumps([patterns, vocab.tokenizer.name])
        name = f"user_files_{zlib.crc32(key.encode()):08x}_v1"
    else:
        key = json.dumps([patterns, vocab.tokenizer.name, kind])
        name = f"user_files_{kind}_{zlib.crc32(key.encode()):08x}_v1"
    if name not in seqio.TaskRegistry.names():
        add_corpus_task(
            name,
            kind,
            {split: patterns for split in SPLITS},
            vocab=vocab,
            quality=None,
            dedup=False,
            text_unit="file",
        )
    return name
