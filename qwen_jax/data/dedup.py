"""Offline near-duplicate removal with MinHash + LSH (spec §4.1, "fuzzy dedup").

Documents become sets of word 5-gram shingles; a MinHash signature of `num_perm` values
estimates the Jaccard similarity of two sets as the fraction of equal values. LSH cuts the
signature into `bands` x `rows`; documents sharing any whole band become candidates (with
probability 1 - (1 - J^rows)^bands, an S-curve around `threshold`). Candidates whose estimated
Jaccard reaches the threshold are linked, linked documents form clusters (union-find), and
each cluster keeps its first document in input order. Exact duplicates (after the same
normalization) are always caught, whatever the threshold.

One machine, in memory (signatures: 4 * num_perm bytes per document); run it per corpus
shard, or over a sample, before training. `qwen-jax data dedup` wraps `dedup_files`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qwen_jax.tokenizer.base import nfc

_WORD = re.compile(r"\w+")
_MAX_PAIRS = 64  # candidates compared per document within one LSH bucket


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """uint64 [S] 32-bit hashes of the distinct word n-grams of lowercased NFC text (a text
    shorter than n words is one shingle)."""
    words = _WORD.findall(nfc(text).lower())
    grams = {" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
    digests = [hashlib.blake2b(g.encode(), digest_size=4).digest() for g in sorted(grams)]
    return np.frombuffer(b"".join(digests), dtype="<u4").astype(np.uint64)


@dataclasses.dataclass(frozen=True)
class MinHasher:
    """`num_perm` multiply-add-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32 of 32-bit keys
    (a strongly universal family); the signature is the per-hash minimum over shingles."""

    num_perm: int = 128
    seed: int = 1

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64) * np.uint64(2) + 1
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        return a, b

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        a, b = self.params()
        with np.errstate(over="ignore"):  # arithmetic mod 2^64 is the point
            h = (a[:, None] * hashes[None, :] + b[:, None]) >> np.uint64(32)
        return h.min(axis=1).astype(np.uint32)


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the false-positive area below
    the threshold plus the false-negative area above it of P(J) = 1 - (1 - J^r)^b."""
    s = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), np.inf
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            p = 1.0 - (1.0 - s**rows) ** bands
            err = np.trapezoid(np.where(s < threshold, p, 1.0 - p), s)
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


@dataclasses.dataclass
class DedupResult:
    keep: np.ndarray  # bool [N]
    duplicate_of: dict[int, tuple[int, float]]  # removed doc -> (kept doc, estimated Jaccard)
    bands: int
    rows: int


def near_duplicates(
    texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5
) -> DedupResult:
    """Which of `texts` to keep (first of each near-duplicate cluster, input order)."""
    hasher = MinHasher(num_perm)
    sigs = (
        np.stack([hasher.signature(shingle_hashes(t, ngram)) for t in texts])
        if texts
        else (np.zeros([0, num_perm], np.uint32))
    )
    bands, rows = lsh_params(threshold, num_perm)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    checked: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, sig in enumerate(sigs[:, band * rows : (band + 1) * rows]):
            buckets[sig.tobytes()].append(i)
        for members in buckets.values():
            for n, j in enumerate(members):
                for i in members[max(0, n - _MAX_PAIRS) : n]:  # bounded for huge buckets
                    if (i, j) in checked:
                        continue
                    checked.add((i, j))
                    if np.mean(sigs[i] == sigs[j]) >= threshold:
                        ri, rj = root(i), root(j)
                        parent[max(ri, rj)] = min(ri, rj)  # the earliest document is the root
    keep = np.array([root(i) == i for i in range(len(texts))], bool)
    dup = {
        i: (root(i), float(np.mean(sigs[i] == sigs[root(i)])))
        for i in range(len(texts))
        if not keep[i]
    }
    return DedupResult(keep, dup, bands, rows)


def dedup_files(
    inputs: Sequence[str],
    out_dir: str,
    *,
    text_key: str = "text",
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
) -> dict:
    """Near-dedup jsonl files (records with `text_key`) or text files (one document each) as
    one corpus; write the kept records under `out_dir` with the same file names, plus
    `dedup_report.json`. Returns the report."""
    docs: list[tuple[int, str, str]] = []  # (file number, raw line or whole text, text)
    for f, path in enumerate(inputs):
        data = Path(path).read_text(encoding="utf-8")
        if path.endswith(".jsonl"):
            for line in data.splitlines():
                if line.strip():
                    docs.append((f, line, json.loads(line)[text_key]))
        else:
            docs.append((f, data, data))
    if len({Path(p).name for p in inputs}) != len(inputs):
        raise ValueError("input files must have distinct names (outputs reuse them)")
    result = near_duplicates([d[2] for d in docs], threshold, num_perm, ngram)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f, path in enumerate(inputs):
        kept = [d[1] for d, k in zip(docs, result.keep) if k and d[0] == f]
        text = "".join(line + "\n" for line in kept) if path.endswith(".jsonl") else "".join(kept)
        if kept or path.endswith(".jsonl"):
            (out / Path(path).name).write_text(text, encoding="utf-8")
    removed = sorted(result.duplicate_of.items())
    report = {
        "documents": len(docs),
        "kept": int(result.keep.sum()),
        "removed": len(removed),
        "threshold": threshold,
        "num_perm": num_perm,
        "ngram": ngram,
        "bands": result.bands,
        "rows": result.rows,
        "examples": [
            {
                "removed": _where(inputs, docs, i),
                "kept": _where(inputs, docs, j),
                "estimated_jaccard": round(jac, 3),
            }
            for i, (j, jac) in removed[:20]
        ],
    }
    (out / "dedup_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _where(inputs, docs, i: int) -> str:
    f = docs[i][0]
    return f"{inputs[f]}#{sum(1 for d in docs[:i] if d[0] == f)}"
