"""The tool-use evaluations (issue 16 item 5): ci_math (code interpreter on GSM8K / MATH) and
tool_select (unseen tools), their scoring rules on hand-worked cases, and both end to end:
with a scripted model (known right and wrong answers, so the tables' numbers are known) and
on a tiny random model through `qwen-jax eval run` (near-zero scores; the run must complete
and write the report's tables)."""

from __future__ import annotations

import base64
import json

import pytest

from qwen_jax.checkpoint import save_params
from qwen_jax.cli import main as cli_main
from qwen_jax.evals import runner
from qwen_jax.evals.ci_math import appears, judge, number_value
from qwen_jax.evals.tool_select import judge as judge_call
from qwen_jax.evals.tool_select import lcs_length, rouge_l, unseen_tool_suite
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model

GSM8K_ROWS = [
    {"question": "Tom has 6 bags of 7 apples. How many apples?", "answer": "6*7=42\n#### 42"},
    {"question": "Ann had 10 pens and lost 3. How many are left?", "answer": "#### 7"},
]
MATH_ROWS = [
    {"problem": "What is $3/4$ as a fraction?", "solution": "$\\boxed{\\frac{3}{4}}$",
     "answer": "\\frac{3}{4}", "type": "Algebra", "level": "Level 1"},
]  # fmt: skip


def write_data(root):
    for name, rows in (("gsm8k", GSM8K_ROWS), ("math", MATH_ROWS)):
        (root / name).mkdir(parents=True)
        lines = "".join(json.dumps(r) + "\n" for r in rows)
        (root / name / "test.jsonl").write_text(lines)
    return root


