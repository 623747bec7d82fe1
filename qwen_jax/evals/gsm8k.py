"""GSM8K: 8-shot chain of thought (base) and 0-shot chat, as Qwen's scripts (spec section 9).

Base prompt: the 8 exemplars of `gsm8k_prompt.txt`, each
    "Question: {q}\\nLet's think step by step\\n{reasoning}\\nThe answer is {n}\\n\\n"
then "Question: {q}\\nLet's think step by step\\n". The completion is cut at <|endoftext|>,
"\\n\\n\\n", "\\n\\n", "Question:"; the prediction is the last integer (`\\d+`).
Chat: the raw question (or the 4-shot prefix of `--use-fewshot`) through ChatML; the prediction
is the last signed/decimal/thousands-separated number, equal within 1e-4.
`number_rule` ("integer" or "decimal") switches the rule for either protocol.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_jax.evals.data import read_records, require
from qwen_jax.evals.exemplars import GSM8K_CHAT_SHOTS, GSM8K_SHOTS
from qwen_jax.evals.extract import cut_at, gsm8k_gold, last_number, numbers_match
from qwen_jax.evals.model_api import chat_prompt
from qwen_jax.evals.tasks import Item, Task, Verdict, bad_item, check_shots, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS

CUT_RULES = ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")


def exemplar(question: str, reasoning: str, answer: str) -> str:
    return f"Question: {question}\nLet's think step by step\n{reasoning}\nThe answer is {answer}"


def base_prompt(question: str, shots: int = 8) -> str:
    prefix = "".join(exemplar(*shot) + "\n\n" for shot in GSM8K_SHOTS[:shots])
    return f"{prefix}Question: {question}\nLet's think step by step\n"


def chat_query(question: str, shots: int = 0) -> str:
    if shots == 0:
        return question
    prefix = "".join(exemplar(*shot) + "\n\n" for shot in GSM8K_CHAT_SHOTS[:shots])
    return f"{prefix}Question: {question}\nLet's think step by step"


def load(data_dir: Path) -> list[dict]:
    return read_records(data_dir / "gsm8k" / "test.jsonl")


def reference_completion(answer: str) -> str:
    """A reference solution written the way the exemplars are: calculator annotations
    (<<...>>) removed, blank lines dropped, then "The answer is N"."""
    reasoning = re.sub(r"<<[^>]*>>", "", answer.split("####")[0])
    lines = [line for line in reasoning.splitlines() if line.strip()]
    return "\n".join(lines) + f"\nThe answer is {gsm8k_gold(answer)}"


def build(
    data_dir: Path, *, shots: int | None = None, chat: bool = False, number_rule: str | None = None
) -> Task:
    shots = (0 if chat else 8) if shots is None else shots
    check_shots("gsm8k", shots, len(GSM8K_CHAT_SHOTS if chat else GSM8K_SHOTS))
    rule = number_rule or ("decimal" if chat else "integer")
    items = []
    for i, row in enumerate(load(data_dir)):
        try:
            require(row, {"question": str, "answer": str})
            gold = gsm8k_gold(row["answer"])
        except ValueError as e:
            items.append(bad_item(str(i), "all", e))
            continue
        q = row["question"]
        prompt = chat_prompt(chat_query(q, shots)) if chat else base_prompt(q, shots)
        items.append(Item(str(i), "all", prompt, gold))

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        verdicts = []
        for item, out in zip(batch, outputs):
            # Chat replies are taken whole (Qwen's chat script applies no cut rules).
            pred = last_number(out if chat else cut_at(out, CUT_RULES), rule)
            status = "scored" if pred is not None else "no_answer"
            verdicts.append(Verdict(pred, numbers_match(pred, item.gold, rule), status))
        return verdicts

    stop = STOP_TOKENS if chat else CUT_RULES
    return Task(task_name("gsm8k", shots, chat), "generate", items, score, stop=stop)
