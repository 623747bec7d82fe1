"""Answer extraction, MATH equivalence, pass@k and averages on hand-made cases."""

import itertools
import math

import pytest

from qwen_jax.evals import extract, math_equiv, metrics


def test_cut_rules_apply_in_order():
    text = "Step 1\nThe answer is 4\n\nQuestion: next<|endoftext|>junk"
    assert extract.cut_at(text, ("<|endoftext|>", "\n\n\n", "\n\n", "Question:")) == (
        "Step 1\nThe answer is 4"
    )


@pytest.mark.parametrize(
    "text, integer, decimal",
    [
        ("so 3 + 4 = 7 apples", "7", "7"),
        ("It is -3 degrees", "3", "-3"),  # the report's rule drops the sign
        ("costs $1,234.50 in total", "50", "1234.50"),
        ("ratio .5", "5", ".5"),
        ("no digits here", None, None),
    ],
)
def test_last_number_rules(text, integer, decimal):
    assert extract.last_number(text, "integer") == integer
    assert extract.last_number(text, "decimal") == decimal


def test_number_matching_and_gold():
    assert extract.gsm8k_gold("a\nb\n#### 1,600") == "1600"
    assert extract.gsm8k_gold("#### -10") == "-10"
    with pytest.raises(ValueError):
        extract.gsm8k_gold("no marker")
    assert extract.numbers_match("1600", "1600", "integer")
    assert not extract.numbers_match("10", "-10", "integer")
    assert extract.numbers_match("-10.00001", "-10", "decimal")
    assert not extract.numbers_match("-10.001", "-10", "decimal")
    assert not extract.numbers_match(None, "3", "decimal")


OPTIONS = ["London", "Paris", "Berlin", "Madrid"]


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("The answer is (C).", "C"),
        ("I would choose D because it fits.", "D"),
        ("Option A is correct.", "A"),
        ("B. It is the capital.", "B"),
        ("The capital of France is paris.", "B"),  # option text replaced by its letter
        ("Hmm, I think it is D", "D"),  # first standalone letter
        ("madird", "D"),  # no letter at all: closest option text
    ],
)
def test_choice_cascade_en(reply, letter):
    assert extract.choice_en(reply, OPTIONS) == letter


ZH_OPTIONS = [
    "既不保证可靠，也不保证按序交付",
    "不保证可靠，但保证按序交付",
    "保证可靠，但不保证按序交付",
    "既保证可靠，也保证按序交付",
]
ZH_QUESTION = "关于传输层的面向连接服务的特性是____。"


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("答案是C。", "C"),
        ("应该选B选项", "B"),
        ("A选项正确", "A"),
        ("（D）", "D"),
        ("关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付", "D"),
    ],
)
def test_choice_cascade_zh(reply, letter):
    assert extract.choice_zh(reply, ZH_QUESTION, ZH_OPTIONS) == letter


def test_humaneval_chat_body_cascade():
    fenced = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert extract.humaneval_chat_body(fenced, "add") == "    return a + b"
    bare = "def add(a, b):\n    s = a + b\n    return s\nprint(add(1, 2))"
    assert extract.humaneval_chat_body(bare, "add") == "    s = a + b\n    return s"
    assert extract.humaneval_chat_body("return a + b", "add") == "    return a + b"


def test_mbpp_code_and_fences():
    assert extract.mbpp_code(" 'def f(x):\r\n  return x' \n[DONE] \n") == "def f(x):\r\n  return x"
    assert extract.mbpp_code("[BEGIN]\n 'x = 1'") == "x = 1"
    assert extract.fenced_code("text\n```python\nx = 1\n```") == "x = 1\n"
    assert extract.fenced_code("no code") is None


def test_boxed_and_final_answer_extraction():
    assert math_equiv.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}}.") == "\\frac{a}{b}"
    assert math_equiv.last_boxed("so \\boxed 5$") == "5"
    assert math_equiv.last_boxed("none") is None
    minerva = "... $\\boxed{7}$.\nFinal Answer: The final answer is $7$. I hope it is correct."
    assert math_equiv.extract_math_answer(minerva) == "$7$"
    assert math_equiv.extract_math_answer("Thus \\boxed{x+1}") == "x+1"
    assert math_equiv.extract_math_answer("The final answer is 12.") == "12"
    assert math_equiv.extract_math_answer("nothing") is None


@pytest.mark.parametrize(
    "raw, minerva",
    [
        ("10,\\!080", "10080"),
        ("90^\\circ", "90"),
        ("\\text{(C)}", "(C)"),
        ("x = 5", "5"),
        ("\\frac43", "\\frac{4}{3}"),
        ("864 \\mbox{ inches}^2", "864"),  # as the fetched answer field has it
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\le(3,\\frac{\\pi}{2}\\right)"),  # its quirk
    ],
)
def test_minerva_normalization(raw, minerva):
    assert math_equiv.normalize_final_answer(raw) == minerva


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        ("\\dfrac{1}{2}", "0.5", True),
        ("2/4", "\\frac12", True),
        ("\\sqrt{8}", "2\\sqrt{2}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("\\frac{\\pi}{2}", "\\pi/2", True),
        ("(1,2)", "(1, 2)", True),
        ("[2,5)", "(2,5)", False),
        ("3", "4", False),
        (None, "4", False),
        ("9^{9^{9^{9}}}", "1", False),  # refused before sympy could hang on it
        ("__import__('os').system('true')", "0", False),  # never evaluated
    ],
)
def test_is_equiv(pred, gold, equal):
    assert math_equiv.is_equiv(pred, gold) is equal


def _closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_closed_form():
    assert metrics.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert metrics.pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    assert metrics.pass_at_k(5, 0, 3) == 0.0
    assert metrics.pass_at_k(4, 1, 4) == 1.0
    for n, c, k in itertools.product(range(1, 13), range(0, 13), range(1, 13)):
        if c <= n and k <= n:
            assert metrics.pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), abs=1e-12)
    assert metrics.mean_pass_at_k([(2, 1), (2, 2)], 1) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 4, 1)


def test_micro_and_macro_averages():
    records = [{"category": "a", "correct": c} for c in (True, True, True, False)]
    records += [{"category": "b", "correct": False}]
    groups = {"g": ("a", "b")}
    micro = metrics.accuracy(records, average="micro", groups=groups)
    macro = metrics.accuracy(records, average="macro", groups=groups)
    assert micro["overall"] == pytest.approx(60.0)  # 3 of 5 samples
    assert macro["overall"] == pytest.approx(37.5)  # mean of 75 % and 0 %
    assert micro["per_category"] == {"a": 75.0, "b": 0.0}
    assert (micro["per_group"]["g"], macro["per_group"]["g"]) == (60.0, 37.5)
