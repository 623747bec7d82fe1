"""Scores: the unbiased pass@k estimator and the averages the report uses."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c passed (Chen et al. 2021):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    The product form avoids huge binomials. Requires 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n samples, c passed)."""
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def accuracy(
    records: list[dict], *, average: str, groups: dict[str, tuple[str, ...]] | None = None
) -> dict:
    """Overall, per-category and per-group accuracy (in %) of scored sample records.

    average="micro": every sample weighs the same, overall and within groups (MMLU, GSM8K);
    average="macro": every category weighs the same (C-Eval averages its subjects).
    """
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(bool(r["correct"]))
    per_cat = {c: 100.0 * float(np.mean(v)) for c, v in sorted(by_cat.items())}

    def combine(cats: list[str]) -> float | None:
        cats = [c for c in cats if c in by_cat]
        if not cats:
            return None
        if average == "macro":
            return float(np.mean([per_cat[c] for c in cats]))
        return 100.0 * float(np.mean([x for c in cats for x in by_cat[c]]))

    out = {"overall": combine(list(by_cat)), "n": len(records), "per_category": per_cat}
    if groups:
        out["per_group"] = {g: combine(list(cats)) for g, cats in groups.items()}
    return out
