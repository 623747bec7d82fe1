"""Small synthetic chat, code-SFT and preference data for the embedded demo corpus.

Everything is generated from a seeded numpy Generator and facts the program computes itself:
code answers are our own reference functions and their example outputs are obtained by running
them; API answers quote the Python standard library's own docstrings; text-manipulation
answers are computed. Rejected replies in preference pairs are wrong (a slipped calculation, a
buggy function) or unhelpful.
"""

from __future__ import annotations

import numpy as np

from qwen_jax.data.synthetic_math import NAMES, problem_pair

SYSTEMS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a patient tutor who explains each step.",
)

# (function name, what it does, source, example call, buggy variant's source)
CODE_TASKS = (
    (
        "sum_of_squares",
        "returns the sum of the squares of a list of numbers",
        "def sum_of_squares(xs):\n    return sum(x * x for x in xs)\n",
        "sum_of_squares([1, 2, 3])",
        "def sum_of_squares(xs):\n    return sum(x * 2 for x in xs)\n",
    ),
    (
        "reverse_words",
        "reverses the order of the words in a sentence",
        'def reverse_words(s):\n    return " ".join(reversed(s.split()))\n',
        'reverse_words("the quick brown fox")',
        "def reverse_words(s):\n    return s[::-1]\n",
    ),
    (
        "is_palindrome",
        "checks whether a string reads the same forwards and backwards, ignoring case and spaces",
        'def is_palindrome(s):\n    t = "".join(s.lower().split())\n    return t == t[::-1]\n',
        'is_palindrome("Never odd or even")',
        "def is_palindrome(s):\n    return s == s[::-1]\n",
    ),
    (
        "factorial",
        "computes n! for a non-negative integer n",
        "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n"
        "    return result\n",
        "factorial(6)",
        "def factorial(n):\n    result = 1\n    for k in range(2, n):\n        result *= k\n"
        "    return result\n",
    ),
    (
        "fibonacci",
        "returns the first n Fibonacci numbers as a list",
        "def fibonacci(n):\n    out, a, b = [], 0, 1\n    for _ in range(n):\n"
        "        out.append(a)\n        a, b = b, a + b\n    return out\n",
        "fibonacci(10)",
        "def fibonacci(n):\n    out, a, b = [], 1, 1\n    for _ in range(n):\n"
        "        out.append(a)\n        a, b = b, a + b\n    return out\n",
    ),
    (
        "gcd",
        "computes the greatest common divisor of two positive integers",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        "gcd(84, 36)",
        "def gcd(a, b):\n    return min(a, b)\n",
    ),
    (
        "is_prime",
        "checks whether an integer is a prime number",
        "def is_prime(n):\n    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n"
        "        if n % k == 0:\n            return False\n        k += 1\n    return True\n",
        "[n for n in range(20) if is_prime(n)]",
        "def is_prime(n):\n    return n % 2 == 1\n",
    ),
    (
        "count_vowels",
        "counts the vowels in a string",
        'def count_vowels(s):\n    return sum(1 for c in s.lower() if c in "aeiou")\n',
        'count_vowels("An Apple A Day")',
        'def count_vowels(s):\n    return sum(1 for c in s if c in "aeiou")\n',
    ),
    (
        "flatten",
        "flattens a list of lists into one list",
        "def flatten(rows):\n    return [x for row in rows for x in row]\n",
        "flatten([[1, 2], [3], [4, 5, 6]])",
        "def flatten(rows):\n    return rows[0]\n",
    ),
    (
        "word_counts",
        "counts how often each word occurs in a text",
        "def word_counts(text):\n    counts = {}\n    for w in text.lower().split():\n"
        "        counts[w] = counts.get(w, 0) + 1\n    return counts\n",
        'word_counts("to be or not to be")',
        "def word_counts(text):\n    return {w: 1 for w in text.split()}\n",
    ),
    (
        "celsius_to_fahrenheit",
        "converts a temperature from Celsius to Fahrenheit",
        "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n",
        "celsius_to_fahrenheit(25)",
        "def celsius_to_fahrenheit(c):\n    return c * 5 / 9 + 32\n",
    ),
    (
        "chunks",
        "splits a list into consecutive chunks of size k",
        "def chunks(xs, k):\n    return [xs[i:i + k] for i in range(0, len(xs), k)]\n",
        "chunks([1, 2, 3, 4, 5, 6, 7], 3)",
        "def chunks(xs, k):\n    return [xs[i:i + k] for i in range(0, len(xs) - k, k)]\n",
    ),
    (
        "running_sum",
        "returns the running (cumulative) sums of a list",
        "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n"
        "        out.append(total)\n    return out\n",
        "running_sum([3, 1, 4, 1, 5])",
        "def running_sum(xs):\n    return [sum(xs)] * len(xs)\n",
    ),
    (
        "unique_in_order",
        "removes duplicates from a list while keeping the first occurrences in order",
        "def unique_in_order(xs):\n    seen, out = set(), []\n    for x in xs:\n"
        "        if x not in seen:\n            seen.add(x)\n            out.append(x)\n"
        "    return out\n",
        "unique_in_order([3, 1, 3, 2, 1, 4])",
        "def unique_in_order(xs):\n    return sorted(set(xs))\n",
    ),
    (
        "clamp",
        "limits a number to the range [lo, hi]",
        "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n",
        "[clamp(v, 0, 10) for v in (-5, 5, 15)]",
        "def clamp(x, lo, hi):\n    return min(lo, max(x, hi))\n",
    ),
    (
        "digit_sum",
        "returns the sum of the decimal digits of a non-negative integer",
        "def digit_sum(n):\n    return sum(int(d) for d in str(n))\n",
        "digit_sum(90210)",
        "def digit_sum(n):\n    return len(str(n))\n",
    ),
)


