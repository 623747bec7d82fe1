"""The RL run's prompts: fixed-size batches of ChatML prompt ids (+ their reward records) in a
deterministic, checkpointable order, read through seqio (data/rl_tasks.py, data/pipeline.py).

`data.mixture` names them (rl_tasks.prompt_dataset: an RL prompt Task, any sft / preference /
prompt Task or Mixture, or .jsonl files); `data.seed` seeds the order; `data.data_dir` is where
file-backed Tasks read. Every process reads the same prompts (the RL iteration takes the whole
batch of prompts on every host). The train split repeats epoch after epoch.

Too-long prompts are an ERROR, not a skip: `check_prompts` reads the whole split once
before anything is compiled and names the first prompt longer than rl.max_prompt_len (its
task, epoch position and opening words); for GRPO it also names the first record without the
rule reward's field. A silent skip would change the prompt distribution
the run reports on, and a rollout budget too small for the data is a configuration mistake
better fixed (raise max_prompt_len or filter the data) than hidden in a counter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_jax.cli import UsageError
from qwen_jax.data.pipeline import BatchIterator, get_iterator
from qwen_jax.data.rl_tasks import prompt_dataset
from qwen_jax.tokenizer.base import Tokenizer


class PromptError(UsageError):
    """A prompt the run cannot use (too long for rl.max_prompt_len; one line, exit 2)."""


@dataclasses.dataclass
class PromptBatch:
    prompts: list[list[int]]  # ChatML ids ending with `<|im_start|>assistant\n`
    records: list[dict]  # per prompt: {"answer": str} / {"tests": str} when the record has them


def _iterator(config, tokenizer: Tokenizer, split: str, num_epochs: int | None) -> BatchIterator:
    d, rl = config.data, config.rl
    return get_iterator(
        prompt_dataset(d.mixture),
        split=split,
        sequence_length=rl.max_prompt_len,
        batch_size=rl.prompts_per_step,
        seed=d.seed,
        pack=False,
        data_dir=d.data_dir or None,
        vocab=tokenizer,
        num_epochs=num_epochs,
        max_bad_fraction=d.max_bad_fraction,
    )


def _record(ex: dict) -> dict:
    out = {}
    for key in ("answer", "tests"):
        value = ex[key].decode("utf-8") if key in ex else ""
        if value:
            out[key] = value
    return out


def _too_long(it: BatchIterator, task: str, ex: dict, limit: int) -> PromptError:
    ids = np.asarray(ex["prompt"])
    text = it.tokenizer.decode([int(i) for i in ids]).replace("\n", " ")
    return PromptError(
        f"prompt {int(ex['_index'])} (epoch {int(ex['_epoch'])}) of task "
        f"{task} has {len(ids)} tokens, more than rl.max_prompt_len={limit}: "
        f"{text[:80]!r}... (raise rl.max_prompt_len or drop such prompts from the data)"
    )


class PromptStream:
    """`next()` -> PromptBatch of rl.prompts_per_step prompts; `get_state()` / `set_state()`
    give and take the JSON position (the pipeline's), so a resumed run sees the same prompts
    as an uninterrupted one."""

    def __init__(self, config, tokenizer: Tokenizer, split: str = "train"):
        self.limit = config.rl.max_prompt_len
        self.it = _iterator(config, tokenizer, split, None)

    def next(self) -> PromptBatch:
        prompts, records = [], []
        while len(prompts) < self.it.batch_size:
            got = self.it.next_example()
            if got is None:
                raise PromptError(f"{self.it.name}: the {self.it.split} split has no prompts")
            task, ex = got
            if len(ex["prompt"]) > self.limit:  # the upfront check makes this unreachable
                raise _too_long(self.it, task, ex, self.limit)
            prompts.append([int(i) for i in ex["prompt"]])
            records.append(_record(ex))
        self.it.batches += 1  # a batch of our own: the position records count batches too
        return PromptBatch(prompts, records)

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)

    def close(self) -> None:
        self.it.close()


def check_prompts(config, tokenizer: Tokenizer, split: str = "train") -> int:
    """Read `split` once (one epoch) and raise PromptError naming the first prompt longer than
    rl.max_prompt_len, or (GRPO) the first whose record lacks the rule reward's field
    ("answer" for math, "tests" for code); returns the number of prompts."""
    from qwen_jax.rl.rewards import RULE_REWARDS

    rl = config.rl
    field = RULE_REWARDS[rl.reward_fn].field if rl.algorithm == "grpo" else None
    it = _iterator(config, tokenizer, split, 1)
    n = 0
    try:
        while (got := it.next_example()) is not None:
            task, ex = got
            if len(ex["prompt"]) > rl.max_prompt_len:
                raise _too_long(it, task, ex, rl.max_prompt_len)
            if field is not None and field not in _record(ex):
                raise PromptError(
                    f"prompt {int(ex['_index'])} (epoch {int(ex['_epoch'])}) of task "
                    f"{task} has no {field!r}: rl.reward_fn="
                    f"{rl.reward_fn!r} scores responses against it"
                )
            n += 1
    finally:
        it.close()
    if n == 0:
        raise PromptError(f"{it.name}: the {split} split has no prompts")
    return n
