"""Rule-based rewards for GRPO (host side, plain Python): the project's own answer checkers.

  math: the last number of the reply against a numeric answer, with the report's chat GSM8K rule
        (evals/extract.py: signed decimals with thousands separators, equal within 1e-4); a
        LaTeX answer (MATH style) against the reply's final answer (\\boxed{...}, "final answer
        is ...") with evals/math_equiv.is_equiv
  code: the reply's code (a fenced block, MBPP's [BEGIN]...[DONE], or the bare `def`s of the
        reply) followed by the record's tests, run in evals/sandbox: 1.0 iff it runs to the end

Rewards are 1.0 or 0.0. `RULE_REWARDS[name]` says which record field holds the reference and
scores many responses at once (code runs `workers` sandboxes in parallel).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from qwen_jax.evals.extract import fenced_code, gsm8k_gold, last_number, mbpp_code, numbers_match
from qwen_jax.evals.math_equiv import extract_math_answer, is_equiv
from qwen_jax.evals.sandbox import Limits, execute_many

# Tests of a short function need far less than the eval defaults; a hang costs a whole rollout.
CODE_LIMITS = Limits(wall_s=5.0, cpu_s=5)

_NUMBER = re.compile(r"[+-]?(\d[\d,]*)?(\.\d+)?")


# --- math ------------------------------------------------------------------------------------


def _numeric_answer(answer: str) -> str | None:
    """The number a reference answer is, if it is one ("42", "-1,234.5", GSM8K's "... #### 42")."""
    if "####" in answer:
        return gsm8k_gold(answer)
    text = answer.strip()
    if text and _NUMBER.fullmatch(text) and any(c.isdigit() for c in text):
        return text.replace(",", "")
    return None


def math_reward(response: str, answer: str) -> float:
    """1.0 when the reply's answer equals `answer`, else 0.0 (see module docstring)."""
    number = _numeric_answer(answer)
    if number is not None:
        return float(numbers_match(last_number(response, "decimal"), number, "decimal"))
    return float(is_equiv(extract_math_answer(response), answer))


def math_rewards(responses: Sequence[str], answers: Sequence[str]) -> list[float]:
    return [math_reward(r, a) for r, a in zip(responses, answers, strict=True)]


# --- code ------------------------------------------------------------------------------------

# A top-level statement that starts code in a reply written without a fence.
_CODE_START = re.compile(r"^(?:def |class |import |from \S+ import |@)")


def response_code(response: str) -> str:
    """The program a reply holds: its first fenced block, else MBPP's [BEGIN]...[DONE], else its
    top-level code lines (from the first def / class / import up to the first line of prose:
    a non-indented line that starts no statement of that kind). "" when there is none."""
    fenced = fenced_code(response)
    if fenced is not None:
        return fenced
    if "[BEGIN]" in response:
        return mbpp_code(response)
    lines, started = [], False
    for line in response.splitlines():
        top_level = line[:1] not in ("", " ", "\t")
        if _CODE_START.match(line):
            started = True
        elif started and top_level:
            break
        if started:
            lines.append(line)
    return "\n".join(lines)


def code_program(response: str, tests: str) -> str:
    """What the sandbox runs for one reply: its code, then the tests."""
    return f"{response_code(response)}\n\n{tests}\n"


def code_rewards(
    responses: Sequence[str],
    tests_list: Sequence[str],
    limits: Limits = CODE_LIMITS,
    *,
    workers: int = 2,
) -> list[float]:
    """1.0 for each reply whose code passes its tests in the sandbox (status "passed"), else 0.0
    (failed test, error, timeout at `limits.wall_s`, memory, blocked). A reply with no code
    scores 0 without starting a process."""
    programs = [code_program(r, t) for r, t in zip(responses, tests_list, strict=True)]
    runnable = [i for i, r in enumerate(responses) if response_code(r).strip()]
    results = execute_many([programs[i] for i in runnable], limits, workers=workers)
    rewards = [0.0] * len(programs)
    for i, result in zip(runnable, results):
        rewards[i] = float(result.status == "passed")
    return rewards


def code_reward(response: str, tests: str, limits: Limits = CODE_LIMITS) -> float:
    """`code_rewards` for one reply."""
    return code_rewards([response], [tests], limits)[0]


# --- registry --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RuleReward:
    """A rule reward: the record field holding its reference, and the batch scorer
    (responses, references) -> rewards."""

    field: str
    score_many: Callable[[Sequence[str], Sequence[str]], list[float]]


RULE_REWARDS = {
    "math": RuleReward("answer", math_rewards),
    "code": RuleReward("tests", code_rewards),
}


def rule_rewards(name: str, responses: Sequence[str], records: Sequence[dict]) -> list[float]:
    """Rewards of `responses` against their prompts' records (one record per response) with
    RULE_REWARDS[name]. ValueError (one line) for an unknown name or a record without the field."""
    if name not in RULE_REWARDS:
        raise ValueError(f"unknown rule reward {name!r} (expected one of {sorted(RULE_REWARDS)})")
    rule = RULE_REWARDS[name]
    refs = []
    for i, record in enumerate(records):
        ref = record.get(rule.field)
        if isinstance(ref, (int, float)) and not isinstance(ref, bool):
            ref = str(ref)  # a numeric answer stored as a JSON number
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(
                f"rule reward {name!r} needs a non-empty string field {rule.field!r} in every "
                f"prompt record; record {i} has {type(ref).__name__}"
            )
        refs.append(ref)
    return rule.score_many(responses, refs)
