"""MBPP (test split, task ids 11-510): 3-shot (base) and 0-shot chat, executed in the sandbox.

Base: OpenCompass `mbpp_gen_1e1056` (the spec's assumed protocol; Qwen published no MBPP
script): the 3 exemplar turns for task ids 2, 3, 4 and the task turn
"You are an expert Python programmer, and here is your task: {text} Your code should pass these
tests:\\n\\n {tests joined by \\n}  \\n", joined with "\\n", then "[BEGIN]\\n". Generation stops
at "[DONE]"; the code is what lies between [BEGIN] and [DONE], quotes stripped.
Chat: the task turn through ChatML; code from [BEGIN]..[DONE], else the first fenced block,
else the whole reply. The program is code, then `test_setup_code`, then the asserts of
`test_list`; a sample passes iff the program runs to its end.
"""

from __future__ import annotations

from pathlib import Path

from qwen_jax.evals.data import read_records, require
from qwen_jax.evals.exemplars import MBPP_SHOTS
from qwen_jax.evals.extract import fenced_code, mbpp_code
from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.sandbox import Limits
from qwen_jax.evals.tasks import (
    Item,
    Task,
    Verdict,
    bad_item,
    check_shots,
    code_verdicts,
    task_name,
)
from qwen_jax.tokenizer.chatml import STOP_TOKENS

TEST_IDS = range(11, 511)
LIMITS = Limits(wall_s=20.0, cpu_s=15)


def task_turn(text: str, tests: list[str]) -> str:
    return (
        f"You are an expert Python programmer, and here is your task: {text} "
        f"Your code should pass these tests:\n\n {chr(10).join(tests)}  \n"
    )


def base_prompt(text: str, tests: list[str], shots: int = 3) -> str:
    turns = [turn for pair in MBPP_SHOTS[:shots] for turn in pair]
    return "\n".join([*turns, task_turn(text, tests), "[BEGIN]\n"])


def program(code: str, setup: str, tests: list[str]) -> str:
    return "\n".join([code, setup, *tests]) + "\n"


def chat_code(reply: str) -> str:
    if "[BEGIN]" in reply:
        return mbpp_code(reply)
    fenced = fenced_code(reply)
    return fenced if fenced is not None else reply


def load(data_dir: Path) -> list[dict]:
    return read_records(data_dir / "mbpp" / "test.jsonl")


def build(
    data_dir: Path, *, shots: int | None = None, chat: bool = False, workers: int = 2
) -> Task:
    shots = (0 if chat else 3) if shots is None else shots
    check_shots("mbpp", shots, 0 if chat else len(MBPP_SHOTS))
    items = []
    for i, row in enumerate(load(data_dir)):
        item_id = str(row.get("task_id", f"row{i}"))
        if isinstance(row.get("task_id"), int) and row["task_id"] not in TEST_IDS:
            continue  # the full mbpp.jsonl also holds the prompt/train/validation splits
        try:
            require(row, {"task_id": int, "text": str, "test_list": list})
            tests = row["test_list"]
            if not tests or not all(isinstance(t, str) for t in tests):
                raise ValueError("test_list must be a non-empty list of strings")
        except ValueError as e:
            items.append(bad_item(item_id, "all", e))
            continue
        turn = task_turn(row["text"], tests)
        prompt = chat_prompt(turn) if chat else base_prompt(row["text"], tests, shots)
        meta = {"tests": tests, "setup": row.get("test_setup_code") or ""}
        items.append(Item(item_id, "all", prompt, "", meta))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        codes = [chat_code(o) if chat else mbpp_code(o) for o in outputs]
        programs = [program(c, it.meta["setup"], it.meta["tests"]) for it, c in zip(batch, codes)]
        return code_verdicts(codes, programs, LIMITS, workers)

    stop = STOP_TOKENS if chat else ("[DONE]",)
    return Task(
        task_name("mbpp", shots, chat), "generate", items, score, stop=stop, metric="pass@1"
    )
