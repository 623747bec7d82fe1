"""Reading a sweep's results from its points' workdirs (local or gs://): status, table, plots.

A point's workdir is what `qwen-jax train` writes: `config.json` (the resolved config, written
when the run starts), `metrics.jsonl` (one record per logged step: {"step", "loss", "lr", ...};
evaluation records {"step", "eval_loss", ...} separately) and `checkpoints/<step>/` (a committed
Orbax step is a directory named by its number). A point is

- "done" when a checkpoint of its final step (config.json's run.steps) is committed: the run
  ended (a preempted run checkpoints an earlier step);
- "running/partial" when anything was written but not that (running, killed or preempted:
  launching again resumes it from its last checkpoint);
- "missing" when its workdir holds none of these.

gs:// paths are read through TensorFlow's gfile (already in the stack for seqio); local paths
through pathlib, without importing TensorFlow.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from qwen_jax.sweep.spec import Bayes, Point, Sweep, format_value, read_step, short_labels

DONE, PARTIAL, MISSING = "done", "running/partial", "missing"


# ----------------------------------------------------------------------------- file access


def _is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    if _is_gcs(path):
        gfile = _gfile()
        if not gfile.exists(path):
            return None
        with gfile.GFile(path, "r") as f:
            return f.read()
    p = Path(path)
    return p.read_text() if p.is_file() else None


def _listdir(path: str) -> list[str]:
    """Entry names of a directory ([] if it does not exist), without trailing slashes."""
    if _is_gcs(path):
        gfile = _gfile()
        if not gfile.isdir(path):
            return []
        return [name.rstrip("/") for name in gfile.listdir(path)]
    p = Path(path)
    return sorted(e.name for e in p.iterdir()) if p.is_dir() else []


# ----------------------------------------------------------------------------- one point


def read_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl's records in file order ([] when absent); a line cut short by a kill is
    skipped, as the trainer's own reader does."""
    text = _read_text(f"{workdir}/metrics.jsonl")
    out = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


