"""Rule rewards (qwen_jax.rl.rewards): math answers through the project's GSM8K / MATH checkers,
code through the sandbox (a passing, a failing, a hanging and a code-less reply in one batch)."""

import time

import pytest

from qwen_jax.evals.sandbox import Limits
from qwen_jax.rl import rewards

# --- math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response,answer,want",
    [
        ("3 + 4 = 7. The answer is 7.", "7", 1.0),
        ("First 12, then 30. The answer is 42", "42", 1.0),
        ("The total is 1,234.5 dollars.", "1234.5", 1.0),  # the chat rule: separators, decimals
        ("She has -3 left.", "-3", 1.0),
        ("The answer is 41.", "42", 0.0),  # wrong
        ("42 apples, minus 2, so 40 are left.", "42", 0.0),  # the LAST number counts
        ("I am not sure.", "42", 0.0),  # unparseable: no number at all
        ("", "42", 0.0),
        ("Natalia sold 48 + 24 = 72 clips.", "She sold 48/2 = 24 ... #### 72", 1.0),  # GSM8K gold
        ("So the result is $\\boxed{\\frac{1}{2}}$.", "\\frac12", 1.0),  # LaTeX: math_equiv
        ("So the result is $\\boxed{0.5}$.", "\\frac{1}{2}", 1.0),  # symbolic equality
        ("So the result is $\\boxed{\\frac{1}{3}}$.", "\\frac{1}{2}", 0.0),
        ("The result is one half.", "\\frac{1}{2}", 0.0),  # no final answer to extract
    ],
)
def test_math_reward(response, answer, want):
    assert rewards.math_reward(response, answer) == want


def test_rule_rewards_math_records():
    records = [{"answer": "7"}, {"answer": 7}, {"answer": "8"}]
    got = rewards.rule_rewards("math", ["The answer is 7."] * 3, records)
    assert got == [1.0, 1.0, 0.0]


def test_rule_rewards_bad_input():
    with pytest.raises(ValueError, match="unknown rule reward 'physics'"):
        rewards.rule_rewards("physics", ["x"], [{"answer": "1"}])
    with pytest.raises(ValueError, match="needs a non-empty string field 'tests'.*record 1"):
        rewards.rule_rewards("code", ["x", "y"], [{"tests": "assert True"}, {"answer": "1"}])


# --- code ------------------------------------------------------------------------------------

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
FENCED_PASS = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
BARE_PASS = (
    "Sure.\ndef add(a, b):\n    total = a + b\n\n    return total\n"
    "This adds the two numbers."  # prose after the def ends the code
)
FAILING = "```python\ndef add(a, b):\n    return a - b\n```"
HANGING = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
NO_CODE = "I would add the numbers."
SYNTAX = "```python\ndef add(a, b) return a + b\n```"
WALL_S = 2.0


@pytest.fixture(scope="module")
def code_batch():
    replies = [FENCED_PASS, BARE_PASS, FAILING, HANGING, NO_CODE, SYNTAX]
    start = time.monotonic()
    got = rewards.code_rewards(
        replies, [TESTS] * len(replies), Limits(wall_s=WALL_S, cpu_s=2), workers=4
    )
    return got, time.monotonic() - start


def test_response_code_extraction():
    assert rewards.response_code(FENCED_PASS) == "def add(a, b):\n    return a + b\n"
    assert (
        rewards.response_code(BARE_PASS) == "def add(a, b):\n    total = a + b\n\n    return total"
    )
    assert rewards.response_code("[BEGIN]\n'def f():\n    return 1'\n[DONE]") == (
        "def f():\n    return 1"
    )
    assert rewards.response_code(NO_CODE) == ""


def test_code_rewards(code_batch):
    got, elapsed = code_batch
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    # The hanging program is killed at its wall limit (plus process start-up), not waited on.
    assert elapsed < WALL_S + 20


def test_code_reward_single_and_registry():
    assert rewards.code_reward(FENCED_PASS, TESTS) == 1.0
    assert rewards.RULE_REWARDS["code"].field == "tests"
    assert rewards.RULE_REWARDS["math"].field == "answer"
