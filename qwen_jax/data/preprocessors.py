"""seqio preprocessors (tf.data -> tf.data) that tokenize documents and conversations.

Each works on batches of 64 examples inside one `tf.numpy_function` call (per-example Python
calls would cost more than the tokenization itself) and keeps `_index`, the source position
the resumable pipeline tracks. The reader has already checked structured records and made them
canonical (records.py: OpenAI / ShareGPT chats, TRL-style pairs; a bad record is skipped there,
counted and reported with its file and line); examples a preprocessor still cannot use (e.g.
a tokenizer without ChatML tokens, or a Task whose source does not check records) are dropped
and counted in `DROPPED` (process-wide, by "preprocessor:reason").

Output features:
  tokenize       text -> targets
  chatml_sft     json {"messages": [...], "system"?} -> targets, loss_weights (chatml.py)
  preference     json {"prompt": str | messages, "chosen": str, "rejected": str, "system"?}
                 -> chosen, rejected (each ends at the reply's <|im_end|>), prompt_length
  chat_prompt    json {"prompt": str | messages, "system"?, "answer"?} -> prompt (ends with
                 `<|im_start|>assistant\\n`), answer (string, "" if absent)
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable

import numpy as np

from qwen_jax.data.tf_setup import tf
from qwen_jax.tokenizer import chatml
from qwen_jax.tokenizer.base import Tokenizer

DROPPED: Counter = Counter()
_LOCK = threading.Lock()
_BATCH = 64


def _tokenizer(output_features, key: str) -> Tokenizer:
    return output_features[key].vocabulary.tokenizer


def _drop(name: str, reason: str) -> None:
    with _LOCK:
        DROPPED[f"{name}:{reason}"] += 1


def _batched_py(
    dataset: tf.data.Dataset,
    in_key: str,
    fn: Callable[[list[bytes]], list[dict | None]],
    ragged: tuple[str, ...],
    scalars: dict[str, tf.DType] = {},  # noqa: B006 (read-only)
) -> tf.data.Dataset:
    """Map `fn` over batches of `in_key` values; fn returns one dict per example (None = drop)
    with int sequences for `ragged` keys and Python scalars for `scalars`."""
    np_types = {tf.int32: np.int32, tf.string: object}

    def py(values: np.ndarray):
        rows = fn(list(values))
        keep = np.array([r is not None for r in rows], bool)
        rows = [r for r in rows if r is not None]
        out = []
        for k in ragged:
            seqs = [np.asarray(r[k], np.int32) for r in rows]
            out.append(np.concatenate(seqs) if seqs else np.zeros([0], np.int32))
            out.append(np.array([len(s) for s in seqs], np.int64))
        for k, dtype in scalars.items():
            out.append(np.array([r[k] for r in rows], dtype=np_types[dtype]))
        return (*out, keep)

    tout = [tf.int32, tf.int64] * len(ragged) + list(scalars.values()) + [tf.bool]

    def apply(ex):
        outs = tf.numpy_function(py, [ex[in_key]], tout, stateful=False)
        keep = outs[-1]
        keep.set_shape([None])
        res = {k: tf.boolean_mask(v, keep) for k, v in ex.items() if k != in_key}
        for j, k in enumerate(ragged):
            flat, lengths = outs[2 * j], outs[2 * j + 1]
            flat.set_shape([None])
            lengths.set_shape([None])
            res[k] = tf.RaggedTensor.from_row_lengths(flat, lengths)
        for j, k in enumerate(scalars):
            v = outs[2 * len(ragged) + j]
            v.set_shape([None])
            res[k] = v
        return res

    # unbatch turns each ragged row back into a dense 1-D tensor
    return dataset.batch(_BATCH).map(apply, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def tokenize(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """`text` -> `targets` (special tokens disabled; EOS is `append_eos`'s job)."""
    tok = _tokenizer(output_features, "targets")

    def fn(values: list[bytes]):
        texts = [v.decode("utf-8") for v in values]
        return [{"targets": ids} for ids in tok.encode_batch(texts, allowed_special=set())]

    return _batched_py(dataset, "text", fn, ("targets",))


def _parse(value: bytes, name: str, fields: tuple[str, ...]) -> dict | None:
    try:
        rec = json.loads(value)
    except ValueError:
        _drop(name, "bad_json")
        return None
    missing = [f for f in fields if f not in rec]
    if missing:
        _drop(name, "missing_" + "_".join(missing))
        return None
    return rec


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def chatml_sft(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """Conversations -> `targets` and `loss_weights` (spec §5.1 label layout)."""
    tok = _tokenizer(output_features, "targets")

    def one(value: bytes) -> dict | None:
        rec = _parse(value, "chatml_sft", ("messages",))
        if rec is None:
            return None
        try:
            ids, weights = chatml.sft_example(
                tok, rec["messages"], rec.get("system", chatml.DEFAULT_SYSTEM)
            )
        except (KeyError, TypeError, ValueError):
            _drop("chatml_sft", "bad_conversation")
            return None
        return {"targets": ids, "loss_weights": weights}

    return _batched_py(
        dataset, "json", lambda vs: [one(v) for v in vs], ("targets", "loss_weights")
    )


def preference(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """(prompt, chosen, rejected) -> `chosen`, `rejected` token sequences + `prompt_length`."""
    tok = _tokenizer(output_features, "chosen")

    def one(value: bytes) -> dict | None:
        rec = _parse(value, "preference", ("prompt", "chosen", "rejected"))
        if rec is None:
            return None
        system = rec.get("system", chatml.DEFAULT_SYSTEM)
        try:
            chosen, n = chatml.preference_tokens(
                tok, _messages(rec["prompt"]), rec["chosen"], system
            )
            rejected, _ = chatml.preference_tokens(
                tok, _messages(rec["prompt"]), rec["rejected"], system
            )
        except (KeyError, TypeError, ValueError):
            _drop("preference", "bad_conversation")
            return None
        return {"chosen": chosen, "rejected": rejected, "prompt_length": n}

    return _batched_py(
        dataset,
        "json",
        lambda vs: [one(v) for v in vs],
        ("chosen", "rejected"),
        {"prompt_length": tf.int32},
    )


def chat_prompt(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """Prompt-only conversations (PPO rollouts, evals) -> `prompt` ids + `answer` string."""
    tok = _tokenizer(output_features, "prompt")

    def one(value: bytes) -> dict | None:
        rec = _parse(value, "chat_prompt", ("prompt",))
        if rec is None:
            return None
        try:
            ids = chatml.build_prompt(
                tok,
                _messages(rec["prompt"]),
                system=rec.get("system", chatml.DEFAULT_SYSTEM),
                max_window_tokens=1 << 30,
            )
        except (KeyError, TypeError, ValueError):
            _drop("chat_prompt", "bad_conversation")
            return None
        return {"prompt": ids, "answer": str(rec.get("answer", "")).encode("utf-8")}

    return _batched_py(
        dataset, "json", lambda vs: [one(v) for v in vs], ("prompt",), {"answer": tf.string}
    )
