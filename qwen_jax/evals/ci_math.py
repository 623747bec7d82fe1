"""ci_math: GSM8K and MATH problems solved through the code interpreter (report §3.4, Tables 7
and 8, the "Math" columns; spec §6).

Each problem is a ReAct conversation with the single `code_interpreter` tool (the report's
prompt: system "You are a helpful assistant.", `react_query([CODE_INTERPRETER], problem)` as the
user turn), run by `qwen_jax.tools.Agent` on a fresh sandboxed kernel, at most `max_steps`
model calls (the problems of a runner batch step together: one generate call per step).
Scored as the report scores it:
    executable rate  cells that ran without error / cells run (pooled over the problems)
    correct          the ground-truth number appears both in the execution output (of a cell
                     that ran) and in the final answer
"Appears": some number in the text equals the gold within 1e-4 (integers, decimals, thousands
separators, `a/b` and `\\frac{a}{b}`); a MATH answer that is not a number (an expression, an
interval) must appear as a substring after MATH's normalization (`math_equiv.strip_string`).
Problems alternate GSM8K / MATH so that `--limit N` samples both. The report's other columns
(visualization, general code) need its unreleased benchmark and are shown as "-".
"""

from __future__ import annotations

import contextlib
import re
from fractions import Fraction
from pathlib import Path

from qwen_jax.evals.extract import gsm8k_gold
from qwen_jax.evals.math_equiv import strip_string
from qwen_jax.evals.tasks import Item, Task, Verdict, bad_item, task_name
from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM, STOP_TOKENS, render

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(\d+)")
TOLERANCE = 1e-4


def numbers_in(text: str) -> list[float]:
    """Every number written in `text`, fractions included (as their values)."""
    found = [float(m.replace(",", "")) for m in _NUMBER.findall(text)]
    for m in _FRAC.finditer(text):
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else m.group(3, 4)
        if int(den) != 0:
            found.append(float(Fraction(int(num), int(den))))
    return found


def number_value(answer: str) -> float | None:
    """The value of a gold answer that is a number ("42", "-1,234.5", "\\frac{3}{4}", "$5"),
    else None."""
    text = answer.strip().strip("$").replace("\\$", "").replace("\\%", "").replace(" ", "")
    text = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    try:
        return float(text)
    except ValueError:
        pass
    m = _FRAC.fullmatch(text)
    if m is None:
        return None
    num, den = (m.group(1), m.group(2)) if m.group(1) is not None else m.group(3, 4)
    return float(Fraction(int(num), int(den))) if int(den) != 0 else None


def appears(gold: str, text: str) -> bool:
    """Does the ground truth appear in `text` (module docstring's rule)?"""
    value = number_value(gold)
    if value is None:
        target = strip_string(gold)
        return bool(target) and target in strip_string(text)
    return any(abs(v - value) <= TOLERANCE for v in numbers_in(text))


def judge(gold: str, final_answer: str | None, cells: list[dict]) -> bool:
    """The report's correctness: gold in the output of a cell that ran, and in the answer."""
    executed = "\n".join(c["output"] for c in cells if c["status"] == "ok")
    return final_answer is not None and appears(gold, executed) and appears(gold, final_answer)


class AgentTextModel:
    """An `EvalModel` as the agent's text model: the ChatML prompt rendered as text (the evals'
    protocol), greedy, stopped at the ReAct stop words or the end of the turn."""

    def __init__(self, model, max_new_tokens: int):
        self.model, self.max_new_tokens = model, max_new_tokens

    def complete(self, messages, assistant_prefix, stop, on_text=None) -> str:
        (text,) = self.complete_batch([(messages, assistant_prefix)], stop)
        if on_text is not None:
            on_text(text)
        return text

    def complete_batch(self, requests, stop) -> list[str]:
        prompts = [render(m, add_generation_prompt=True) + prefix for m, prefix in requests]
        stops = list(stop) + list(STOP_TOKENS)
        return self.model.generate(prompts, max_new_tokens=self.max_new_tokens, stop=stops)


def transcript(result) -> str:
    """The assistant turn as the model saw it: outputs with the observations appended."""
    from qwen_jax.tools.react import format_observation

    parts = []
    for step in result.steps:
        if step.calls:
            parts.append(
                step.text.rstrip() + format_observation(step.observations[0]) + "\nThought:"
            )
        else:
            parts.append(step.text)
    return "".join(parts)


def solve(model, queries: list[str], *, max_steps: int, max_new_tokens: int, limits=None):
    """Problems through the agent, batched step by step, each on a fresh kernel of its own;
    one JSON record per problem of what happened."""
    from qwen_jax.tools.agent import Agent
    from qwen_jax.tools.interpreter import CodeInterpreter
    from qwen_jax.tools.registry import Registry, add_code_interpreter

    with contextlib.ExitStack() as stack:
        registries, tools = [], []
        for _ in queries:  # a kernel starts only when its problem first runs code
            interpreter = stack.enter_context(CodeInterpreter(limits))
            registries.append(Registry())
            tools.append(add_code_interpreter(registries[-1], interpreter))
        agent = Agent(AgentTextModel(model, max_new_tokens), registries[0], max_steps=max_steps)
        results = agent.run_batch(queries, registries)
    return [
        {
            "final_answer": result.final_answer,
            "outcome": result.outcome,
            "error": result.error,
            "transcript": transcript(result),
            "cells": [{"status": c.status, "output": c.output} for c in tool.cells],
        }
        for result, tool in zip(results, tools)
    ]


