"""RL prompt Tasks: the prompts PPO/GRPO roll out from, read through seqio (kind "prompt").

An RL prompt Task wraps the files of any chat-shaped corpus and emits, per record,
    prompt   int32 ids: the conversation rendered in ChatML up to and including the open
             `<|im_start|>assistant\\n` (tokenizer/chatml.py build_prompt, nothing dropped)
    answer   string: the record's "answer" field (rule rewards: math), "" when absent
    tests    string: the record's "tests" field (rule rewards: code), "" when absent
The prompt is taken from a record of any kind, by its keys (records.detect_kind):
    preference  {"prompt"/"messages", "chosen", "rejected"}  -> the prompt part
    sft         {"messages"/"conversations"/...}             -> the conversation up to and
                                                                including its last user turn
    prompt      {"prompt": str | [turns]}                    -> the prompt
`answer_from_reply=True` (math SFT data without an "answer" field) reads the answer as the last
integer of the reply after the last user turn (evals/extract.py's rule: "The answer is N.").

The reader passes records through verbatim (so "answer"/"tests" survive; the canonical record
forms drop them) and the preprocessor checks them with records.canonical: a malformed record
is dropped and counted in preprocessors.DROPPED ("rl_prompt:<reason>").

`prompt_dataset(spec)` resolves what `data.mixture` names for an RL run: an RL prompt Task
(registered here), any other registered Task or Mixture of sft / preference / prompt records
(wrapped as `rl_prompts__<name>`, same files and rates), or user jsonl files (a path, glob or
comma-separated list; registered as `rl_prompts_files_<crc32>_v1`, the same files for every
split, as user_files.py does).
"""

from __future__ import annotations

import functools
import json
import os
import zlib

import seqio

from qwen_jax.data import preprocessors as prep
from qwen_jax.data import tasks
from qwen_jax.data.records import BadRecord, canonical, detect_kind
from qwen_jax.data.sources import CorpusSource
from qwen_jax.data.tf_setup import tf
from qwen_jax.tokenizer import chatml

_USER_SUFFIXES = (".jsonl", ".jsonl.gz")
_SPLITS = ("train", "validation", "test")


def _turns_and_answer(obj: dict, answer_from_reply: bool) -> tuple[str, list[dict], str]:
    """(system, prompt turns ending with a user turn, answer) of one raw record."""
    kind = detect_kind(obj)
    if kind not in ("sft", "preference", "prompt"):
        raise BadRecord("not_a_chat", f"no prompt in a record with keys {sorted(obj)[:8]}")
    rec = canonical(kind, obj)
    reply = ""
    if kind == "sft":
        turns = rec["messages"]
        last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)
        if last_user < 0:
            raise BadRecord("no_user_turn", "the conversation has no user turn")
        reply = " ".join(t["content"] for t in turns[last_user + 1 :])
        turns = turns[: last_user + 1]
    else:
        turns = rec["prompt"]
    if not turns or turns[-1]["role"] != "user":
        raise BadRecord("no_user_turn", "the prompt does not end with a user message")
    answer = obj.get("answer")
    if answer is None and answer_from_reply:
        from qwen_jax.evals.extract import last_number

        answer = last_number(reply)
        if answer is None:
            raise BadRecord("no_answer", "no number in the reply to read the answer from")
    return rec["system"], turns, "" if answer is None else str(answer)


def rl_prompt(dataset: tf.data.Dataset, output_features, answer_from_reply: bool = False):
    """Raw json records -> `prompt` ids, `answer` and `tests` strings (module docstring)."""
    tok = prep._tokenizer(output_features, "prompt")

    def one(value: bytes) -> dict | None:
        try:
            obj = json.loads(value)
            if not isinstance(obj, dict):
                raise BadRecord("not_an_object", "expected a JSON object")
            system, turns, answer = _turns_and_answer(obj, answer_from_reply)
            ids = chatml.build_prompt(tok, turns, system=system, max_window_tokens=1 << 30)
        except BadRecord as e:
            prep._drop("rl_prompt", e.reason)
            return None
        except (ValueError, TypeError, KeyError):
            prep._drop("rl_prompt", "bad_conversation")
            return None
        tests = obj.get("tests", "")
        tests = tests if isinstance(tests, str) else json.dumps(tests)
        return {"prompt": ids, "answer": answer.encode(), "tests": tests.encode()}

    return prep._batched_py(
        dataset,
        "json",
        lambda vs: [one(v) for v in vs],
        ("prompt",),
        {"answer": tf.string, "tests": tf.string},
    )


