"""Synthetic grade-school math word problems with worked answers (GSM8K-like, no downloads).

`problem(rng)` draws one of the templates with random names and numbers and returns the
question, the worked solution (one line per arithmetic step, every number computed here) and
the integer answer. `problem_pair` also returns the same question worked with one arithmetic
slip, for rejected answers in preference pairs. Solutions end with "The answer is N." as in Qwen's
GSM8K prompt format (spec §9), so answer extraction (last integer) works on them.

Two tiers: `TEMPLATES` (two or three steps, GSM8K-like) and `EASY_TEMPLATES` (one step on
one-digit operands: the answer is one sum, difference or product of the two numbers of the
question, what the demo's tiny models can learn in a minute); `problem(rng, tier="easy")`.

Held out: a problem's `key` is its template and the numbers of its question (names and items
left out, so a held-out problem has no training twin that differs only in a name). About one
key in `HELDOUT_EVERY` hashes to "heldout"; every generator here draws "train" problems unless
asked for `split="heldout"`, so all training text built from it (the demo corpus's pretraining,
SFT, preference and prompt splits) is disjoint from the synth_math benchmark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

NAMES = (
    "Ava",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Gus",
    "Hana",
    "Ivan",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tara",
    "Uma",
    "Viktor",
)
ITEMS = (
    ("notebook", "notebooks"),
    ("apple", "apples"),
    ("pencil", "pencils"),
    ("ticket", "tickets"),
    ("sandwich", "sandwiches"),
    ("toy car", "toy cars"),
    ("book", "books"),
    ("plant", "plants"),
    ("mug", "mugs"),
    ("kite", "kites"),
)
THINGS = ("marbles", "stickers", "cookies", "cards", "stamps", "shells", "beads", "coins")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]
    answer: int
    key: str = ""  # template + the question's numbers: what the split hashes

    @property
    def solution(self) -> str:
        return "\n".join(self.steps) + f"\nThe answer is {self.answer}."


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _shopping(rng, err=0):
    name, (_, items) = _pick(rng, NAMES), _pick(rng, ITEMS)
    n, price = int(rng.integers(2, 9)), int(rng.integers(2, 15))
    cost = n * price + err
    bill = int(np.ceil((n * price + 1) / 10) * 10) + 10 * int(rng.integers(0, 3))
    q = (
        f"{name} buys {n} {items} at ${price} each and pays with a ${bill} bill. "
        f"How much change does {name} get, in dollars?"
    )
    steps = (
        f"The {items} cost {n} x ${price} = ${cost}.",
        f"The change is ${bill} - ${cost} = ${bill - cost}.",
    )
    return q, steps, bill - cost


def _travel(rng, err=0):
    vehicle = _pick(rng, ("train", "bus", "cyclist", "car", "boat"))
    speed, hours, extra = (
        int(rng.integers(12, 90)),
        int(rng.integers(2, 7)),
        int(rng.integers(5, 40)),
    )
    first = speed * hours + err
    q = (
        f"A {vehicle} travels at {speed} km per hour for {hours} hours, then another {extra} km. "
        "How many kilometers does it travel in total?"
    )
    steps = (
        f"In {hours} hours it covers {speed} x {hours} = {first} km.",
        f"In total it travels {first} + {extra} = {first + extra} km.",
    )
    return q, steps, first + extra


def _sharing(rng, err=0):
    name, things = _pick(rng, NAMES), _pick(rng, THINGS)
    friends = int(rng.integers(2, 7))
    each = int(rng.integers(3, 15))
    left = int(rng.integers(0, friends))
    total = friends * each + left
    given = friends * each + err
    q = (
        f"{name} has {total} {things} and gives {each} to each of {friends} friends. "
        f"How many {things} does {name} have left?"
    )
    steps = (
        f"{name} gives away {friends} x {each} = {given} {things}.",
        f"{name} has {total} - {given} = {total - given} {things} left.",
    )
    return q, steps, total - given


def _ages(rng, err=0):
    a, b = _pick(rng, NAMES[:11]), _pick(rng, NAMES[11:])
    young, gap, later = int(rng.integers(4, 30)), int(rng.integers(2, 25)), int(rng.integers(2, 12))
    total = (young + later) + (young + gap + later)
    rest = total - 2 * later - gap + 2 * err
    q = (
        f"{a} is {gap} years older than {b}. In {later} years the sum of their ages will be "
        f"{total}. How old is {b} now?"
    )
    steps = (
        f"Today their ages sum to {total} - 2 x {later} = {total - 2 * later}.",
        f"Removing the {gap}-year gap leaves {total - 2 * later} - {gap} = {rest}, "
        f"which is twice {b}'s age.",
        f"{b} is {rest} / 2 = {rest // 2} years old.",
    )
    return q, steps, rest // 2


def _discount(rng, err=0):
    item, _ = _pick(rng, ITEMS)
    price, pct = 20 * int(rng.integers(1, 15)), 5 * int(rng.integers(1, 10))
    off = price * pct // 100 + err
    q = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    steps = (
        f"The discount is {pct}% of ${price} = ${off}.",
        f"The sale price is ${price} - ${off} = ${price - off}.",
    )
    return q, steps, price - off


def _fence(rng, err=0):
    length, width = int(rng.integers(5, 60)), int(rng.integers(3, 40))
    half = length + width + err
    q = (
        f"A garden is {length} m long and {width} m wide. A fence goes all the way around it. "
        "How many meters of fence are needed?"
    )
    steps = (
        f"One length and one width add up to {length} + {width} = {half} m.",
        f"The fence is 2 x {half} = {2 * half} m long.",
    )
    return q, steps, 2 * half


def _reading(rng, err=0):
    name = _pick(rng, NAMES)
    per_day, done = int(rng.integers(8, 40)), int(rng.integers(10, 120))
    days = int(rng.integers(3, 15))
    pages = done + per_day * days
    left = pages - done + err * per_day
    q = (
        f"A book has {pages} pages. {name} has read {done} pages and reads {per_day} pages a "
        f"day. How many more days does {name} need to finish the book?"
    )
    steps = (
        f"{name} has {pages} - {done} = {left} pages left.",
        f"At {per_day} pages a day that takes {left} / {per_day} = {left // per_day} days.",
    )
    return q, steps, left // per_day


def _collecting(rng, err=0):
    name, things = _pick(rng, NAMES), _pick(rng, THINGS)
    mon, tue = int(rng.integers(3, 30)), int(rng.integers(3, 30))
    wed = 2 * mon + err
    q = (
        f"{name} collected {mon} {things} on Monday, {tue} on Tuesday, and twice as many on "
        f"Wednesday as on Monday. How many {things} did {name} collect in all?"
    )
    steps = (
        f"On Wednesday {name} collected 2 x {mon} = {wed} {things}.",
        f"In all: {mon} + {tue} + {wed} = {mon + tue + wed} {things}.",
    )
    return q, steps, mon + tue + wed


def _saving(rng, err=0):
    name, (item, _) = _pick(rng, NAMES), _pick(rng, ITEMS)
    weekly, weeks, have = (
        int(rng.integers(3, 25)),
        int(rng.integers(2, 12)),
        int(rng.integers(0, 30)),
    )
    goal = have + weekly * weeks
    need = goal - have + err * weekly
    q = (
        f"{name} wants a {item} that costs ${goal}. {name} has ${have} and saves ${weekly} each "
        "week. How many weeks until " + name + " can buy it?"
    )
    steps = (
        f"{name} still needs ${goal} - ${have} = ${need}.",
        f"Saving ${weekly} a week takes {need} / {weekly} = {need // weekly} weeks.",
    )
    return q, steps, need // weekly


def _fraction(rng, err=0):
    den = int(_pick(rng, (2, 3, 4, 5, 6)))
    num = int(rng.integers(1, den))
    n = den * int(rng.integers(3, 12))
    girls = n * num // den + err
    q = f"A class has {n} students and {num}/{den} of them are girls. How many boys are there?"
    steps = (
        f"There are {n} x {num}/{den} = {girls} girls.",
        f"So there are {n} - {girls} = {n - girls} boys.",
    )
    return q, steps, n - girls


def _average(rng, err=0):
    k = int(rng.integers(3, 6))
    mean = int(rng.integers(50, 95))
    scores = [mean + int(d) for d in rng.integers(-9, 10, size=k - 1)]
    scores.append(mean * k - sum(scores))
    total = sum(scores) + err * k
    q = f"The test scores were {', '.join(map(str, scores))}. What is the average score?"
    steps = (
        f"The scores add up to {' + '.join(map(str, scores))} = {total}.",
        f"The average is {total} / {k} = {total // k}.",
    )
    return q, steps, total // k


def _minutes(rng, err=0):
    name = _pick(rng, NAMES)
    hours, minutes = int(rng.integers(1, 5)), int(rng.integers(1, 59))
    total = hours * 60 + err
    q = f"{name} practiced piano for {hours} hours and {minutes} minutes. How many minutes is that?"
    steps = (
        f"{hours} hours is {hours} x 60 = {total} minutes.",
        f"Adding {minutes} minutes gives {total} + {minutes} = {total + minutes} minutes.",
    )
    return q, steps, total + minutes


def _more(rng, err=0):
    name, things = _pick(rng, NAMES), _pick(rng, THINGS)
    a, b = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    q = f"{name} has {a} {things}. {name} gets {b} more. How many {things} does {name} have now?"
    return q, (f"{name} has {a} + {b} = {a + b + err} {things} now.",), a + b + err


def _together(rng, err=0):
    a, b, things = _pick(rng, NAMES[:11]), _pick(rng, NAMES[11:]), _pick(rng, THINGS)
    x, y = int(rng.integers(1, 10)), int(rng.integers(1, 10))
    q = f"{a} has {x} {things} and {b} has {y} {things}. How many {things} do they have together?"
    return q, (f"Together they have {x} + {y} = {x + y + err} {things}.",), x + y + err


def _fewer(rng, err=0):
    name, things = _pick(rng, NAMES), _pick(rng, THINGS)
    a = int(rng.integers(2, 19))
    b = int(rng.integers(max(1, a - 9), min(a, 10)))  # one digit, and so is the answer
    q = f"{name} had {a} {things} and lost {b} of them. How many {things} does {name} have left?"
    return q, (f"{name} has {a} - {b} = {a - b + err} {things} left.",), a - b + err


def _rows(rng, err=0):
    things = _pick(rng, ("chairs", "trees", "cars", "desks", "flowers"))
    a, b = int(rng.integers(2, 10)), int(rng.integers(2, 10))
    q = f"There are {a} rows with {b} {things} in each row. How many {things} are there?"
    return q, (f"There are {a} x {b} = {a * b + err} {things}.",), a * b + err


EASY_TEMPLATES = (_more, _together, _fewer, _rows)
HELDOUT_EVERY = 8  # ~1 key in 8 is held out
SPLITS = ("train", "heldout")


def problem_key(template, question: str) -> str:
    return f"{template.__name__.lstrip('_')}:{','.join(re.findall(r'[0-9]+', question))}"


def split_of(key: str) -> str:
    """ "heldout" or "train", from a hash of the problem's key (stable across versions)."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


