"""Small synthetic programming tasks with tests, learnable by the demo's tiny models.

Every task is one function of a *family* (add a constant, count a character, clamp to a range,
...) with its constants filled in. The universe of tasks is finite and enumerated in a fixed
order by `all_tasks()`; each has

    prompt    signature + one-line docstring      def add_7(x): / \"\"\"Return x plus 7.\"\"\"
    body      the reference body                  return x + 7
    tests     assert lines whose expected values come from running the reference here
    ask       the request in words, for chat SFT  Write a Python function `add_7(x)`. Return ...

`split(task)` is a deterministic hash of the family and constants (`task.key`): about one task
in `HELDOUT_EVERY` is "heldout" and never appears in any training text (the demo corpus draws
pretraining modules and SFT conversations from the "train" tasks only; the synth_code benchmark
and the held-out code text use the "heldout" ones). Hashing the key, not the position, keeps a
task's split fixed when families are added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string

HELDOUT_EVERY = 4  # ~1 key in 4 is held out


@dataclasses.dataclass(frozen=True)
class CodeTask:
    family: str
    name: str  # the function's name (entry point)
    params: str  # "x" / "s" / "xs"
    doc: str  # one-line docstring, the whole specification
    body: str  # reference body, indented, ending with a newline
    calls: tuple[str, ...]  # argument lists of the test calls, e.g. ("3", "-4")
    key: str  # family + constants: what the split hashes

    @property
    def prompt(self) -> str:
        """The completion prompt: signature and docstring (HumanEval's shape)."""
        return f'def {self.name}({self.params}):\n    """{self.doc}"""\n'

    @property
    def solution(self) -> str:
        return self.prompt + self.body

    @property
    def signature(self) -> str:
        return f"{self.name}({self.params})"

    @property
    def ask(self) -> str:
        """The request in words (what the chat user types): the docstring as a sentence."""
        return f"Write a Python function `{self.signature}`. {self.doc}"

    def tests(self) -> list[str]:
        """`assert name(args) == expected` lines; expected values from the reference (our own
        code, run here)."""
        scope: dict = {}
        exec(self.solution, scope)  # noqa: S102 - trusted: generated in this module
        fn = scope[self.name]
        return [
            f"assert {self.name}({a}) == {eval(f'_f({a})', {'_f': fn})!r}"  # noqa: S307
            for a in self.calls
        ]

    def program(self, code: str) -> str:
        """`code` (a full function definition) followed by the tests: passes iff it runs."""
        return code.rstrip("\n") + "\n\n" + "\n".join(self.tests()) + "\n"


def split(task: CodeTask) -> str:
    """ "heldout" or "train", from a hash of `task.key` (stable across Python versions)."""
    h = int(hashlib.sha256(task.key.encode()).hexdigest()[:8], 16)
    return "heldout" if h % HELDOUT_EVERY == 0 else "train"


# --- the families ------------------------------------------------------------------------------
_WORDS = ("cat", "sun", "tree", "blue", "moon", "star", "fish", "rain", "leaf", "bird")
_LIST_OPS = (  # (name stem, docstring phrase, expression over xs)
    ("largest", "the largest number in xs", "max(xs)"),
    ("smallest", "the smallest number in xs", "min(xs)"),
    ("total", "the sum of the numbers in xs", "sum(xs)"),
    ("count", "the number of items in xs", "len(xs)"),
    ("first", "the first item of xs", "xs[0]"),
    ("last", "the last item of xs", "xs[-1]"),
)


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> tuple[str, ...]:
    return tuple(str(rng.randint(lo, hi)) for _ in range(n))


def _strings(rng: random.Random, n: int, alphabet: str = "abcde") -> tuple[str, ...]:
    return tuple(
        repr("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))) for _ in range(n)
    )


def _lists(rng: random.Random, n: int) -> tuple[str, ...]:
    return tuple(str([rng.randint(-9, 30) for _ in range(rng.randint(1, 6))]) for _ in range(n))


def _task(family, name, params, doc, body, make_calls) -> CodeTask:
    # The docstring holds every constant: name variants of one function share a key (and a
    # split), so a held-out `add_6` has no training twin `plus_6`.
    key = f"{family}:{doc}"
    rng = random.Random(f"{key}:{name}")  # str seeds go through sha512: stable across runs
    return CodeTask(family, name, params, doc, f"    return {body}\n", make_calls(rng), key)


def _arith() -> list[CodeTask]:
    out = []
    # One-digit constants: a task is learnable by copying its docstring's constant into the
    # body (a d=128, 4-layer model in a few hundred steps), and held out by that constant.
    for k in range(1, 10):
        for stem in ("add", "plus"):
            out.append(
                _task("add_k", f"{stem}_{k}", "x", f"Return x plus {k}.", f"x + {k}", _calls_int)
            )
        for stem in ("minus", "subtract"):
            out.append(
                _task("sub_k", f"{stem}_{k}", "x", f"Return x minus {k}.", f"x - {k}", _calls_int)
            )
    for k in range(2, 10):
        for stem in ("times", "multiply_by"):
            out.append(
                _task("mul_k", f"{stem}_{k}", "x", f"Return x times {k}.", f"x * {k}", _calls_int)
            )
        out.append(
            _task(
                "double_plus",
                f"double_plus_{k}",
                "x",
                f"Return x times 2 plus {k}.",
                f"x * 2 + {k}",
                _calls_int,
            )
        )
        out.append(_task("mod_k", f"mod_{k}", "x", f"Return x modulo {k}.", f"x % {k}", _calls_int))
        out.append(
            _task(
                "is_multiple",
                f"is_multiple_of_{k}",
                "n",
                f"Return True if n is a multiple of {k}.",
                f"n % {k} == 0",
                lambda rng, k=k: (str(k * rng.randint(1, 5)), str(k + 1), str(k - 1)),
            )
        )
    for k in range(0, 10):
        out.append(
            _task(
                "greater_than",
                f"is_above_{k}",
                "x",
                f"Return True if x is greater than {k}.",
                f"x > {k}",
                lambda rng, k=k: (str(k), str(k + 1), str(k - rng.randint(1, 9))),
            )
        )
        out.append(
            _task(
                "less_than",
                f"is_below_{k}",
                "x",
                f"Return True if x is less than {k}.",
                f"x < {k}",
                lambda rng, k=k: (str(k), str(k - 1), str(k + rng.randint(1, 9))),
            )
        )
        out.append(
            _task(
                "equals",
                f"is_{k}",
                "x",
                f"Return True if x equals {k}.",
                f"x == {k}",
                lambda rng, k=k: (str(k), str(k + 1), str(k - rng.randint(1, 9))),
            )
        )
    for lo in range(0, 4):
        for hi in range(6, 10):
            out.append(
                _task(
                    "clamp",
                    f"clamp_{lo}_{hi}",
                    "x",
                    f"Return x limited to the range {lo} to {hi}.",
                    f"max({lo}, min(x, {hi}))",
                    lambda rng, lo=lo, hi=hi: (
                        str(lo - rng.randint(1, 9)),
                        str(hi + rng.randint(1, 9)),
                        str(rng.randint(lo + 1, hi - 1)),
                    ),
                )
            )
    return out


def _calls_int(rng: random.Random) -> tuple[str, ...]:
    # (boolean and clamping families test their boundaries instead: an off-by-one must fail)
    return _ints(rng, 3)


def _strings_family() -> list[CodeTask]:
    out = []
    for c in string.ascii_lowercase[:12]:
        out.append(
            _task(
                "count_char",
                f"count_{c}",
                "s",
                f"Return how many times '{c}' occurs in s.",
                f"s.count('{c}')",
                lambda rng, c=c: _strings(rng, 3, "abcdefghijkl" + c * 3),
            )
        )
        out.append(
            _task(
                "contains",
                f"has_{c}",
                "s",
                f"Return True if '{c}' occurs in s.",
                f"'{c}' in s",
                lambda rng, c=c: (repr(c + "xyz"), repr("xyz"), *_strings(rng, 1, "abcdefghijkl")),
            )
        )
    for k in range(2, 8):
        out.append(
            _task(
                "repeat",
                f"repeat_{k}",
                "s",
                f"Return s repeated {k} times.",
                f"s * {k}",
                lambda rng: _strings(rng, 3),
            )
        )
    for k in range(1, 10):
        out.append(
            _task(
                "dashes",
                f"dashes_{k}",
                "s",
                f"Return s followed by {k} dashes.",
                f"s + '-' * {k}",
                lambda rng: _strings(rng, 3),
            )
        )
    for k in range(1, 6):
        for where, expr in (("first", f"s[:{k}]"), ("last", f"s[-{k}:]")):
            out.append(
                _task(
                    "slice",
                    f"{where}_{k}_chars",
                    "s",
                    f"Return the {where} {k} characters of s.",
                    expr,
                    lambda rng: _strings(rng, 3, "abcdefgh"),
                )
            )
    for w in _WORDS:
        out.append(
            _task(
                "starts_with",
                f"starts_with_{w}",
                "s",
                f"Return True if s starts with '{w}'.",
                f"s.startswith('{w}')",
                lambda rng, w=w: tuple(
                    repr(rng.choice(("", w)) + rng.choice(_WORDS)) for _ in range(3)
                ),
            )
        )
        out.append(
            _task(
                "ends_with",
                f"ends_with_{w}",
                "s",
                f"Return True if s ends with '{w}'.",
                f"s.endswith('{w}')",
                lambda rng, w=w: tuple(
                    repr(rng.choice(_WORDS) + rng.choice(("", w))) for _ in range(3)
                ),
            )
        )
        out.append(
            _task(
                "greet",
                f"greet_{w}",
                "name",
                f"Return the text '{w} ' followed by name.",
                f"'{w} ' + name",
                lambda rng: tuple(repr(rng.choice(_WORDS)) for _ in range(3)),
            )
        )
    out.append(
        _task("reverse", "reverse", "s", "Return s reversed.", "s[::-1]", lambda r: _strings(r, 3))
    )
    return out


def _lists_family() -> list[CodeTask]:
    out = []
    for stem, phrase, expr in _LIST_OPS:
        for k in range(0, 10):
            doc = f"Return {phrase}." if k == 0 else f"Return {phrase} plus {k}."
            name = f"{stem}_item" if k == 0 else f"{stem}_item_plus_{k}"
            out.append(
                _task(
                    "list_op",
                    name,
                    "xs",
                    doc,
                    expr if k == 0 else f"{expr} + {k}",
                    lambda rng: _lists(rng, 3),
                )
            )
    return out


def all_tasks() -> list[CodeTask]:
    """Every task, in a fixed order (about 260; about 235 distinct keys)."""
    return _arith() + _strings_family() + _lists_family()


def tasks(which: str) -> list[CodeTask]:
    """The "train" or "heldout" tasks, in `all_tasks` order."""
    if which not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {which!r}")
    return [t for t in all_tasks() if split(t) == which]


# --- training text -----------------------------------------------------------------------------
def module_text(group: list[CodeTask]) -> str:
    """A pretraining document: several reference functions, blank-line separated."""
    return "\n\n".join(t.solution for t in group)


def modules(pool: list[CodeTask], n: int, per_module: int, rng: random.Random) -> list[str]:
    """`n` documents of `per_module` functions each, drawn by shuffled passes over `pool`
    (every task appears about equally often)."""
    order: list[CodeTask] = []
    docs = []
    for _ in range(n):
        group = []
        while len(group) < per_module:
            if not order:
                order = list(pool)
                rng.shuffle(order)
            t = order.pop()
            if t not in group:
                group.append(t)
        docs.append(module_text(group))
    return docs


_ASK_FORMS = (
    "{ask}",
    "Write a Python function `{sig}`: {doc}",
    "Please implement `{sig}` in Python. {doc}",
)


def conversation(task: CodeTask, rng: random.Random) -> list[dict]:
    """A chat SFT conversation: the request in words (one of a few phrasings), answered with
    the reference function in a fenced python block."""
    form = rng.choice(_ASK_FORMS)
    user = form.format(ask=task.ask, sig=task.signature, doc=task.doc)
    reply = f"```python\n{task.solution}```"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def eval_record(task: CodeTask) -> dict:
    """The synth_code benchmark's row (data/eval/synth_code.jsonl)."""
    return {
        "task_id": f"{task.family}/{task.name}",  # unique (name variants share a key)
        "key": task.key,
        "family": task.family,
        "entry_point": task.name,
        "prompt": task.prompt,
        "ask": task.ask,
        "canonical_solution": task.body,
        "tests": task.tests(),
    }
