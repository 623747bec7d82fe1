"""C-Eval: 5-shot next-token choice on the validation split (base) and 0-shot chat.

Base (Qwen `evaluate_ceval.py`): no header; the subject's first 5 dev rows as
"问题：{q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\n答案：{X}\\n\\n", then the val question ending
"\\n答案："; the prediction is the argmax over the next-token log-probs of "A".."D" (no space).
The average is a macro average over the 52 subjects (also per category and over the 8 "hard"
subjects). Chat (`evaluate_chat_ceval.py`): "{q}\\n\\nA. ...\\n" through ChatML; the letter
comes from `extract.choice_zh`.

C-Eval is in no package registry: put the official `ceval-exam.zip` contents under DIR/ceval
({dev,val}/<subject>_{dev,val}.csv with header id,question,A,B,C,D,answer[,explanation]).
"""

from __future__ import annotations

import functools
from pathlib import Path

from qwen_jax.evals.data import read_records
from qwen_jax.evals.exemplars import CEVAL_HARD, CEVAL_SUBJECTS
from qwen_jax.evals.extract import LETTERS, choice_zh
from qwen_jax.evals.tasks import Item, Task, Verdict, check_shots, choice_items, task_name
from qwen_jax.tokenizer.chatml import STOP_TOKENS


def parse_row(row: dict) -> tuple[str, list[str], str]:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    fields = [row.get(k) for k in ("question", *LETTERS)]
    if not all(isinstance(v, str) for v in fields):
        raise ValueError("missing or non-text question/option field")
    answer = (row.get("answer") or "").strip()
    if answer not in LETTERS:
        raise ValueError(f"answer {answer!r} is not one of A-D")
    return fields[0], fields[1:], answer


def format_example(question: str, options: list[str], answer: str | None) -> str:
    text = "问题：" + question + "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, options))
    return text + (f"\n答案：{answer}\n\n" if answer is not None else "\n答案：")


def chat_query(question: str, options: list[str]) -> str:
    return question + "\n\n" + "".join(f"{L}. {o}\n" for L, o in zip(LETTERS, options))


def load_split(data_dir: Path, subject: str, split: str) -> list[dict]:
    path = data_dir / "ceval" / split / f"{subject}_{split}.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"C-Eval file {path} not found. C-Eval is not available offline: unzip the official "
            f"ceval-exam.zip into {data_dir / 'ceval'}."
        )
    return read_records(path)


def groups() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for subject, (_, _, category) in CEVAL_SUBJECTS.items():
        out[category] = out.get(category, ()) + (subject,)
    return out | {"Hard": tuple(sorted(CEVAL_HARD))}


def build(data_dir: Path, *, shots: int | None = None, chat: bool = False) -> Task:
    shots = (0 if chat else 5) if shots is None else shots
    check_shots("ceval", shots, 0 if chat else 5)  # the chat protocols are 0-shot
    items = []
    for subject in CEVAL_SUBJECTS:
        items += choice_items(
            subject,
            functools.partial(load_split, data_dir),
            "val",
            shots=shots,
            chat=chat,
            parse_row=parse_row,
            format_example=format_example,
            chat_query=chat_query,
        )

    def score(batch: list[Item], outputs: list[str]) -> list[Verdict]:
        preds = [
            choice_zh(o, it.meta["question"], it.meta["options"]) if chat else o
            for it, o in zip(batch, outputs)
        ]
        return [Verdict(p, p == it.gold) for it, p in zip(batch, preds)]

    name = task_name("ceval", shots, chat)
    common = {"average": "macro", "groups": groups()}
    if chat:
        return Task(name, "generate", items, score, stop=STOP_TOKENS, **common)
    return Task(name, "choice", items, score, candidates=LETTERS, **common)