def _problems(data_dir: Path) -> list[Item]:
    from qwen_jax.evals import competition_math, gsm8k

    sources = []
    if (data_dir / "gsm8k" / "test.jsonl").exists():
        sources.append(("gsm8k", gsm8k.load(data_dir), "question", _gsm8k_gold))
    if (data_dir / "math" / "test.jsonl").exists():
        sources.append(("math", competition_math.load(data_dir), "problem", _math_gold))
    if not sources:
        raise FileNotFoundError(f"no gsm8k/test.jsonl or math/test.jsonl under {data_dir}")
    per_source = []
    for name, rows, field, gold_of in sources:
        items = []
        for i, row in enumerate(rows):
            try:
                if "__error__" in row:
                    raise ValueError(row["__error__"])
                if not isinstance(row.get(field), str):
                    raise ValueError(f"missing field {field!r}")
                gold = gold_of(row)
            except ValueError as e:
                items.append(bad_item(f"{name}/{i}", name, e))
                continue
            items.append(Item(f"{name}/{i}", name, "", gold, {"query": row[field]}))
        per_source.append(items)
    # Alternate the sources so that the first N items sample both.
    longest = max(map(len, per_source))
    return [s[i] for i in range(longest) for s in per_source if i < len(s)]


def _gsm8k_gold(row: dict) -> str:
    if not isinstance(row.get("answer"), str):
        raise ValueError("missing field 'answer'")
    return gsm8k_gold(row["answer"])


def _math_gold(row: dict) -> str:
    from qwen_jax.evals.competition_math import gold_answer

    if not isinstance(row.get("solution"), str):
        raise ValueError("missing field 'solution'")
    return gold_answer(row)


def build(
    data_dir: Path,
    *,
    shots: int | None = None,
    chat: bool = False,
    max_steps: int = 5,
    max_new_tokens: int = 512,
    limits=None,
) -> Task:
    from qwen_jax.tools.interpreter import CODE_INTERPRETER
    from qwen_jax.tools.react import react_query

    if shots not in (None, 0):
        raise ValueError(f"ci_math is 0-shot (the report's protocol), got shots={shots}")
    items = []
    for item in _problems(Path(data_dir)):
        if item.error is None:
            user = react_query([CODE_INTERPRETER], item.meta["query"])
            prompt = render([{"role": "user", "content": user}], DEFAULT_SYSTEM)
            item = Item(item.id, item.category, prompt, item.gold, item.meta)
        items.append(item)

    def query(model, batch: list[Item]) -> list[dict]:
        queries = [it.meta["query"] for it in batch]
        return solve(
            model, queries, max_steps=max_steps, max_new_tokens=max_new_tokens, limits=limits
        )

    def score(batch: list[Item], outputs: list[dict]) -> list[Verdict]:
        verdicts = []
        for item, out in zip(batch, outputs):
            cells = out["cells"]
            ran = sum(c["status"] == "ok" for c in cells)
            correct = judge(item.gold, out["final_answer"], cells)
            detail = f"{ran}/{len(cells)} cells ran" + (f"; {out['error']}" if out["error"] else "")
            verdicts.append(Verdict(out["final_answer"], correct, out["outcome"], detail))
        return verdicts

    return Task(
        task_name("ci_math", 0, True),
        "generate",
        items,
        score,
        max_new_tokens=max_new_tokens,
        metric="correctness",
        query=query,
        report=report,
    )


def report(records: list[dict]) -> dict:
    """Executable rate and correctness, as Tables 7 and 8 of the report lay them out."""
    cells = [c for r in records for c in (r["output"] or {}).get("cells", ())]
    executable = 100.0 * sum(c["status"] == "ok" for c in cells) / len(cells) if cells else None
    correct = 100.0 * sum(r["correct"] for r in records) / len(records) if records else None
    by_cat = {}
    for cat in sorted({r["category"] for r in records}):
        mine = [c for r in records if r["category"] == cat for c in r["output"]["cells"]]
        by_cat[cat] = 100.0 * sum(c["status"] == "ok" for c in mine) / len(mine) if mine else None

    def fmt(x):
        return "-" if x is None else f"{x:.1f}"

    table = "\n".join(
        [
            "Table 7: executable rate of the generated code (%)",
            "",
            "| Model | Math | Visualization | General | All |",
            "|---|---|---|---|---|",
            f"| this model | {fmt(executable)} | - | - | {fmt(executable)} |",
            "",
            "Table 8: accuracy of the code execution results (%)",
            "",
            "| Model | Math | Vis-Hard | Vis-Easy | Vis-All |",
            "|---|---|---|---|---|",
            f"| this model | {fmt(correct)} | - | - | - |",
            "",
            f"cells run: {len(cells)}; executable rate per source: "
            + ", ".join(f"{k} {fmt(v)}" for k, v in by_cat.items()),
        ]
    )
    metrics = {"executable_rate": executable, "correctness": correct, "cells": len(cells)}
    return {"metrics": metrics | {"executable_rate_per_category": by_cat}, "table": table}
