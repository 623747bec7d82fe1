"""Corpus sources: seqio `DataSource`s over jsonl, plain-text and TFRecord files, local or
`gs://` (read through `tf.io.gfile`), with sharding, per-epoch shuffling and a resume point.

One pass (epoch e) over a split, for shard i of n:
  1. files = the split's glob patterns (relative ones under `data_dir`), sorted;
     shard by file (files[i::n]) when there are at least n files, else by record
     ((file number + record number) % n == i): every record belongs to exactly one shard;
  2. the shard's files in a random order seeded by (seed, e), records read in file order;
     malformed jsonl lines / TFRecords (and structured records that `records.canonical`
     rejects) are counted by reason and skipped with a warning naming file and line, and
     reading fails with a `DataError` once they exceed `max_bad_fraction` of the records read;
  3. text stages (`text_filters.py`): NFC, exact dedup, quality rules, each drop counted;
  4. a shuffle buffer seeded by (seed, e); each surviving document gets `_index`, its position
     in this pass, and `_epoch`.
A dataset starts at (`start_epoch`, `start_index`): earlier documents of that pass are skipped
after step 4, which is cheap (nothing is tokenized) and keeps dedup state exact (steps 1-3
still see them). With `repeat`, passes e, e+1, ... follow in the same tf.data pipeline.
Steps 1-4 are plain Python in one generator (one thread); tokenization and everything after
run in tf.data. `stats` holds the counters of the passes read so far. An exception in the
generator ends the dataset and is kept in `error` (raising it inside tf.data would print its
traceback through TensorFlow's logging); the reader of the dataset re-raises it
(`pipeline._TaskStream`).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import numpy as np
import seqio

from qwen_jax.data.records import BadRecord, canonical
from qwen_jax.data.text_filters import QualityRules, dedup_key, nfc
from qwen_jax.data.tf_setup import tf

log = logging.getLogger(__name__)

_DOC_BATCH = 64  # documents per generator step: Python->TF crossings are the costly part
# How users change the allowed fraction of bad records (the trainer passes it to
# `pipeline.get_iterator(max_bad_fraction=...)`, which overrides every task's own limit).
BAD_FRACTION_KNOB = "data.max_bad_fraction"


class DataError(RuntimeError):
    """Bad or missing input data (malformed past the allowed fraction, empty corpus, ...)."""


def default_data_dir() -> str:
    """`$QWEN_JAX_DATA_DIR`, else the demo corpus location `~/.cache/qwen-jax/demo-data`."""
    from qwen_jax.tokenizer.assets import cache_root

    return os.environ.get("QWEN_JAX_DATA_DIR") or str(cache_root() / "demo-data")


def file_format(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith((".tfrecord", ".tfrecords")):
        return "tfrecord"
    return "text"


class CorpusSource(seqio.DataSource):
    """Documents from files; see the module docstring for the order of operations.

    record: "text" emits `{"text", "_index", "_epoch"}` (the `text_key` field of jsonl records
      / TFRecord `tf.train.Example`s, or whole text files / their lines per `text_unit`);
      "json" emits `{"json", "_index", "_epoch"}`: structured records, each jsonl line
      verbatim, or with `kind` (sft / preference / prompt) its `records.canonical` form.
    nfc / dedup / quality: the text stages; quality rules apply to `record="text"` only.
    """

    def __init__(
        self,
        splits: Mapping[str, Sequence[str]],
        *,
        record: Literal["text", "json"] = "text",
        kind: str | None = None,
        text_key: str = "text",
        text_unit: Literal["file", "line"] = "file",
        nfc: bool = True,
        dedup: bool = True,
        quality: QualityRules | None = None,
        max_bad_fraction: float = 0.01,
        shuffle_buffer: int = 4096,
        data_dir: str | None = None,
    ):
        super().__init__(splits=tuple(splits), performs_internal_shuffling=True)
        self.patterns = {k: tuple(v) for k, v in splits.items()}
        self.record, self.kind, self.text_key, self.text_unit = record, kind, text_key, text_unit
        self.nfc, self.dedup, self.quality = nfc, dedup, quality
        self.max_bad_fraction, self.shuffle_buffer = max_bad_fraction, shuffle_buffer
        self._data_dir = data_dir
        self.start_epoch, self.start_index, self.repeat = 0, 0, False
        self.stats: Counter = Counter()
        self.error: BaseException | None = None  # the exception that ended reading
        self._first_bad: dict[str, tuple] = {}  # reason -> (file, line, detail) of its first

    _REPLACEABLE = ("data_dir", "start_epoch", "start_index", "repeat", "max_bad_fraction")

    def replace(self, **changes) -> CorpusSource:
        """A copy with any of `_REPLACEABLE` changed (and fresh counters)."""
        new = copy.copy(self)
        for k, v in changes.items():
            if k not in self._REPLACEABLE:
                raise TypeError(f"CorpusSource.replace: {k!r} is not one of {self._REPLACEABLE}")
            setattr(new, "_data_dir" if k == "data_dir" else k, v)
        new.stats, new.error, new._first_bad = Counter(), None, {}
        return new

    @property
    def data_dir(self) -> str:
        return self._data_dir or default_data_dir()

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    @property
    def output_features(self):
        return {}

    def list_shards(self, split: str) -> Sequence[str]:
        return self.files(split)

    def files(self, split: str) -> list[str]:
        """The split's files, sorted; a clear error for an unknown split or missing files."""
        if split not in self.patterns:
            raise ValueError(f"unknown split {split!r}; this source has {sorted(self.patterns)}")
        out = []
        for pattern in self.patterns[split]:
            full = pattern if _is_absolute(pattern) else f"{self.data_dir.rstrip('/')}/{pattern}"
            matches = tf.io.gfile.glob(full)
            if not matches:
                what = "no files match" if any(c in pattern for c in "*?[") else "missing file"
                hint = (
                    ""
                    if _is_absolute(pattern)
                    else (
                        f" (data_dir {self.data_dir}; `qwen-jax data build-demo --out DIR` writes "
                        "the demo corpus)"
                    )
                )
                raise FileNotFoundError(f"{what}: {full}{hint}")
            out += matches
        return sorted(set(out))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """The split's documents (module docstring); the dataset ends early when reading fails:
        `error` then holds the exception (check it once the dataset ends)."""
        del sequence_length, use_cached, num_epochs  # seqio's Task handles these
        files = self.files(split)
        index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        if len(files) >= count:
            assigned, record_shard = list(enumerate(files))[index::count], None
        else:
            log.warning(
                "%d files < %d shards: sharding by record (every host reads all files)",
                len(files),
                count,
            )
            assigned, record_shard = list(enumerate(files)), (index, count)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        key = "json" if self.record == "json" else "text"

        def generate():
            try:
                yield from self._batches(assigned, record_shard, shuffle, seed)
            except Exception as e:  # end the dataset quietly; the reader raises it (docstring)
                self.error = e

        signature = {
            key: tf.TensorSpec([None], tf.string),
            "_index": tf.TensorSpec([None], tf.int64),
            "_epoch": tf.TensorSpec([None], tf.int64),
        }
        ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
        return ds.unbatch()

    def _batches(self, assigned, record_shard, shuffle: bool, seed: int) -> Iterator[dict]:
        self.stats, self.error, self._first_bad = Counter(), None, {}
        key = "json" if self.record == "json" else "text"
        epoch = self.start_epoch
        while True:
            rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
            files = [assigned[i] for i in rng.permutation(len(assigned))] if shuffle else assigned
            docs = self._documents(files, record_shard, self.stats)
            if shuffle:
                docs = _buffer_shuffle(docs, self.shuffle_buffer, rng)
            start = self.start_index if epoch == self.start_epoch else 0
            texts, indices, count = [], [], 0
            for count, doc in enumerate(docs, 1):
                if count <= start:
                    continue
                texts.append(doc.encode("utf-8"))
                indices.append(count - 1)
                if len(texts) == _DOC_BATCH:
                    yield {key: texts, "_index": indices, "_epoch": [epoch] * len(texts)}
                    texts, indices = [], []
            if texts:
                yield {key: texts, "_index": indices, "_epoch": [epoch] * len(texts)}
            self.stats["passes"] += 1
            if count == 0:
                raise DataError(
                    f"no documents left in {len(assigned)} file(s) of this shard after "
                    f"filtering (counters: {dict(self.stats)})"
                )
            if not self.repeat:
                return
            epoch += 1

    def _documents(self, assigned, record_shard, stats: Counter) -> Iterator[str]:
        seen: set[bytes] = set()
        for file_no, path in assigned:
            stats["files"] += 1
            for pos, doc in enumerate(self._records(path, stats)):
                if record_shard and (file_no + pos) % record_shard[1] != record_shard[0]:
                    continue
                if doc is None:
                    continue
                stats["documents"] += 1
                if self.nfc:
                    doc = nfc(doc)
                if self.dedup:
                    k = dedup_key(doc)
                    if k in seen:
                        stats["dropped_duplicate"] += 1
                        continue
                    seen.add(k)
                if self.quality is not None and self.record == "text":
                    reason = self.quality.check(doc)
                    if reason:
                        stats[f"dropped_{reason}"] += 1
                        continue
                stats["kept"] += 1
                yield doc

    def _records(self, path: str, stats: Counter) -> Iterator[str | None]:
        """Every record of one file, None for a malformed one (after counting it)."""
        fmt = file_format(path)
        if fmt == "text" and self.record == "text":
            with open_binary(path) as f:
                data = f.read().decode("utf-8", errors="replace")
            if self.text_unit == "file":
                yield data
            else:
                yield from (line for line in data.splitlines() if line.strip())
            return
        if fmt == "text":
            raise DataError(f"{path}: structured (json) records need a .jsonl file")
        bad = 0
        for lineno, raw in self._raw_records(path, fmt):
            stats["records"] += 1
            try:
                doc = self._parse(raw, fmt)
            except BadRecord as e:
                doc, bad = None, bad + 1
                stats["malformed"] += 1
                stats[f"malformed_{e.reason}"] += 1
                where = f"{path}:{lineno}" if fmt == "jsonl" else f"{path} record {lineno}"
                self._first_bad.setdefault(e.reason, (path, lineno, str(e)[:160]))
                if bad <= 5:
                    log.warning("%s: %s; record skipped", where, e)
            yield doc
            if stats["records"] % 1000 == 0:
                self._check_bad(path, stats)
        if bad:
            log.warning("%s: skipped %d malformed records", path, bad)
        self._check_bad(path, stats)

    def _check_bad(self, path: str, stats: Counter) -> None:
        bad, total = stats["malformed"], stats["records"]
        if bad > self.max_bad_fraction * total:
            reasons = Counter(
                {k[len("malformed_") :]: v for k, v in stats.items() if k.startswith("malformed_")}
            )
            reason, n = reasons.most_common(1)[0]
            first_path, number, detail = self._first_bad[reason]
            where = "" if first_path == path else f"{first_path} "
            where += f"line {number}" if file_format(first_path) == "jsonl" else f"record {number}"
            # the knob before the details: a one-line error report may cut a long message
            raise DataError(
                f"{path}: {bad} malformed of {total} records read so far, more than "
                f"max_bad_fraction={self.max_bad_fraction} (fix the data, or raise the limit "
                f"with --config.{BAD_FRACTION_KNOB}=<fraction>); most common reason: {reason} "
                f"({n}x, first at {where}: {detail})"
            )

    @staticmethod
    def _raw_records(path: str, fmt: str) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of non-blank jsonl lines; (record number, bytes) of TFRecords."""
        if fmt == "tfrecord":
            compression = "GZIP" if path.endswith(".gz") else ""
            for n, rec in enumerate(tf.data.TFRecordDataset(path, compression_type=compression)):
                yield n + 1, rec.numpy()
            return
        with open_binary(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line

    def _parse(self, raw: bytes, fmt: str) -> str:
        """The document of one record; BadRecord (with its reason) when there is none."""
        if fmt == "tfrecord":
            try:
                feature = tf.train.Example.FromString(raw).features.feature
            except Exception as e:  # protobuf's DecodeError
                raise BadRecord("bad_tfrecord", "not a tf.train.Example") from e
            values = feature[self.text_key].bytes_list.value if self.text_key in feature else []
            if not values:
                raise BadRecord("no_text", f"no {self.text_key!r} bytes feature")
            try:
                return values[0].decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord("bad_utf8", f"{self.text_key!r} is not UTF-8") from e
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise BadRecord("bad_utf8", "the line is not UTF-8") from e
        except ValueError as e:
            raise BadRecord("bad_json", f"not JSON ({e})") from e
        if not isinstance(obj, dict):
            raise BadRecord("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        if self.record == "json":
            if self.kind is None:
                return raw.decode("utf-8").strip()
            return json.dumps(canonical(self.kind, obj), ensure_ascii=False)
        if self.text_key not in obj:
            raise BadRecord("no_text", f"no {self.text_key!r} field (keys: {sorted(obj)[:8]})")
        text = obj[self.text_key]
        if not isinstance(text, str):
            raise BadRecord("non_string_text", f"{self.text_key!r} is {type(text).__name__}")
        return text


def _is_absolute(pattern: str) -> bool:
    return pattern.startswith("/") or "://" in pattern


@contextlib.contextmanager
def open_binary(path: str):
    """Binary file object, gunzipped for `.gz`; local paths use the OS (faster than GFile)."""
    f = tf.io.gfile.GFile(path, "rb") if "://" in path else open(path, "rb")  # noqa: SIM115
    try:
        yield gzip.GzipFile(fileobj=f) if path.endswith(".gz") else f
    finally:
        f.close()


def _buffer_shuffle(items: Iterator[str], size: int, rng: np.random.Generator) -> Iterator[str]:
    """Seeded streaming shuffle: hold `size` items, emit a random one as each new one arrives."""
    buf: list[str] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]
