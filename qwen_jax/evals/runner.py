"""Run benchmarks against an `EvalModel`, resumably, and write the results table.

Output directory:
    <task>.samples.jsonl   one record per sample: id, category, prompt, output, extracted, gold,
                           correct, status, detail (appended batch by batch, so an interrupted
                           run loses at most one batch; a rerun skips every id already there)
    results.json           per task: overall score, n, per category / group, status counts
    results.md             the same as Markdown tables
Both tables are replaced atomically. An interrupted run (Ctrl-C, SIGTERM) still writes them:
the task in progress is summarized over the items it finished and marked "partial", and
results.md starts with what completed and what did not run.
Task names carry the protocol (`gsm8k-8shot`, `mmlu-chat-0shot`), so runs with other settings
never mix in one file. Scores are in percent; samples with status "bad_input" (malformed rows)
are excluded from scores and counted separately.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen_jax.evals.metrics import accuracy, mean_pass_at_k
from qwen_jax.evals.model_api import EvalModel
from qwen_jax.evals.tasks import Item, Task, build_task


def _read_samples(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write: that sample is simply redone
    return records


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _record(item: Item, output, verdict) -> dict:
    return {
        "id": item.id,
        "category": item.category,
        "prompt": item.prompt,
        "output": output,
        "extracted": verdict.extracted,
        "gold": item.gold,
        "correct": bool(verdict.correct),
        "status": verdict.status,
        "detail": verdict.detail,
    }


def _query(model: EvalModel, task: Task, batch: list[Item]) -> list[str]:
    if task.query is not None:
        return list(task.query(model, batch))
    prompts = [it.prompt for it in batch]
    if task.kind == "choice":
        logprobs_pc = np.asarray(model.next_token_logprobs(prompts, list(task.candidates)))
        if logprobs_pc.shape != (len(batch), len(task.candidates)):
            raise ValueError(f"next_token_logprobs returned shape {logprobs_pc.shape}")
        return [task.candidates[int(i)].strip() for i in np.argmax(logprobs_pc, axis=1)]
    outputs = model.generate(prompts, max_new_tokens=task.max_new_tokens, stop=list(task.stop))
    if len(outputs) != len(batch):
        raise ValueError(f"generate returned {len(outputs)} outputs for {len(batch)} prompts")
    return list(outputs)


def run_task(
    model: EvalModel,
    task: Task,
    out_dir: Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Score the first `limit` items of `task` not yet in its samples file; summarize all."""
    _check_limit(limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{task.name}.samples.jsonl"
    items = task.items[:limit] if limit is not None else task.items
    done = {r["id"] for r in _read_samples(path)}
    todo = [it for it in items if it.id not in done]
    bad = [it for it in todo if it.error is not None]
    _append(path, [_bad_record(it) for it in bad])
    good = [it for it in todo if it.error is None]
    bar = tqdm(
        total=len(items), initial=len(items) - len(good), desc=task.name, disable=not progress
    )
    for start in range(0, len(good), batch_size):
        batch = good[start : start + batch_size]
        outputs = _query(model, task, batch)
        verdicts = task.score(batch, outputs)
        _append(path, [_record(it, o, v) for it, o, v in zip(batch, outputs, verdicts)])
        bar.update(len(batch))
    bar.close()
    return _summary_so_far(task, out_dir, limit)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:  # [:-1] would silently drop the last item
        raise ValueError(f"limit must be >= 1 item per benchmark, got {limit}")


def _summary_so_far(task: Task, out_dir: Path, limit: int | None) -> dict:
    """The summary over the first `limit` items that have a record in the samples file."""
    items = task.items[:limit] if limit is not None else task.items
    wanted = {it.id for it in items}
    path = out_dir / f"{task.name}.samples.jsonl"
    return summarize(task, [r for r in _read_samples(path) if r["id"] in wanted])


def _bad_record(item: Item) -> dict:
    return {
        "id": item.id,
        "category": item.category,
        "prompt": "",
        "output": None,
        "extracted": None,
        "gold": item.gold,
        "correct": False,
        "status": "bad_input",
        "detail": item.error,
    }


def summarize(task: Task, records: list[dict]) -> dict:
    latest = {r["id"]: r for r in records}  # a resumed run may have appended an id twice
    records = list(latest.values())
    scored = [r for r in records if r["status"] != "bad_input"]
    summary = {"metric": task.metric, "average": task.average}
    summary |= accuracy(scored, average=task.average, groups=task.groups)
    if task.metric.startswith("pass@"):
        # Greedy decoding: one sample per problem, so pass@1 is the pass rate (n=1, c=0|1).
        counts = [(1, int(r["correct"])) for r in scored]
        summary["overall"] = 100.0 * mean_pass_at_k(counts, 1) if counts else None
    summary["status_counts"] = dict(Counter(r["status"] for r in records))
    summary["bad_input"] = len(records) - len(scored)
    if task.report is not None:
        summary["report"] = task.report(scored)
        if "overall" in summary["report"]:  # a task whose figure is not an accuracy (code_ppl)
            summary["overall"] = summary["report"]["overall"]
    return summary


def run(
    model: EvalModel,
    benchmarks: list[str],
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    shots: int | None = None,
    chat: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    task_options: dict[str, dict] | None = None,
) -> dict:
    """Run each benchmark; one that cannot be built (missing files) is reported, not fatal,
    but a run where none can be built raises ValueError (and writes nothing). Interrupted
    (KeyboardInterrupt, SIGTERM), it writes the partial tables and re-raises."""
    _check_limit(limit)
    out_dir = Path(out_dir)
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    tasks, skipped = [], {}
    for name in benchmarks:
        opts = (task_options or {}).get(name, {})
        try:
            tasks.append(build_task(name, data_dir, shots=shots, chat=chat, **opts))
        except (FileNotFoundError, ValueError) as e:
            results[name] = {"error": str(e)}
            skipped[name] = str(e)
            print(f"{name}: skipped: {e}")
    if not tasks:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise ValueError(f"nothing to evaluate in {data_dir}: {reasons or 'no benchmarks given'}")
    completed: list[str] = []
    try:
        with _sigterm_as_interrupt():
            for task in tasks:
                results[task.name] = run_task(
                    model, task, out_dir, limit=limit, batch_size=batch_size, progress=progress
                )
                completed.append(task.name)
    except KeyboardInterrupt:
        current = tasks[len(completed)]
        so_far = _summary_so_far(current, out_dir, limit)
        total = len(current.items[:limit] if limit is not None else current.items)
        results[current.name] = so_far | {"partial": f"{so_far['n']} of {total} items"}
        note = (
            f"**Partial run (interrupted).** Completed: {', '.join(completed) or 'none'}; "
            f"interrupted: {current.name} ({so_far['n']} of {total} items); not run: "
            f"{', '.join(t.name for t in tasks[len(completed) + 1 :]) or 'none'}."
        )
        _write_tables(out_dir, results, note)
        raise
    _write_tables(out_dir, results)
    return results


def _write_tables(out_dir: Path, results: dict, note: str = "") -> None:
    """results.json and results.md, each replaced atomically (a reader never sees half)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = (note + "\n\n" if note else "") + results_table(results)
    for name, text in (
        ("results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n"),
        ("results.md", table),
    ):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler stopping the job) ends the run like Ctrl-C: tables still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def results_table(results: dict) -> str:
    """Markdown: one overview row per task, then per-group and per-category tables."""
    lines = ["| task | metric | score | n | bad input | statuses |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | unavailable: {r['error']} |")
            continue
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["status_counts"].items()))
        if r.get("partial"):
            statuses += f" (partial: {r['partial']})"
        row = [name, r["metric"], _fmt(r["overall"]), str(r["n"]), str(r["bad_input"]), statuses]
        lines.append("| " + " | ".join(row) + " |")
    for name, r in results.items():
        for key, title in (("per_group", "group"), ("per_category", "category")):
            table = r.get(key) or {}
            if len(table) <= 1:
                continue
            lines += ["", f"### {name}: per {title}", "", f"| {title} | score |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in table.items()]
    for name, r in results.items():
        if r.get("report", {}).get("table"):
            lines += ["", f"### {name}: as the report lays it out", "", r["report"]["table"]]
    return "\n".join(lines) + "\n"