def add_prompt_task(
    name: str,
    splits: dict[str, list[str]],
    *,
    answer_from_reply: bool = False,
    dedup: bool = True,
    max_bad_fraction: float = 0.01,
    shuffle_buffer: int = 4096,
) -> seqio.Task:
    """Register an RL prompt Task over jsonl `splits` (split -> glob patterns, relative to the
    data dir or absolute / gs://)."""
    source = CorpusSource(
        splits,
        record="json",
        kind=None,  # verbatim: the preprocessor checks records and keeps answer/tests
        dedup=dedup,
        max_bad_fraction=max_bad_fraction,
        shuffle_buffer=shuffle_buffer,
    )
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[functools.partial(rl_prompt, answer_from_reply=answer_from_reply)],
        output_features=tasks.output_features("prompt", tasks.QWEN_VOCAB),
        shuffle_buffer_size=None,
    )


def is_prompt_task(name: str) -> bool:
    return name in _PROMPT_TASKS


_PROMPT_TASKS: set[str] = set()


def _register(name: str, splits: dict[str, list[str]], **kw) -> str:
    if name not in seqio.TaskRegistry.names():
        add_prompt_task(name, splits, **kw)
    _PROMPT_TASKS.add(name)
    return name


def _wrap_task(task: seqio.Task) -> str:
    """An RL prompt Task over the files of a registered corpus Task."""
    if task.name in _PROMPT_TASKS:
        return task.name
    source = task.source
    if not isinstance(source, CorpusSource) or source.record != "json":
        raise ValueError(
            f"task {task.name} holds no chat records (kind {tasks.task_kind(task)}); RL prompts "
            "come from sft, preference or prompt tasks, or .jsonl files"
        )
    splits = {k: list(v) for k, v in source.patterns.items()}
    return _register(
        f"rl_prompts__{task.name}",
        splits,
        dedup=source.dedup,
        max_bad_fraction=source.max_bad_fraction,
        shuffle_buffer=source.shuffle_buffer,
    )


def prompt_dataset(spec: str) -> str:
    """The registered RL prompt Task or Mixture for `spec` (module docstring); ValueError for
    a spec that names nothing usable, FileNotFoundError for files that do not exist."""
    if spec in _PROMPT_TASKS:
        return spec
    if spec in seqio.TaskRegistry.names():
        return _wrap_task(seqio.get_mixture_or_task(spec))
    if spec in seqio.MixtureRegistry.names():
        mix = seqio.get_mixture_or_task(spec)
        name = f"rl_prompts__{spec}"
        if name not in seqio.MixtureRegistry.names():
            rates = [(_wrap_task(t), mix.get_rate(t)) for t in mix.tasks]
            seqio.MixtureRegistry.add(name, rates)
        return name
    patterns = [p.strip() for p in spec.removeprefix("prompt:").split(",") if p.strip()]
    if not patterns or not all(p.endswith(_USER_SUFFIXES) for p in patterns):
        raise ValueError(
            f"RL prompts {spec!r}: neither a registered task or mixture nor .jsonl files"
        )
    patterns = [p if "://" in p else os.path.abspath(os.path.expanduser(p)) for p in patterns]
    for p in patterns:
        if not tf.io.gfile.glob(p):
            raise FileNotFoundError(f"RL prompts {spec!r}: no file matches {p}")
    crc = zlib.crc32(json.dumps(patterns).encode())
    return _register(
        f"rl_prompts_files_{crc:08x}_v1",
        {split: patterns for split in _SPLITS},
        dedup=False,
    )


def _layout(prefix: str) -> dict[str, list[str]]:
    return {"train": [f"{prefix}/train*"], "validation": [f"{prefix}/validation*"]}


# The demo corpus's preference prompts (PPO against the demo reward model), and its math SFT
# problems with the answer read from the worked reply (GRPO with the math rule reward).
_register("demo_rl_prompts_v1", _layout("preference"))
_register("demo_rl_math_prompts_v1", _layout("sft/math"), answer_from_reply=True)
