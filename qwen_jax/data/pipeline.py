"""`get_iterator`: deterministic, sharded, resumable batches from a seqio Task or Mixture.

Per task, examples come from the Task's own seqio pipeline (`Task.get_dataset`: our
`CorpusSource`, then the Task's preprocessors), with the source positioned at a resume point
and running epoch after epoch. In Python we then mix tasks (a seeded draw per example, with
the Mixture's rates), pack rows (`packing.py`) and stack batches. Everything is a function of
(seed, shard, position), so the state is small and JSON-serializable:
    per task: (epoch, index of the next example in that epoch's pass),
    the number of mixture draws, and the example that continues into the next row,
and `set_state` resumes exactly: the next batches equal those an uninterrupted run yields.
Restoring costs a re-read of the current epoch's prefix of each task's shard (read and
filtered, not tokenized), never a replay of training batches. Each host has its own state
(its shard): save one per process.
"""

from __future__ import annotations

import atexit
import gc
import weakref
import zlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
import seqio

from qwen_jax.data import mixtures, rl_tasks, tasks  # noqa: F401  (register Tasks, Mixtures)
from qwen_jax.data.packing import Example, Packer
from qwen_jax.data.sources import DataError
from qwen_jax.data.tf_setup import tf
from qwen_jax.data.vocabularies import TokenizerVocabulary
from qwen_jax.tokenizer.base import Tokenizer

STATE_FORMAT = "qwen_jax.data.pipeline/1"
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()


_PY_BATCH = 128  # examples per tf.data -> numpy crossing


def registered_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def resolve(name: str) -> tuple[list[seqio.Task], list[float]]:
    """Tasks and normalized rates of a registered Mixture or Task (clear error otherwise)."""
    if name in seqio.MixtureRegistry.names():
        mix = seqio.get_mixture_or_task(name)
        ts = sorted(mix.tasks, key=lambda t: t.name)
        rates = [float(mix.get_rate(t)) for t in ts]
    elif name in seqio.TaskRegistry.names():
        ts, rates = [seqio.get_mixture_or_task(name)], [1.0]
    else:
        raise ValueError(f"unknown task or mixture {name!r}; registered: {registered_names()}")
    total = sum(rates)
    if total <= 0:
        raise ValueError(f"mixture {name!r} has no positive rates")
    return ts, [r / total for r in rates]


def _seed(*parts: int | str) -> int:
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


class _TaskStream:
    """One task's examples from an (epoch, index) position; epochs follow one another inside
    the source (one tf.data pipeline, traced once)."""

    def __init__(self, it: BatchIterator, task: seqio.Task, number: int):
        # a weak reference: no cycle, so a dropped BatchIterator stops its readers at once
        self._it, self.task, self.number = weakref.ref(it), task, number
        self.epoch, self.next_index = 0, 0
        self._rows: Iterator | None = None
        self._source = None

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.next_index, self._rows = epoch, index, None

    def _open(self) -> None:
        it = self._it()
        changes = {} if it.max_bad_fraction is None else {"max_bad_fraction": it.max_bad_fraction}
        source = self.task.source.replace(
            data_dir=it.data_dir,
            start_epoch=self.epoch,
            start_index=self.next_index,
            repeat=it.repeat,
            **changes,
        )
        ds = self.task.replace(source=source).get_dataset(
            sequence_length=None,
            split=it.split,
            use_cached=False,
            shuffle=True,
            seed=_seed(it.seed, self.task.name),
            shard_info=seqio.ShardInfo(it.shard_index, it.num_shards),
            num_epochs=1,  # the source itself repeats (see CorpusSource)
            trim_output_features=False,
            try_in_mem_cache=False,
        )
        self._source = source
        self._rows = self._examples(ds.ragged_batch(_PY_BATCH).as_numpy_iterator())

    @staticmethod
    def _examples(batches) -> Iterator[dict]:
        for batch in batches:
            keys = list(batch)
            for j in range(len(batch["_index"])):
                yield {k: batch[k][j] for k in keys}

    def next(self) -> dict | None:
        """The next example (numpy features, `_epoch`, `_index`); None once a non-repeating
        split is exhausted."""
        if self._rows is None:
            self._open()
        try:
            ex = next(self._rows)
        except StopIteration:
            if self._source.error is not None:  # the reader stopped on it (sources.py)
                self._rows = None
                raise self._source.error from None
            return None
        except tf.errors.OpError as e:
            raise DataError(f"reading task {self.task.name}: {e.message}") from None
        self.epoch, self.next_index = int(ex["_epoch"]), int(ex["_index"]) + 1
        return ex

    def close(self) -> None:
        self._rows = None  # drops the tf.data iterator, which stops its background threads

    def stats(self) -> dict:
        """Reader counters of the passes read so far (read-ahead included)."""
        return dict(self._source.stats) if self._source is not None else {}