TEMPLATES = (
    _shopping,
    _travel,
    _sharing,
    _ages,
    _discount,
    _fence,
    _reading,
    _collecting,
    _saving,
    _fraction,
    _average,
    _minutes,
)


def _check(tier: str, split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if tier not in ("gsm", "easy"):
        raise ValueError(f"tier must be 'gsm' or 'easy', got {tier!r}")
    return EASY_TEMPLATES if tier == "easy" else TEMPLATES


def problem(rng: np.random.Generator, *, tier: str = "gsm", split: str = "train") -> Problem:
    """A random problem of `tier` ("gsm": multi-step; "easy": one step) whose key lies in
    `split`; same generator state -> same problem (draws of the other split are skipped)."""
    templates = _check(tier, split)
    while True:
        template = templates[int(rng.integers(len(templates)))]
        q, steps, answer = template(rng)
        key = problem_key(template, q)
        if split_of(key) == split:
            return Problem(q, steps, answer, key)


def problem_pair(
    rng: np.random.Generator, *, tier: str = "gsm", split: str = "train"
) -> tuple[Problem, Problem]:
    """(correct, wrong): the same question, the wrong one with an arithmetic slip in its first
    step that changes the final answer (templates scale the slip past any division)."""
    templates = _check(tier, split)
    while True:
        template = templates[int(rng.integers(len(templates)))]
        slip = int(rng.integers(1, 4))
        before = rng.bit_generator.state
        right = Problem(*template(rng))
        after = rng.bit_generator.state
        key = problem_key(template, right.question)
        if split_of(key) != split:
            continue
        rng.bit_generator.state = before
        wrong = Problem(*template(rng, err=slip), key=key)
        rng.bit_generator.state = after
        return dataclasses.replace(right, key=key), wrong
