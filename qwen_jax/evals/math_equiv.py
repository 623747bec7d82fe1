"""MATH answers: extraction from a solution, normalization, and equivalence.

`is_equiv(pred, gold)` decides in three steps, cheapest first:
1. Minerva normalization (Lewkowycz et al. 2022, appendix D) of both sides, then string equality.
   Its quirks are kept on purpose (for example removing "ft" turns "\\left(" into "\\le("):
   reference answer fields were produced with it, and applying it to both sides keeps them
   comparable.
2. Hendrycks et al. (2021) `strip_string` normalization of both raw sides, string equality.
3. Symbolic: both sides converted from a small LaTeX subset (fractions, roots, powers, pi,
   implicit products, tuples and intervals element-wise) to sympy and `simplify(a - b) == 0`,
   under a wall-clock limit (SIGALRM, main thread only; elsewhere this step is skipped).
   Anything outside the subset is simply "not equivalent": sympy never evals free text, the
   converted string must consist of digits, operators and whitelisted names.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading

# --- extraction ---------------------------------------------------------------------------

_MINERVA_FINAL = re.compile(
    r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.S
)
_FINAL_IS = re.compile(r"[Ff]inal answer is:?\s*(.+)")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed x`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    m = re.match(r"\\(?:boxed|fbox)\s*\{", rest)
    if m is None:
        m = re.match(r"\\boxed ([^$\n]*)", rest)
        return m.group(1).strip() if m else None
    depth = 0
    for i in range(m.end() - 1, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[m.end() : i]
    return None


def extract_math_answer(text: str) -> str | None:
    """The model's final answer: Minerva's closing sentence, else the last box, else the text
    after "final answer is" on its line."""
    m = _MINERVA_FINAL.search(text)
    if m:
        return m.group(1).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    m = _FINAL_IS.search(text)
    return m.group(1).strip().rstrip(".") if m else None


# --- Minerva normalization ------------------------------------------------------------------

_MINERVA_SUBS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_MINERVA_DROP = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
    "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalization of a final answer string (see module docstring)."""
    s = answer.split("=")[-1]
    for before, after in _MINERVA_SUBS:
        s = s.replace(before, after)
    for expr in _MINERVA_DROP:
        s = s.replace(expr, "")
    # Unwrap \text{...}, \textbf{...}, \overline{...}, \boxed{...}; keep the math inside $...$.
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)
    s = re.sub(r"(\\text\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\textbf\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\overline\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", s)
    # \fracab -> \frac{a}{b}, \frac{a}b -> \frac{a}{b}, \sqrta -> \sqrt{a}
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


# --- Hendrycks normalization ----------------------------------------------------------------


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
        elif part[1] == "{":
            out += "{" + part[0] + "}" + part[1:]
        else:
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
    return out


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def strip_string(s: str) -> str:
    """Hendrycks et al.'s normalization of a MATH answer string."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "")
    if "\\text{ " in s:  # trailing units
        s = s.split("\\text{ ")[0]
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    lhs = s.split("=")
    if len(lhs) == 2 and len(lhs[0]) <= 2:
        s = lhs[1]
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_slash(s)


# --- symbolic equivalence -------------------------------------------------------------------

_ALLOWED_NAMES = {"sqrt", "pi", "oo", "I", "E", "sin", "cos", "tan", "log", "exp"}
_SAFE = re.compile(r"[0-9A-Za-z+\-*/()., ]*")
_MAX_EXPONENT = 1000
_LATEX_NAMES = {
    "pi": "pi",
    "cdot": "*",
    "times": "*",
    "infty": "oo",
    "sin": "sin",
    "cos": "cos",
    "tan": "tan",
    "log": "log",
    "ln": "log",
    "exp": "exp",
}


class _Unsupported(ValueError):
    pass


def _braced(s: str, i: int) -> tuple[str, int]:
    """Argument starting at s[i]: a {group} (balanced) or a single character."""
    if i >= len(s):
        raise _Unsupported("missing argument")
    if s[i] != "{":
        return s[i], i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1 : j], j + 1
    raise _Unsupported("unbalanced braces")


def _latex_to_expr(s: str) -> str:
    """LaTeX subset -> sympy-parsable text (raises `_Unsupported`)."""
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _braced(s, i + 5)
            den, i = _braced(s, i)
            out.append(f"(({_latex_to_expr(num)})/({_latex_to_expr(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            root = "2"
            if i < len(s) and s[i] == "[":
                close = s.index("]", i)
                root, i = _latex_to_expr(s[i + 1 : close]), close + 1
            arg, i = _braced(s, i)
            out.append(f"(({_latex_to_expr(arg)})**(1/({root})))")
        elif s.startswith("^", i):
            arg, i = _braced(s, i + 1)
            out.append(f"**({_latex_to_expr(arg)})")
        elif s[i] == "\\":
            m = re.match(r"\\([A-Za-z]+)", s[i:])
            name = m.group(1) if m else ""
            if name not in _LATEX_NAMES:
                raise _Unsupported(f"\\{name}")
            out.append(f" {_LATEX_NAMES[name]} ")
            i += 1 + len(name)
        elif s[i] in "{}":
            out.append("(" if s[i] == "{" else ")")
            i += 1
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _to_sympy(text: str):
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    expr = _latex_to_expr(text)
    if not _SAFE.fullmatch(expr):
        raise _Unsupported("characters outside the safe set")
    for name in re.findall(r"[A-Za-z]+", expr):
        if len(name) > 1 and name not in _ALLOWED_NAMES:
            raise _Unsupported(f"name {name}")
    names = {c: sympy.Symbol(c) for c in set(re.findall(r"\b[a-zA-Z]\b", expr)) - {"I", "E"}}
    transforms = standard_transformations + (implicit_multiplication_application, convert_xor)
    parsed = parse_expr(expr, local_dict=names, transformations=transforms, evaluate=False)
    for p in parsed.atoms(sympy.Pow):
        # 9^{9^{9^9}} would run for ever inside C big-int code, out of SIGALRM's reach; the
        # floating estimate (mpmath, unbounded exponent range) is instant.
        if p.exp.is_number and not abs(complex(sympy.N(p.exp, 15))) <= _MAX_EXPONENT:
            raise _Unsupported("exponent too large")
    return parsed


def _split_top(s: str) -> tuple[str, list[str], str]:
    """ "(a,b]" -> ("(", ["a", "b"], "]"); a bare "a,b" -> ("", [...], "")."""
    opener, closer = "", ""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        opener, closer, s = s[0], s[-1], s[1:-1]
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return opener, parts, closer


def _symbolic_equal(a: str, b: str) -> bool:
    import sympy

    oa, pa, ca = _split_top(a)
    ob, pb, cb = _split_top(b)
    if (oa, ca, len(pa)) != (ob, cb, len(pb)):
        return False
    for x, y in zip(pa, pb):
        ex, ey = _to_sympy(x), _to_sympy(y)
        diff = sympy.simplify(ex - ey)
        if diff != 0 and not (diff.is_number and abs(complex(sympy.N(diff))) < 1e-9):
            return False
    return True


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def is_equiv(pred: str | None, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether a predicted MATH answer equals the gold one (see module docstring)."""
    if pred is None:
        return False
    if normalize_final_answer(pred) == normalize_final_answer(gold):
        return True
    sp, sg = strip_string(pred), strip_string(gold)
    if sp == sg:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        with _time_limit(timeout_s):
            return _symbolic_equal(sp, sg)
    except Exception:
        # Unparsable (_Unsupported, or any of sympy's many error types) or too slow (_Timeout):
        # not proven equal.
        return False
