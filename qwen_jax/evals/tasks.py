"""The shape every benchmark takes once built: items, how to query the model, how to score.

A benchmark module exposes `build(data_dir, *, shots, chat, **options) -> Task`. `shots=None`
means the report's protocol (MMLU 5, C-Eval 5, GSM8K 8, MATH 4, HumanEval 0, MBPP 3; chat 0).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qwen_jax.evals.sandbox import Limits

# benchmark name -> module with `build` (or "module:function" for a module of several)
BENCHMARKS = {
    "mmlu": "qwen_jax.evals.mmlu",
    "ceval": "qwen_jax.evals.ceval",
    "gsm8k": "qwen_jax.evals.gsm8k",
    "math": "qwen_jax.evals.competition_math",
    "humaneval": "qwen_jax.evals.humaneval",
    "mbpp": "qwen_jax.evals.mbpp",
    "ci_math": "qwen_jax.evals.ci_math",
    "tool_select": "qwen_jax.evals.tool_select",
    # the reproduction chain's held-out synthetic domains (the demo corpus's eval/ files)
    "synth_math": "qwen_jax.evals.synth:build_math",
    "synth_code": "qwen_jax.evals.synth:build_code",
    "code_ppl": "qwen_jax.evals.synth:build_ppl",
}
# What `eval run` runs when no --benchmarks is given: the report's Table 2 / 5 benchmarks. The
# tool-use evaluations (Tables 6-8) start a sandboxed kernel per problem: asked for by name.
DEFAULT_BENCHMARKS = ("mmlu", "ceval", "gsm8k", "math", "humaneval", "mbpp")


@dataclasses.dataclass(frozen=True)
class Item:
    """One sample. `meta` holds what scoring needs (JSON-serialisable); `error` marks a
    malformed input row, recorded with status "bad_input" and never sent to the model."""

    id: str
    category: str
    prompt: str
    gold: str
    meta: dict = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """extracted: the answer read from the output; status: "scored", "no_answer", or a
    sandbox status (passed, failed, error, timeout, memory, blocked)."""

    extracted: str | None
    correct: bool
    status: str = "scored"
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark under one protocol.

    kind="choice": the model gives next-token log-probs over `candidates`; the chosen
    candidate (stripped) is the output passed to `score`. kind="generate": greedy generation
    with `stop` and `max_new_tokens`; the text is the output.
    `score(items, outputs)` judges a batch (code tasks run it through the sandbox in parallel).
    `query(model, items) -> outputs`, when given, replaces both (multi-step tasks: the agent
    evaluations; outputs are then JSON-serialisable values). `report(records) -> {"metrics":
    dict, "table": markdown}`, when given, adds the benchmark's own table to the summary.
    """

    name: str
    kind: str
    items: list[Item]
    score: Callable[[list[Item], list[str]], list[Verdict]]
    candidates: tuple[str, ...] = ()
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    average: str = "micro"
    groups: dict[str, tuple[str, ...]] | None = None
    metric: str = "accuracy"
    query: Callable | None = None
    report: Callable[[list[dict]], dict] | None = None


def task_name(benchmark: str, shots: int, chat: bool) -> str:
    return f"{benchmark}{'-chat' if chat else ''}-{shots}shot"


def build_task(
    benchmark: str, data_dir: str | Path, *, shots: int | None = None, chat: bool = False, **opts
) -> Task:
    """Build `benchmark` from the files under `data_dir` (see qwen_jax.evals.data)."""
    if benchmark not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCHMARKS)}")
    module, _, func = BENCHMARKS[benchmark].partition(":")
    build = getattr(importlib.import_module(module), func or "build")
    return build(Path(data_dir), shots=shots, chat=chat, **opts)


def bad_item(item_id: str, category: str, error: Exception | str) -> Item:
    return Item(item_id, category, "", "", error=str(error))


def check_shots(benchmark: str, shots: int, available: int) -> int:
    if not 0 <= shots <= available:
        raise ValueError(f"{benchmark}: shots must be in [0, {available}], got {shots}")
    return shots


def choice_items(
    subject: str,
    load_split: Callable[[str, str], list[dict]],
    eval_split: str,
    *,
    shots: int,
    chat: bool,
    parse_row: Callable[[dict], tuple[str, list[str], str]],
    format_example: Callable[[str, list[str], str | None], str],
    chat_query: Callable[[str, list[str]], str],
    header: str = "",
) -> list[Item]:
    """The items of one subject of a 4-way multiple-choice benchmark (MMLU, C-Eval).

    Base: `header` + the first `shots` dev rows as solved examples + the question, unsolved.
    Chat: the benchmark's query through ChatML. A malformed row, or malformed dev exemplars
    (without which no question of the subject can run), becomes a "bad_input" item. `meta`
    holds the question and options (what chat answer extraction needs).
    """
    from qwen_jax.evals.model_api import chat_prompt

    prefix: str | Exception = ""
    if not chat:
        try:
            dev = [parse_row(r) for r in load_split(subject, "dev")[:shots]]
            prefix = header + "".join(format_example(*ex) for ex in dev)
        except ValueError as e:
            prefix = e
    items = []
    for i, row in enumerate(load_split(subject, eval_split)):
        item_id = f"{subject}/{i}"
        try:
            if isinstance(prefix, Exception):
                raise ValueError(f"dev exemplars: {prefix}")
            question, options, answer = parse_row(row)
        except ValueError as e:
            items.append(bad_item(item_id, subject, e))
            continue
        if chat:
            prompt = chat_prompt(chat_query(question, options))
        else:
            prompt = prefix + format_example(question, options, None)
        meta = {"options": options, "question": question}
        items.append(Item(item_id, subject, prompt, answer, meta))
    return items


def code_verdicts(
    codes: list[str], programs: list[str], limits: Limits, workers: int
) -> list[Verdict]:
    """Run each program in the sandbox; a sample is correct iff its program ran to the end."""
    from qwen_jax.evals.sandbox import execute_many

    results = execute_many(programs, limits, workers=workers)
    return [Verdict(c, r.status == "passed", r.status, r.detail) for c, r in zip(codes, results)]