def run_example(source: str, call: str) -> str:
    """repr of evaluating `call` after defining `source` (our own reference code)."""
    scope: dict = {}
    exec(source, scope)  # noqa: S102 - trusted, generated in this module
    return repr(eval(call, scope))  # noqa: S307


def code_conversation(rng: np.random.Generator) -> list[dict]:
    name, what, source, call, _ = CODE_TASKS[int(rng.integers(len(CODE_TASKS)))]
    ask = (
        "Write a Python function `{n}` that {w}.",
        "I need a Python function called `{n}` that {w}. Can you write it?",
        "Please implement `{n}` in Python: it {w}.",
    )
    user = ask[int(rng.integers(len(ask)))].format(n=name, w=what)
    reply = (
        f"Here is `{name}`:\n\n```python\n{source}```\n\nFor example, `{call}` returns "
        f"`{run_example(source, call)}`."
    )
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.3:
        msgs += [
            {"role": "user", "content": "Summarize what it does in one sentence."},
            {"role": "assistant", "content": f"`{name}` {what}."},
        ]
    return msgs


def code_preference(rng: np.random.Generator) -> dict:
    name, what, source, call, buggy = CODE_TASKS[int(rng.integers(len(CODE_TASKS)))]
    prompt = f"Write a Python function `{name}` that {what}."
    good = f"```python\n{source}```\n\n`{call}` returns `{run_example(source, call)}`."
    bad = f"```python\n{buggy}```\n\n`{call}` returns `{run_example(buggy, call)}`."
    return {"prompt": prompt, "chosen": good, "rejected": bad}


def math_conversation(rng: np.random.Generator) -> tuple[list[dict], str]:
    right, _ = problem_pair(rng)
    msgs = [
        {"role": "user", "content": right.question},
        {"role": "assistant", "content": right.solution},
    ]
    return msgs, str(right.answer)


def math_preference(rng: np.random.Generator) -> dict:
    right, wrong = problem_pair(rng)
    return {"prompt": right.question, "chosen": right.solution, "rejected": wrong.solution}


def api_conversation(rng: np.random.Generator, api: tuple[str, str, str]) -> list[dict]:
    """`api` = (qualified name, signature, first docstring paragraph) from the stdlib."""
    qualname, signature, doc = api
    ask = (
        "What does `{q}` do in Python?",
        "Can you explain `{q}` from the standard library?",
        "How do I use `{q}`?",
    )
    user = ask[int(rng.integers(len(ask)))].format(q=qualname)
    reply = f"`{qualname}{signature}`: {doc}"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    if rng.random() < 0.25:
        module = qualname.rsplit(".", 1)[0]
        msgs += [
            {"role": "user", "content": "Which module do I import for it?"},
            {"role": "assistant", "content": f"Import `{module}`: `import {module}`."},
        ]
    return msgs


def text_conversation(rng: np.random.Generator) -> list[dict]:
    """Small computed text tasks and small talk."""
    name = NAMES[int(rng.integers(len(NAMES)))]
    kind = int(rng.integers(6))
    if kind == 0:
        word = ("assistant", "python", "language", "tokenizer", "example", "gradient")[
            int(rng.integers(6))
        ]
        return [
            {"role": "user", "content": f'Spell the word "{word}" backwards.'},
            {"role": "assistant", "content": f'"{word}" backwards is "{word[::-1]}".'},
        ]
    if kind == 1:
        xs = [int(v) for v in rng.integers(0, 100, size=int(rng.integers(4, 9)))]
        return [
            {
                "role": "user",
                "content": f"Sort these numbers from smallest to largest: "
                f"{', '.join(map(str, xs))}.",
            },
            {"role": "assistant", "content": ", ".join(map(str, sorted(xs))) + "."},
        ]
    if kind == 2:
        n = int(rng.integers(2, 500))
        return [
            {"role": "user", "content": f"What is {n} in binary?"},
            {"role": "assistant", "content": f"{n} in binary is {n:b}."},
        ]
    if kind == 3:
        return [
            {"role": "user", "content": f"Hi! I'm {name}."},
            {"role": "assistant", "content": f"Hello, {name}! How can I help you today?"},
            {"role": "user", "content": "Who are you?"},
            {
                "role": "assistant",
                "content": "I am a helpful assistant. I can answer "
                "questions, explain code and work through math problems step by step.",
            },
        ]
    if kind == 4:
        a, b = int(rng.integers(10, 1000)), int(rng.integers(10, 1000))
        return [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
            {"role": "user", "content": "And if you double that?"},
            {"role": "assistant", "content": f"2 x {a + b} = {2 * (a + b)}."},
        ]
    sentence = (
        "the cat sat on the mat",
        "data pipelines feed the model",
        "small models learn quickly",
        "every token counts",
    )[int(rng.integers(4))]
    return [
        {"role": "user", "content": f"Capitalize each word: {sentence}"},
        {"role": "assistant", "content": sentence.title()},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome!"},
    ]


def unhelpful_preference(rng: np.random.Generator, msgs: list[dict]) -> dict:
    """A real conversation's reply as chosen, an evasive reply as rejected."""
    evasive = ("I don't know.", "I cannot help with that.", "Please look it up yourself.")
    return {
        "prompt": msgs[:1],
        "chosen": msgs[1]["content"],
        "rejected": evasive[int(rng.integers(len(evasive)))],
    }
