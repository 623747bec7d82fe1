"""MATH (Hendrycks et al.): 4-shot Minerva-format prompts (base) and 0-shot chat.

Base: the 4 exemplar turns of OpenCompass `math_gen_265cce` (the spec's assumed protocol;
Qwen published no MATH script), joined with "\\n" as OpenCompass does for models without a
chat template, then "Problem:\\n{problem}\\nSolution:\\n". Generation stops at "Problem:"
(max 512 new tokens). Chat: the problem alone through ChatML.
The answer is read by `math_equiv.extract_math_answer` ("The final answer is ..." else the last
\\boxed{}) and compared with `math_equiv.is_equiv`. The gold answer is the row's `answer` field
when present (the fetched files carry Minerva-normalized ones), else the last \\boxed{} of the
reference solution (the original MATH json files).
"""

from __future__ import annotations

from pathlib import Path

from qwen_jax.evals.data import read_records, require
from qwen_jax.evals.exemplars import MATH_SHOTS
from qwen_jax.evals.math_equiv import extract_math_answer, is_equiv, last_boxed
from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.tasks import Item, Task, Verdict, bad_item, check_shots, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS


def base_prompt(problem: str, shots: int = 4) -> str:
    turns = [turn for pair in MATH_SHOTS[:shots] for turn in pair]
    return "\n".join([*turns, f"Problem:\n{problem}\nSolution:\n"])


def gold_answer(row: dict) -> str:
    if isinstance(row.get("answer"), str):
        return row["answer"]
    boxed = last_boxed(row["solution"])
    if boxed is None:
        raise ValueError("no 'answer' field and no \\boxed{} in the solution")
    return boxed


def load(data_dir: Path) -> list[dict]:
    return read_records(data_dir / "math" / "test.jsonl")


def build(data_dir: Path, *, shots: int | None = None, chat: bool = False) -> Task:
    shots = (0 if chat else 4) if shots is None else shots
    check_shots("math", shots, 0 if chat else len(MATH_SHOTS))
    items = []
    for i, row in enumerate(load(data_dir)):
        category = str(row.get("type", "unknown"))
        try:
            require(row, {"problem": str, "solution": str})
            gold = gold_answer(row)
        except ValueError as e:
            items.append(bad_item(str(i), category, e))
            continue
        problem = row["problem"]
        prompt = chat_prompt(problem) if chat else base_prompt(problem, shots)
        items.append(Item(str(i), category, prompt, gold, {"level": row.get("level")}))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        verdicts = []
        for item, out in zip(batch, outputs):
            pred = extract_math_answer(out)
            status = "scored" if pred is not None else "no_answer"
            verdicts.append(Verdict(pred, is_equiv(pred, item.gold), status))
        return verdicts

    stop = STOP_TOKENS if chat else ("Problem:",)
    return Task(task_name("math", shots, chat), "generate", items, score, stop=stop)