class BatchIterator:
    """Iterator of batches (dicts of numpy arrays) with `get_state`/`set_state`.

    lm/sft tasks: the `packing.FEATURES`, int32 [batch_size, sequence_length].
    preference:   chosen_tokens, rejected_tokens [B, T]; chosen_lengths, rejected_lengths,
                  prompt_lengths [B] (the reward is read at index length-1: `<|im_end|>`).
    prompt:       prompt_tokens [B, T], prompt_lengths [B], answers (object array of str) [B].
    Token padding is the tokenizer's `pad_id`. Pairs/prompts longer than T are skipped and
    counted; SFT conversations longer than T are truncated and counted (`stats()`).
    """

    def __init__(
        self,
        name: str,
        *,
        split: str,
        sequence_length: int,
        batch_size: int,
        seed: int,
        shard_index: int,
        num_shards: int,
        pack: bool,
        data_dir: str | None,
        vocab,
        num_epochs: int | None,
        max_bad_fraction: float | None = None,
    ):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        if num_epochs not in (None, 1):
            raise ValueError("num_epochs must be None (repeat) or 1")
        self.name, self.split, self.seed = name, split, seed
        self.sequence_length, self.batch_size, self.pack = sequence_length, batch_size, pack
        self.shard_index, self.num_shards, self.data_dir = shard_index, num_shards, data_dir
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} is not in [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.repeat = num_epochs is None and split == "train"
        task_list, self.rates = resolve(name)
        self.vocab = _as_vocabulary(vocab) if vocab is not None else None
        kinds = {tasks.task_kind(t) for t in task_list}
        if len(kinds) != 1:
            raise ValueError(f"{name}: cannot mix task kinds {sorted(kinds)}")
        self.kind = kinds.pop()
        if self.vocab is not None:
            task_list = [
                t.replace(output_features=tasks.output_features(self.kind, self.vocab))
                for t in task_list
            ]
        key = {"lm": "targets", "sft": "targets", "preference": "chosen", "prompt": "prompt"}
        vocabulary = task_list[0].output_features[key[self.kind]].vocabulary
        self.tokenizer: Tokenizer = vocabulary.tokenizer
        for t in task_list:  # fail now, not minutes later, on a missing file or split
            t.source.replace(data_dir=data_dir).files(split)
        self.streams = [_TaskStream(self, t, i) for i, t in enumerate(task_list)]
        self.packer = Packer(sequence_length, self.tokenizer.eod_id, self.tokenizer.pad_id, pack)
        self.draws = self.batches = 0
        self.exhausted: set[int] = set()
        self.examples, self.tokens, self.skipped = Counter(), Counter(), Counter()
        self._choices: tuple[int, np.ndarray] | None = None
        self._opened = False
        _LIVE.add(self)

    # ----- mixing -------------------------------------------------------------------------
    def _draw(self) -> int:
        """Task of the `draws`-th mixture draw: seeded per block of 4096 draws, so any
        position is recomputed in O(1)."""
        block = self.draws // 4096
        if self._choices is None or self._choices[0] != block:
            rng = np.random.default_rng(_seed(self.seed, self.shard_index, "mixture", block))
            self._choices = (block, rng.choice(len(self.rates), size=4096, p=self.rates))
        t = int(self._choices[1][self.draws % 4096])
        self.draws += 1
        return t

    def next_example(self) -> tuple[str, dict] | None:
        """The next example of the mixture, unbatched and unpacked (for readers that batch on
        their own, e.g. the RL prompt stream): (its Task's name, the Task's output features as
        numpy values plus int `_epoch` and `_index`, its position in that Task's split), or
        None when every task is exhausted (num_epochs=1). It advances the position
        `get_state` records exactly as batches do; it neither skips over-long
        examples nor counts a batch (a reader batching on its own adds to `batches`)."""
        got = self._pull_raw()
        return None if got is None else (self.streams[got[0]].task.name, got[1])

    def _pull_raw(self) -> tuple[int, dict] | None:
        while len(self.exhausted) < len(self.streams):
            t = self._draw()
            if t in self.exhausted:
                continue
            stream = self.streams[t]
            ex = stream.next()  # may roll over to the next epoch first
            if ex is None:
                self.exhausted.add(t)
                continue
            self.examples[t] += 1
            return t, ex
        return None

    def _example(self, t: int, ex: dict) -> Example:
        tokens = np.asarray(ex["targets"], np.int32)
        weights = (
            np.asarray(ex["loss_weights"], np.int32) if self.kind == "sft" else np.ones_like(tokens)
        )
        return Example(
            t, int(ex["_epoch"]), int(ex["_index"]), tokens, weights, splittable=self.kind == "lm"
        )

    def _pull_example(self) -> Example | None:
        got = self._pull_raw()
        return None if got is None else self._example(*got)

    # ----- batches ------------------------------------------------------------------------
    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._opened:  # build every task's tf.data up front
            for i, s in enumerate(self.streams):
                if i not in self.exhausted and s._rows is None:
                    s._open()
            self._opened = True
        if self.kind in ("lm", "sft"):
            batch = self._packed_batch()
        else:
            batch = self._pair_batch() if self.kind == "preference" else self._prompt_batch()
        self.batches += 1
        return batch

    def _placed(self, ex: Example, n: int) -> None:
        self.tokens[ex.task] += int(ex.weights[ex.offset : ex.offset + n].sum())

    def _packed_batch(self) -> dict[str, np.ndarray]:
        out = self.packer.empty_batch(self.batch_size)
        # rows left empty end the last batch of a non-repeating split
        filled = sum(
            self.packer.row(out, r, self._pull_example, self._placed)
            for r in range(self.batch_size)
        )
        if not filled:
            raise StopIteration
        return out

    def _fitting(self, keys: tuple[str, ...]) -> list[dict]:
        out = []
        while len(out) < self.batch_size:
            got = self._pull_raw()
            if got is None:
                break
            t, ex = got
            if max(len(ex[k]) for k in keys) > self.sequence_length:
                self.skipped[t] += 1
                continue
            out.append(ex)
            self.tokens[t] += sum(len(ex[k]) for k in keys)
        if not out:
            raise StopIteration
        return out

    def _padded(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        arr = np.full([self.batch_size, self.sequence_length], self.tokenizer.pad_id, np.int32)
        for i, s in enumerate(seqs):
            arr[i, : len(s)] = s
        lengths = np.zeros([self.batch_size], np.int32)
        lengths[: len(seqs)] = [len(s) for s in seqs]
        return arr, lengths

    def _pair_batch(self) -> dict[str, np.ndarray]:
        exs = self._fitting(("chosen", "rejected"))
        out = {}
        for k in ("chosen", "rejected"):
            out[f"{k}_tokens"], out[f"{k}_lengths"] = self._padded([e[k] for e in exs])
        out["prompt_lengths"] = np.zeros([self.batch_size], np.int32)
        out["prompt_lengths"][: len(exs)] = [int(e["prompt_length"]) for e in exs]
        return out

    def _prompt_batch(self) -> dict[str, np.ndarray]:
        exs = self._fitting(("prompt",))
        tokens, lengths = self._padded([e["prompt"] for e in exs])
        answers = np.array(
            [e["answer"].decode("utf-8") for e in exs] + [""] * (self.batch_size - len(exs)),
            dtype=object,
        )
        return {"prompt_tokens": tokens, "prompt_lengths": lengths, "answers": answers}

    def close(self) -> None:
        """Stop the background readers (also done at interpreter exit for live iterators:
        tf.data threads still running a Python generator at shutdown abort the process)."""
        for s in self.streams:
            s.close()
        self._opened = False
        gc.collect()

    # ----- state --------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "name": self.name,
            "split": self.split,
            "sequence_length": self.sequence_length,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "pack": self.pack,
            "repeat": self.repeat,
            "vocab": self.tokenizer.name,
        }

    def get_state(self) -> dict:
        """JSON-serializable position after the last batch returned."""
        positions = {s.task.name: {"epoch": s.epoch, "index": s.next_index} for s in self.streams}
        carry = self.packer.carry
        if carry is not None:  # it re-enters from its own position on restore
            name = self.streams[carry.task].task.name
            positions[name] = {"epoch": carry.epoch, "index": carry.index}
            carry = {"task": name, "offset": carry.offset}
        names = [s.task.name for s in self.streams]
        return {
            "format": STATE_FORMAT,
            "config": self._config(),
            "draws": self.draws,
            "batches": self.batches,
            "tasks": positions,
            "exhausted": sorted(names[i] for i in self.exhausted),
            "carry": carry,
            "examples": {names[i]: n for i, n in self.examples.items()},
            "tokens": {names[i]: n for i, n in self.tokens.items()},
        }

    def set_state(self, state: dict) -> None:
        """Resume at `state` (from `get_state` of an iterator with the same configuration)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a pipeline state of format {STATE_FORMAT}")
        diff = {
            k: (v, state["config"].get(k))
            for k, v in self._config().items()
            if state["config"].get(k) != v
        }
        if diff:
            raise ValueError(
                f"state was saved with a different configuration: {diff} (this run, saved)"
            )
        index = {s.task.name: s for s in self.streams}
        for name, pos in state["tasks"].items():
            index[name].seek(pos["epoch"], pos["index"])
        self.draws, self.batches = state["draws"], state["batches"]
        self.exhausted = {index[n].number for n in state["exhausted"]}
        self.examples = Counter({index[n].number: v for n, v in state["examples"].items()})
        self.tokens = Counter({index[n].number: v for n, v in state["tokens"].items()})
        self.packer.carry, self._opened = None, False
        if state["carry"] is not None:
            stream = index[state["carry"]["task"]]
            epoch, idx = stream.epoch, stream.next_index
            ex = stream.next()
            if ex is None or (int(ex["_epoch"]), int(ex["_index"])) != (epoch, idx):
                raise DataError(
                    f"cannot resume: example {idx} of epoch {epoch} of task "
                    f"{stream.task.name} is gone (the data changed since the state was saved)"
                )
            carry = self._example(stream.number, ex)
            carry.offset = state["carry"]["offset"]
            self.packer.carry = carry

    def stats(self) -> dict:
        """Per task: examples and learned tokens consumed, reader counters (documents read,
        malformed, dropped by each filter), skipped/truncated examples."""
        total_tokens = max(1, sum(self.tokens.values()))
        total_examples = max(1, sum(self.examples.values()))
        out = {}
        for s in self.streams:
            i = s.number
            out[s.task.name] = {
                "rate": self.rates[i],
                "examples": self.examples[i],
                "example_share": self.examples[i] / total_examples,
                "tokens": self.tokens[i],
                "token_share": self.tokens[i] / total_tokens,
                "skipped_too_long": self.skipped[i],
                "epoch": s.epoch,
                "reader": s.stats(),
            }
        return {"tasks": out, "batches": self.batches, "truncated": self.packer.truncated}


def _as_vocabulary(vocab) -> TokenizerVocabulary:
    if isinstance(vocab, TokenizerVocabulary):
        return vocab
    if isinstance(vocab, str):
        return TokenizerVocabulary(vocab)
    if isinstance(vocab, Tokenizer):
        return TokenizerVocabulary(vocab)
    raise TypeError(
        f"vocab must be a load_tokenizer spec, a Tokenizer or a TokenizerVocabulary, "
        f"not {type(vocab).__name__}"
    )


def get_iterator(
    name: str,
    *,
    split: str,
    sequence_length: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    pack: bool = True,
    data_dir: str | None = None,
    vocab: str | Tokenizer | TokenizerVocabulary | None = None,
    num_epochs: int | None = None,
    max_bad_fraction: float | None = None,
) -> BatchIterator:
    """Batches of a registered Task or Mixture for this host (`BatchIterator` documents them).

    batch_size is per host; shard_index/num_shards are usually `jax.process_index()` /
    `jax.process_count()`. vocab: None keeps the Tasks' vocabulary (Qwen's), or a
    `load_tokenizer` spec / Tokenizer. num_epochs: None repeats the "train" split forever and
    reads other splits once; 1 reads once. max_bad_fraction: the fraction of malformed records
    a task's reader skips before failing with a `DataError` (the trainer's
    `data.max_bad_fraction`); None keeps each task's own (`add_corpus_task`, 0.01 by default).
    """
    return BatchIterator(
        name,
        split=split,
        sequence_length=sequence_length,
        batch_size=batch_size,
        seed=seed,
        shard_index=shard_index,
        num_shards=num_shards,
        pack=pack,
        data_dir=data_dir,
        vocab=vocab,
        num_epochs=num_epochs,
        max_bad_fraction=max_bad_fraction,
    )
