"""MMLU: 5-shot next-token choice (base) and 0-shot chat with the extraction cascade.

Base (Qwen `evaluate_mmlu.py`): header "The following are multiple choice questions (with
answers) about {subject with _ -> space}.\\n\\n", the subject's first 5 dev rows as
"Question: {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n", then the test question
ending "\\nAnswer:"; the prediction is the argmax of the next-token log-probs of " A".." D".
Scores are micro-averaged over all questions, and pooled per category (STEM, ...).
Chat (`evaluate_chat_mmlu.py`): an instruction, the question and options through ChatML; the
letter comes from `extract.choice_en`.

Files: DIR/mmlu/<subject>/{dev,test}/* (HF `datasets` Arrow, or jsonl/parquet with fields
question, choices[4], answer 0-3), or the original CSV release DIR/mmlu/{dev,test}/
<subject>_{dev,test}.csv (no header: question, A, B, C, D, answer letter).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from qwen_jax.evals.data import read_records
from qwen_jax.evals.exemplars import MMLU_CATEGORIES
from qwen_jax.evals.extract import LETTERS, choice_en
from qwen_jax.evals.tasks import Item, Task, Verdict, check_shots, choice_items, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS

CHAT_INSTRUCTION = (
    "The following is a multiple-choice question. Please choose the most suitable one among "
    "A, B, C and D as the answer to this question.\n\n"
)


def parse_row(row: dict) -> tuple[str, list[str], str]:
    """(question, 4 options, answer letter) from either layout; ValueError if malformed."""
    if "__error__" in row:
        raise ValueError(row["__error__"])
    question = row.get("question")
    if "choices" in row:
        options, answer = row["choices"], row.get("answer")
        if isinstance(answer, int) and 0 <= answer < 4:
            answer = LETTERS[answer]
    else:
        options, answer = [row.get(x) for x in LETTERS], row.get("answer")
    if not isinstance(question, str):
        raise ValueError("missing or non-text field 'question'")
    if not (isinstance(options, list) and len(options) == 4):
        raise ValueError("need exactly 4 options")
    if not all(isinstance(o, str) for o in options):
        raise ValueError("missing or non-text option")
    if answer not in LETTERS:
        raise ValueError(f"answer {answer!r} is not one of A-D / 0-3")
    return question, options, answer


def format_example(question: str, options: list[str], answer: str | None) -> str:
    text = "Question: " + question + "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, options))
    return text + (f"\nAnswer: {answer}\n\n" if answer is not None else "\nAnswer:")


def header(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {_words(subject)}.\n\n"
    )


def _words(subject: str) -> str:
    return " ".join(subject.split("_")).strip()


def chat_query(question: str, options: list[str]) -> str:
    return (
        CHAT_INSTRUCTION
        + question
        + "\n"
        + "".join(f"{L}. {o}\n" for L, o in zip(LETTERS, options))
    )


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(zip(["question", *LETTERS, "answer"], r)) for r in csv.reader(f)]


def load_split(data_dir: Path, subject: str, split: str) -> list[dict]:
    root = data_dir / "mmlu"
    folder = root / subject / split
    if folder.is_dir():
        return [
            r
            for f in sorted(folder.iterdir())
            if f.suffix in (".arrow", ".parquet", ".jsonl")
            for r in read_records(f)
        ]
    csv_path = root / split / f"{subject}_{split}.csv"
    if csv_path.exists():
        return _csv_rows(csv_path)
    raise FileNotFoundError(f"MMLU {subject}/{split}: neither {folder} nor {csv_path}")


def build(data_dir: Path, *, shots: int | None = None, chat: bool = False) -> Task:
    shots = (0 if chat else 5) if shots is None else shots
    check_shots("mmlu", shots, 0 if chat else 5)  # the chat protocols are 0-shot
    items = []
    for subject in (s for subjects in MMLU_CATEGORIES.values() for s in subjects):
        items += choice_items(
            subject,
            functools.partial(load_split, data_dir),
            "test",
            shots=shots,
            chat=chat,
            parse_row=parse_row,
            format_example=format_example,
            chat_query=chat_query,
            header=header(subject),
        )

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        preds = [choice_en(o, it.meta["options"]) if chat else o for it, o in zip(batch, outputs)]
        return [Verdict(p, p == it.gold) for it, p in zip(batch, preds)]

    name = task_name("mmlu", shots, chat)
    if chat:
        return Task(name, "generate", items, score, stop=STOP_TOKENS, groups=MMLU_CATEGORIES)
    candidates = tuple(f" {L}" for L in LETTERS)
    return Task(name, "choice", items, score, candidates=candidates, groups=MMLU_CATEGORIES)
