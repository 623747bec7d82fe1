"""This process's share of the global batch: fixed logical data shards, a block per process.

The global batch of each step is the concatenation, in shard order, of
`global_batch / num_shards` rows from each logical data shard's iterator (seqio reads shard s of
`num_shards`). Each process owns a contiguous block of shards. With `num_shards` fixed, the global
batch is therefore the same whatever the number of processes: one process with 8 devices and two
processes with 4 each train on identical batches. By default there is one shard per process.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from qwen_jax.train.config import TrainConfig


def shards_of_process(num_shards: int) -> range:
    """The logical shards this process reads: a contiguous block of num_shards / processes."""
    procs, pid = jax.process_count(), jax.process_index()
    if num_shards % procs:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of {procs} processes")
    per = num_shards // procs
    return range(pid * per, (pid + 1) * per)


class ShardedData:
    """The owned shard iterators of one split, concatenated into this process's rows.

    `dataset` is a registered seqio Task or Mixture, or user files (a path or glob of .jsonl
    text / chat / preference records or .txt, local or gs://; qwen_jax.data.user_files),
    registered here as a Task.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: str,
        split: str,
        vocab,
        features: Sequence[str],
    ):
        from qwen_jax.data.pipeline import get_iterator
        from qwen_jax.data.user_files import dataset_name

        d = config.data
        self.features = tuple(features)
        self.num_shards = d.num_shards or jax.process_count()
        if d.global_batch % self.num_shards:
            raise ValueError(
                f"data.global_batch={d.global_batch} must divide into {self.num_shards} shards"
            )
        self.rows = d.global_batch // self.num_shards
        name = dataset_name(dataset, vocab)
        self.iterators = [
            get_iterator(
                name,
                split=split,
                sequence_length=d.seq_len,
                batch_size=self.rows,
                seed=d.seed,
                shard_index=s,
                num_shards=self.num_shards,
                pack=d.pack,
                data_dir=d.data_dir or None,
                vocab=vocab,
                max_bad_fraction=d.max_bad_fraction,
            )
            for s in shards_of_process(self.num_shards)
        ]

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch: {feature: [rows x shards, ...]}."""
        parts = [next(it) for it in self.iterators]
        missing = sorted(set(self.features) - set(parts[0]))
        if missing:
            raise ValueError(
                f"the data yields {sorted(parts[0])}, but the objective reads {missing}"
            )
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in self.features}

    def get_state(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_state(self, states: list) -> None:
        if len(states) != len(self.iterators):
            raise ValueError(f"{len(states)} saved data shards, {len(self.iterators)} owned now")
        for it, s in zip(self.iterators, states):
            it.set_state(s)
