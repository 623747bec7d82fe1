"""Answer extraction from generated text: cut rules, numbers, multiple-choice cascades, code.

The rules follow Qwen's evaluation scripts (spec section 9) so scores are comparable with the
report; where a script used a third-party helper (thefuzz) the stdlib equivalent is noted.
"""

from __future__ import annotations

import difflib
import math
import re
import textwrap

LETTERS = ("A", "B", "C", "D")


def cut_at(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """Keep what precedes the first occurrence of each stop string, applied in order."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


# --- GSM8K numbers ---------------------------------------------------------------------------

_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")
_INTEGER = re.compile(r"\d+")
# Signed, decimal, thousands-separated ("-1,234.5", "+.5"); as Qwen's chat GSM8K script.
_DECIMAL = re.compile(r"([+-])?(?=[0-9]|\.[0-9])(0|[1-9]\d{0,2}(?:,\d{3})*|\d*)?(\.\d*)?(?=\D|$)")


def gsm8k_gold(answer: str) -> str:
    """The reference number after `#### ` in a GSM8K answer field, commas removed."""
    m = _GOLD.search(answer)
    if m is None:
        raise ValueError("no '#### N' in the GSM8K answer field")
    return m.group(1).replace(",", "").rstrip(".")


def last_number(text: str, rule: str = "integer") -> str | None:
    """The last number in `text`.

    rule="integer": the report's base-model rule, last run of digits (`\\d+`: signs, decimal
    points and separators are not part of it). rule="decimal": the chat rule, signed decimals
    with thousands separators.
    """
    if rule == "integer":
        found = _INTEGER.findall(text)
        return found[-1] if found else None
    if rule != "decimal":
        raise ValueError(f"unknown number rule {rule!r}")
    found = [m.group() for m in _DECIMAL.finditer(text) if m.group().strip("+-.")]
    return found[-1].replace(",", "").replace("+", "") if found else None


def numbers_match(pred: str | None, gold: str, rule: str = "integer") -> bool:
    """integer: exact integer equality; decimal: |pred - gold| <= 1e-4 (Qwen's abs_tol)."""
    if pred is None:
        return False
    try:
        if rule == "integer":
            return float(gold) == int(pred)
        return math.isclose(float(pred), float(gold), rel_tol=0, abs_tol=1e-4)
    except ValueError:
        return False


# --- multiple choice from chat outputs -------------------------------------------------------

_EN_CASCADE = (
    # "answer is A" | "choice: A" | "choose A", unless negated ("answer is not").
    re.compile(
        r"(?:[Cc]hoose|(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?"
        r"\b(?:|is|:|be))\b[^ABCD]{0,20}?\b([ABCD])\b"
    ),
    # "A is correct" | "A is right", unless negated.
    re.compile(
        r"\b([ABCD])\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))"
        r"[^ABCD]{0,10}?\b(?:correct|right)\b"
    ),
    re.compile(r"^([ABCD])(?:\.|,|:|$)"),  # the reply starts with the letter
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),  # first standalone letter
)
_ZH_END = r"(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)"
_ZH_CASCADE = (
    # 答案是A | 选项是A | 应该选A选项, unless negated (不/非).
    re.compile(
        r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?"
        r"(?:是|选|为|：|:|】))[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)"
        r"([ABCD])(?:选项)?" + _ZH_END
    ),
    # A选项正确 | A选项符合题意
    re.compile(
        r"([ABCD])(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))"
        r"[^ABCD]{0,4}?(?:正确|对[的，。：]|符合)"
    ),
    re.compile(r"^[\(（]?([ABCD])(?:。|\)|）|\.|，|,|．|：|:|$)"),
    re.compile(r"(?<![a-zA-Z])([ABCD])(?![a-zA-Z=])"),
)


def _closest_option(text: str, options: list[str]) -> str:
    """Fuzzy fallback (Qwen used thefuzz.process.extractOne; difflib's ratio is the stdlib
    stand-in, so rare ties may resolve differently)."""
    scores = [difflib.SequenceMatcher(None, text, opt).ratio() for opt in options]
    return LETTERS[max(range(len(options)), key=scores.__getitem__)]


def choice_en(response: str, options: list[str]) -> str:
    """Letter chosen in an English chat answer: option texts -> letters, then the cascade."""
    gen = response
    for letter, text in sorted(zip(LETTERS, options), key=lambda kv: len(kv[1]), reverse=True):
        gen = re.sub(re.escape(text.rstrip(".")), letter, gen, flags=re.IGNORECASE)
    for pattern in _EN_CASCADE:
        m = pattern.search(gen)
        if m:
            return m.group(1)
    return _closest_option(gen, options)


def choice_zh(response: str, question: str, options: list[str]) -> str:
    """Letter chosen in a Chinese chat answer (C-Eval): restated question and option texts
    are replaced first ("...的特性是<option text>" -> "答案是D"), then the cascade."""
    gen = response
    parts = question.rstrip("。").split("。")[-1].split("_")
    if len(parts[0].strip()) > 4:
        gen = gen.replace(parts[0], "答案是")
    if len(parts[-1].strip()) > 4:
        gen = gen.replace(parts[-1], "")
    for letter, text in sorted(zip(LETTERS, options), key=lambda kv: len(kv[1]), reverse=True):
        gen = gen.replace(text.rstrip("。"), letter)
    for pattern in _ZH_CASCADE:
        m = pattern.search(gen)
        if m:
            return m.group(1)
    return _closest_option(gen, options)


# --- code ------------------------------------------------------------------------------------


def humaneval_chat_body(response: str, entry_point: str) -> str:
    """Function body from a chat reply (Qwen's cascade): a fenced block holding
    `def entry_point`, else any `def entry_point`, else any `def`, else the reply indented."""
    ep = re.escape(entry_point)
    patterns = (
        rf"```(?:[Pp]ython\n)?.*?def\s+{ep}.*?:\n(.*?)\n```",
        rf"def\s+{ep}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
        r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
    )
    for pattern in patterns:
        m = re.search(pattern, response, re.DOTALL)
        if m:
            return m.group(1)
    return textwrap.indent(response, " " * 4)


def mbpp_code(text: str) -> str:
    """Code between `[BEGIN]` and `[DONE]`, quotes stripped (OpenCompass MBPP rule)."""
    text = text.strip()
    m = re.search(r"('\s*|)(\[DONE\]|DONE)", text)
    if m:
        text = text[: m.start()]
    m = re.search(r"(\[BEGIN\]|BEGIN)('\s*|)", text)
    if m:
        text = text[m.end() :]
    text = text.strip()
    if text.startswith("'"):
        text = text[1:]
    if text.endswith("'"):
        text = text[:-1]
    return text


def fenced_code(text: str) -> str | None:
    """The first ```python (or bare ```) block of a chat reply, if any."""
    m = re.search(r"```(?:[Pp]ython3?)?[ \t]*\n(.*?)(?:```|$)", text, re.DOTALL)
    return m.group(1) if m else None
