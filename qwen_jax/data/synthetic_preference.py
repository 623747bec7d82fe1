"""A synthetic preference task with a learnable rule: the reward model's accuracy test data.

rule "parity" (default): the prompt gives a count of things and asks whether it is even or
  odd; both replies restate the number, the chosen one with the right parity, the rejected one
  with the wrong one:
      prompt   "Mia has 37 apples. Is that number even or odd?"
      chosen   "37 is odd."        rejected "37 is even."
  The reply alone decides the pair (its last digit against its parity word), so a reward read
  at the reply's <|im_end|> can learn it; Qwen-style tokenizers (the demo SentencePiece
  included) split digits, so only ten digit tokens carry the rule.
rule "signoff": a response-only rule a tiny model learns in a few steps: the chosen reply ends
  with the sign-off "Hope this helps!", the rejected one is the same answer without it.

Both splits draw from the same numbers and words (every digit and parity word appears in
training); the validation pairs are (name, object, number) combinations absent from the
training file, so its accuracy measures the rule, not memorised pairs. Deterministic given
the seed; the files are `{"prompt", "chosen", "rejected"}` jsonl (user_files.py reads them as
a preference task, e.g. `data.mixture=DIR/train.jsonl`, `data.eval_mixture=DIR/validation.jsonl`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RULES = ("parity", "signoff")
NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Omar", "Ivy", "Ken", "Lea", "Max")
OBJECTS = ("apples", "books", "coins", "stamps", "shells", "pencils", "marbles", "cards")
SIGNOFF = "Hope this helps!"


def _pair(rule: str, name: str, obj: str, n: int) -> dict:
    if rule == "parity":
        right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
        return {
            "prompt": f"{name} has {n} {obj}. Is that number even or odd?",
            "chosen": f"{n} is {right}.",
            "rejected": f"{n} is {wrong}.",
        }
    answer = f"{name} has {n} {obj}."
    return {
        "prompt": f"How many {obj} does {name} have? It is {n}.",
        "chosen": f"{answer} {SIGNOFF}",
        "rejected": answer,
    }


def preference_pairs(
    seed: int = 0, train: int = 2048, validation: int = 256, rule: str = "parity"
) -> tuple[list[dict], list[dict]]:
    """(train pairs, validation pairs) following `rule`; no (name, object, number) triple is in
    both. Numbers are 0..99."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    space = len(NAMES) * len(OBJECTS) * 100
    if train + validation > space:
        raise ValueError(f"at most {space} distinct pairs")
    rng = np.random.default_rng(np.random.SeedSequence([seed, RULES.index(rule)]))
    picks = rng.choice(space, size=train + validation, replace=False)
    pairs = []
    for p in picks.tolist():
        name, rest = NAMES[p % len(NAMES)], p // len(NAMES)
        obj, n = OBJECTS[rest % len(OBJECTS)], rest // len(OBJECTS)
        pairs.append(_pair(rule, name, obj, n))
    return pairs[:train], pairs[train:]


def write_preference_files(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train: int = 2048,
    validation: int = 256,
    rule: str = "parity",
) -> dict[str, Path]:
    """Write out_dir/train.jsonl and out_dir/validation.jsonl; returns {split: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in zip(
        ("train", "validation"), preference_pairs(seed, train, validation, rule)
    ):
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
