"""Versioned seqio Tasks. Names end in `_vN`; change a Task's data or processing -> new N.

Four kinds, told apart by their output features (`task_kind`):
  lm          targets                      pretraining text/code/math (packed, split across rows)
  sft         targets, loss_weights        ChatML conversations (packed whole)
  preference  chosen, rejected             reward-model pairs
  prompt      prompt                       prompts for PPO rollouts / evaluation

The `demo_*` tasks read the standard corpus layout under a data directory (relative patterns;
`get_iterator(data_dir=...)`, else `$QWEN_JAX_DATA_DIR`, else ~/.cache/qwen-jax/demo-data):
    pretrain/{text,code,math}/{train-*,validation*}   jsonl / text / TFRecord, by extension
    sft/{chat,code,math}/{train,validation}*.jsonl    preference/..., prompts/...
`qwen-jax data build-demo --out DIR` writes the embedded corpus in this layout; any directory
(local or gs://) with the same layout works. Other corpora: `add_corpus_task(...)`.
The default vocabulary is Qwen's; `get_iterator(vocab=...)` swaps in another (e.g. the demo's
SentencePiece model) without registering new Tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio

from qwen_jax.data import preprocessors as prep
from qwen_jax.data.sources import CorpusSource
from qwen_jax.data.text_filters import QualityRules
from qwen_jax.data.tf_setup import tf
from qwen_jax.data.vocabularies import TokenizerVocabulary

QWEN_VOCAB = TokenizerVocabulary("qwen")
_WEIGHTS = seqio.PassThroughVocabulary(size=2)
KINDS = ("lm", "sft", "preference", "prompt")


def output_features(kind: str, vocab: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    if kind == "lm":
        return {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}
    if kind == "sft":
        return {
            "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
            "loss_weights": seqio.Feature(_WEIGHTS, add_eos=False, dtype=tf.int32),
        }
    if kind == "preference":
        return {
            k: seqio.Feature(vocab, add_eos=False, dtype=tf.int32) for k in ("chosen", "rejected")
        }
    if kind == "prompt":
        return {"prompt": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)}
    raise ValueError(f"unknown task kind {kind!r}; expected one of {KINDS}")


def task_kind(task: seqio.Task) -> str:
    keys = set(task.output_features)
    for kind, marker in (("sft", "loss_weights"), ("preference", "chosen"), ("prompt", "prompt")):
        if marker in keys:
            return kind
    return "lm"


_PREPROCESSORS = {
    "lm": (prep.tokenize, seqio.preprocessors.append_eos),
    "sft": (prep.chatml_sft,),
    "preference": (prep.preference,),
    "prompt": (prep.chat_prompt,),
}


def add_corpus_task(
    name: str,
    kind: str,
    splits: Mapping[str, Sequence[str]],
    *,
    vocab: seqio.Vocabulary = QWEN_VOCAB,
    quality: QualityRules | None = None,
    dedup: bool = True,
    text_key: str = "text",
    text_unit: str = "file",
    max_bad_fraction: float = 0.01,
    shuffle_buffer: int = 4096,
) -> seqio.Task:
    """Register a Task reading `splits` (split -> glob patterns, relative to the data dir or
    absolute / gs://) as one of `KINDS`. lm tasks take text (jsonl `text_key`, text files,
    TFRecord `tf.train.Example`s); the others take jsonl records in the formats records.py
    accepts (OpenAI / ShareGPT chats, TRL-style pairs), checked and made canonical as they are
    read. Malformed records are skipped up to `max_bad_fraction` of those read (then a
    DataError; `get_iterator(max_bad_fraction=...)` overrides it per run)."""
    source = CorpusSource(
        splits,
        record="text" if kind == "lm" else "json",
        kind=None if kind == "lm" else kind,
        text_key=text_key,
        text_unit=text_unit,
        dedup=dedup,
        quality=quality if kind == "lm" else None,
        max_bad_fraction=max_bad_fraction,
        shuffle_buffer=shuffle_buffer,
    )
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=list(_PREPROCESSORS[kind]),
        output_features=output_features(kind, vocab),
        shuffle_buffer_size=None,  # the source shuffles (seeded, resumable); no post-shuffle
    )


def _layout(prefix: str) -> dict[str, list[str]]:
    return {"train": [f"{prefix}/train*"], "validation": [f"{prefix}/validation*"]}


# Prose: docstrings and documentation; symbols beyond a quarter of the text is markup/tables.
add_corpus_task(
    "demo_pretrain_text_v1",
    "lm",
    _layout("pretrain/text"),
    quality=QualityRules(min_chars=200, max_symbol_ratio=0.25),
)
# Code legitimately runs ~30% symbols; generated tables and data blobs run far higher.
add_corpus_task(
    "demo_pretrain_code_v1",
    "lm",
    _layout("pretrain/code"),
    quality=QualityRules(min_chars=200, max_symbol_ratio=0.45),
)
add_corpus_task(
    "demo_pretrain_math_v1",
    "lm",
    _layout("pretrain/math"),
    quality=QualityRules(min_chars=64, max_symbol_ratio=0.3),
)
for _domain in ("chat", "code", "math"):
    add_corpus_task(f"demo_sft_{_domain}_v1", "sft", _layout(f"sft/{_domain}"))
add_corpus_task("demo_preference_v1", "preference", _layout("preference"))
add_corpus_task("demo_prompts_v1", "prompt", _layout("prompts"))