# --- Rouge-L ---------------------------------------------------------------------------------
def test_rouge_l_hand_worked():
    # LCS("the cat sat on the mat", "the cat on mat") = "the cat on mat" = 4 tokens:
    # P = 4/4, R = 4/6, F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert lcs_length("the cat on mat".split(), "the cat sat on the mat".split()) == 4
    assert rouge_l("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8, abs=1e-12)
    # CJK: one token per character. LCS(北京天气, 北京的天气) = 4: P = 1, R = 4/5, F = 8/9.
    assert rouge_l("北京天气", "北京的天气") == pytest.approx(8 / 9, abs=1e-12)
    # JSON layout and case do not count; disjoint texts score 0; empty vs empty agree.
    assert rouge_l("{'City':'Paris'}", '{"city": "paris"}') == 1.0
    assert rouge_l('{"city": "Rome"}', '{"town": "Oslo"}') == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


# --- ci_math scoring -------------------------------------------------------------------------
def test_ci_math_correct_needs_the_number_in_the_execution_output_and_the_answer():
    ok = [{"status": "ok", "output": "42\n"}]
    assert judge("42", "The answer is 42.", ok)
    assert not judge("42", "The answer is 41.", ok)  # not in the final answer
    assert not judge("42", "The answer is 42.", [{"status": "ok", "output": "41\n"}])
    assert not judge("42", "42", [{"status": "error", "output": "42\nNameError"}])  # cell failed
    assert not judge("42", None, ok)  # no final answer (step cap, no action)
    assert not judge("42", "42", [])  # answered without running code
    # Numbers as numbers: separators, decimals within 1e-4, fractions both ways.
    assert judge("1234", "It is 1,234 dollars", [{"status": "ok", "output": "1234.0"}])
    assert appears("42", "42.00001") and not appears("42", "42.001")
    assert number_value("\\frac{3}{4}") == 0.75 and number_value("\\$18.90") == 18.9
    assert judge("\\frac{3}{4}", "$\\frac{3}{4}$", [{"status": "ok", "output": "0.75"}])
    assert not appears("-3", "3")
    # A non-numeric MATH answer must appear after MATH's normalization.
    assert appears("x^2+1", "so f(x) = x^2 + 1") and not appears("x^2+1", "x^2")


# --- tool_select ----------------------------------------------------------------------------
def test_unseen_tool_suite_is_deterministic_and_well_formed():
    suite = unseen_tool_suite(12, 6, tools_per_query=3, seed=1)
    again = unseen_tool_suite(12, 6, tools_per_query=3, seed=1)
    assert [(s["query"], [t.name for t in s["tools"]]) for s in suite] == [
        (s["query"], [t.name for t in s["tools"]]) for s in again
    ]
    assert unseen_tool_suite(12, 6, seed=2) != suite
    pos = [s for s in suite if s["gold"]]
    neg = [s for s in suite if not s["gold"]]
    assert len(pos) == 12 and len(neg) == 6 and suite[2]["category"] == "negative"
    assert {s["lang"] for s in suite} == {"en", "zh"}
    for s in suite:
        names = [t.name for t in s["tools"]]
        assert len(set(names)) == 3
    for s in pos:
        tool = next(t for t in s["tools"] if t.name == s["gold"]["name"])
        assert set(s["gold"]["arguments"]) == set(tool.parameters["properties"])


def test_tool_select_judging_on_hand_cases():
    gold = {"name": "skystatus_flight", "arguments": {"flight_number": "LX318"}}
    right = 'Thought: check.\nAction: skystatus_flight\nAction Input: {"flight_number": "LX318"}'
    assert judge_call(right, gold) == {
        "action": "skystatus_flight",
        "selected": True,
        "rouge_l": 1.0,
    }
    wrong = judge_call("Thought: x\nAction: rhymebox_find\nAction Input: {'word': 'LX318'}", gold)
    # [word, lx318] vs [flight, number, lx318]: LCS 1, P = 1/2, R = 1/3, F = 2/5.
    assert not wrong["selected"] and wrong["rouge_l"] == pytest.approx(0.4, abs=1e-12)
    assert judge_call("Final Answer: I cannot tell.", gold)["rouge_l"] == 0.0
    assert judge_call("Final Answer: 42", None) == {
        "action": None,
        "selected": True,
        "false_positive": False,
    }
    assert judge_call("Action: rhymebox_find\nAction Input: {}", None)["false_positive"]


# --- end to end, scripted --------------------------------------------------------------------
class ScriptedEvalModel:
    """An EvalModel whose `generate` answers from the prompt: for ci_math, run code then answer
    (right for GSM8K item 0, wrong for item 1: the code fails); for tool_select, the right call
    on positives and a false positive on negatives."""

    def __init__(self):
        self.batches = []

    def generate(self, prompts, *, max_new_tokens, stop):
        assert "Observation:" in stop
        self.batches.append(len(prompts))
        return [self._reply(p) for p in prompts]

    def _reply(self, prompt):
        if "code_interpreter" in prompt:
            if "Observation:" not in prompt.split("<|im_start|>assistant\n")[-1]:
                code = "print(6 * 7)" if "Tom has" in prompt else "print(undefined)"
                code = "print(3 / 4)" if "fraction" in prompt else code
                call = f"Action: code_interpreter\nAction Input:\n```py\n{code}\n```\n"
                return "Thought: compute.\n" + call
            answer = "42" if "Tom has" in prompt else ("3/4" if "fraction" in prompt else "7")
            return f"Thought: I now know the final answer\nFinal Answer: {answer}"
        for s in unseen_tool_suite(200, 100):
            if f"Question: {s['query']}<|im_end|>" in prompt:
                gold = s["gold"] or {"name": s["tools"][0].name, "arguments": {}}
                args = json.dumps(gold["arguments"], ensure_ascii=False)
                return f"Thought: t\nAction: {gold['name']}\nAction Input: {args}\n"
        raise AssertionError("unexpected prompt")


def test_both_evals_end_to_end_with_a_scripted_model(tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    model = ScriptedEvalModel()
    results = runner.run(model, ["ci_math", "tool_select"], data, out, limit=3, progress=False)
    # ci_math's problems step together (code, then answers), then tool_select's one batch.
    assert model.batches == [3, 3, 3]
    ci = results["ci_math-chat-0shot"]
    # Items alternate sources: gsm8k/0 (right), math/0 (right), gsm8k/1 (code fails).
    assert ci["n"] == 3 and ci["overall"] == pytest.approx(200 / 3)
    assert ci["report"]["metrics"]["executable_rate"] == pytest.approx(200 / 3)
    assert ci["status_counts"] == {"answered": 3}
    ts = results["tool_select-chat-0shot"]["report"]["metrics"]
    # limit 3: two positives (right tool, exact arguments), one negative (a false positive).
    assert ts == {"tool_selection": 100.0, "tool_input_rouge_l": 100.0, "false_positive": 100.0}
    table = (out / "results.md").read_text()
    assert "| this model | 66.7 | - | - | 66.7 |" in table  # Table 7: executable rate
    assert "| this model | 66.7 | - | - | - |" in table  # Table 8: correctness
    assert "| this model | 100.0 | 100.0 | 100.0 |" in table  # Table 6
    records = [json.loads(x) for x in (out / "ci_math-chat-0shot.samples.jsonl").open()]
    assert [r["id"] for r in records] == ["gsm8k/0", "math/0", "gsm8k/1"]
    assert "Observation: 42\nThought:" in records[0]["output"]["transcript"]


# --- end to end, tiny model through the CLI --------------------------------------------------
@pytest.mark.slow
def test_eval_run_ci_math_and_tool_select_on_a_tiny_model(tmp_path):
    vocab = tmp_path / "qwen.tiktoken"  # 256 byte tokens + Qwen's specials (ChatML included)
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    cfg = C.tiny(vocab_size=512, max_position_embeddings=4096)
    save_params(create_model(cfg, seed=0), tmp_path / "export", tokenizer_files=[vocab])
    out = tmp_path / "results"
    args = ["eval", "run", "--checkpoint", str(tmp_path / "export"), "--limit", "1"]
    args += ["--benchmarks", "ci_math,tool_select", "--data-dir", str(write_data(tmp_path / "d"))]
    assert cli_main(args + ["--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "Table 7: executable rate" in table and "Table 6: tool use on unseen tools" in table
    for name in ("ci_math-chat-0shot", "tool_select-chat-0shot"):
        rows = [json.loads(x) for x in (out / f"{name}.samples.jsonl").open()]
        assert len(rows) == 1 and rows[0]["status"] != "bad_input"