def read_config(workdir: str) -> dict | None:
    """The resolved config the run wrote (config.json), or None."""
    text = _read_text(f"{workdir}/config.json")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def checkpoint_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps, ascending. Locally Orbax renames a finished step into place;
    on gs:// it writes the step where it stays and adds commit_success.txt last, so a step
    folder there counts only with that file. (A remote metrics.jsonl is uploaded at each
    checkpoint and at the end of the run: it lags the run by up to one checkpoint interval.)"""
    root = f"{workdir}/checkpoints"
    steps = sorted(int(n) for n in _listdir(root) if n.isdigit())
    if _is_gcs(workdir):
        steps = [s for s in steps if _read_text(f"{root}/{s}/commit_success.txt") is not None]
    return steps


def point_status(workdir: str) -> str:
    """ "done" | "running/partial" | "missing" (module docstring)."""
    config = read_config(workdir)
    steps = checkpoint_steps(workdir)
    if config is None and not steps and not _read_text(f"{workdir}/metrics.jsonl"):
        return MISSING
    target = (config or {}).get("run", {}).get("steps")
    if target is not None and steps and steps[-1] >= target:
        return DONE
    return PARTIAL


def metric_value(records: Sequence[dict], metric: str, mode: str, read: str):
    """(value, step) of `metric` read as the sweep says: the last record holding it ("final"),
    the best one by `mode` ("best"), or the one at step N ("step:N"); (None, None) if none."""
    rows = [r for r in records if metric in r and _finite(r[metric])]
    at = read_step(read)
    if at is not None:
        rows = [r for r in rows if r["step"] == at]
    if not rows:
        return None, None
    if read == "best":
        pick = min if mode == "min" else max
        row = pick(rows, key=lambda r: r[metric])
    else:
        row = rows[-1]
    return float(row[metric]), int(row["step"])


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# ----------------------------------------------------------------------------- the sweep


def sweep_points(sweep: Sweep, root: str) -> list[Point]:
    """The sweep's points: `points()`, plus for Bayes the later rounds' points found under
    root/sweep (each rebuilt from its config.json: the swept keys' values and run.seed)."""
    points = sweep.points()
    if not isinstance(sweep.space, Bayes):
        return points
    known = {p.name for p in points}
    for name in _listdir(f"{root.rstrip('/')}/{sweep.name}"):
        if name in known:
            continue
        config = read_config(f"{root.rstrip('/')}/{sweep.name}/{name}")
        if config is None:
            continue
        overrides = {**sweep.fixed}
        for key in sweep.swept_keys:
            section, _, leaf = key.partition(".")
            if leaf in config.get(section, {}):
                overrides[key] = config[section][leaf]
        seed = int(config.get("run", {}).get("seed", 0))
        overrides["run.seed"] = seed
        points.append(Point(name=name, overrides=overrides, seed=seed))
    return points


def results(sweep: Sweep, root: str, points: Sequence[Point] | None = None) -> list[dict]:
    """One row per point: name, status, last_step, the metric's value and step, the swept
    keys' values; sorted by the metric (best first, points without a value last)."""
    rows = []
    for point in sweep_points(sweep, root) if points is None else points:
        workdir = sweep.workdir(root, point)
        records = read_metrics(workdir)
        value, at = metric_value(records, sweep.metric, sweep.mode, sweep.read)
        row = {
            "point": point.name,
            "status": point_status(workdir),
            "last_step": max((r["step"] for r in records), default=None),
            sweep.metric: value,
            "metric_step": at,
        }
        row.update({k: point.overrides.get(k) for k in sweep.swept_keys})
        row["seed"] = point.seed
        row["workdir"] = workdir
        row["_records"] = records
        rows.append(row)
    sign = 1 if sweep.mode == "min" else -1
    rows.sort(key=lambda r: (r[sweep.metric] is None, sign * (r[sweep.metric] or 0.0)))
    return rows


def _columns(sweep: Sweep) -> list[str]:
    return [
        "point", "status", "last_step", sweep.metric, "metric_step", *sweep.swept_keys,
        "seed", "workdir",
    ]  # fmt: skip


def write_table(sweep: Sweep, rows: list[dict], out: Path) -> tuple[Path, Path]:
    """results.csv (full precision) and results.md (the same, for reading) in `out`."""
    cols = _columns(sweep)
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                        for c in cols])  # fmt: skip
    head = (
        f"# Sweep {sweep.name}\n\n{sweep.experiment}; metric {sweep.metric} ({sweep.mode},"
        f" read {sweep.read}); {len(rows)} points, best first.\n\n"
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = ["-" if r[c] is None else format_value(r[c]) for c in cols]
        cells[cols.index(sweep.metric)] = (
            "-" if r[sweep.metric] is None else f"{r[sweep.metric]:.6g}"
        )
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text(head + "\n".join(lines) + "\n")
    return csv_path, md_path


def write_plots(sweep: Sweep, rows: list[dict], out: Path) -> list[Path]:
    """loss_curves.png (training loss of every point, and the metric's curve when it is another
    key) and metric_vs_<key>.png per swept key (the metric against the key's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = ["loss"] + ([sweep.metric] if sweep.metric != "loss" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for r in rows:
            pts = [(x["step"], x[key]) for x in r["_records"] if key in x and _finite(x[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=r["point"])
        ax.set(xlabel="step", ylabel=key, title=f"{sweep.name}: {key}")
        ax.grid(alpha=0.3)
    if rows:
        axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    labels = short_labels(list(sweep.swept_keys))
    for key in sweep.swept_keys:
        pts = [(r[key], r[sweep.metric]) for r in rows if r[sweep.metric] is not None]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _ in pts)
        if numeric:
            ax.scatter([x for x, _ in pts], [y for _, y in pts])
            if (
                pts
                and min(x for x, _ in pts) > 0
                and max(x for x, _ in pts) >= 10 * min(x for x, _ in pts)
            ):
                ax.set_xscale("log")
        else:
            names = sorted({str(x) for x, _ in pts})
            ax.scatter([names.index(str(x)) for x, _ in pts], [y for _, y in pts])
            ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set(xlabel=key, ylabel=f"{sweep.metric} ({sweep.read})", title=sweep.name)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"metric_vs_{labels[key]}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def collect(sweep: Sweep, root: str, out: str | Path) -> list[Path]:
    """Write results.csv, results.md and the PNG plots into `out` (local); the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = results(sweep, root)
    return [*write_table(sweep, rows, out), *write_plots(sweep, rows, out)]
