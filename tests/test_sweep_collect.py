"""`qwen-jax sweep status` / `collect` on hand-written workdirs (what `qwen-jax train` writes:
config.json, metrics.jsonl, checkpoints/<step>/): each point's status, the metric read as the
sweep says, and a results table whose numbers are the points' own metrics.jsonl values.
(tests/test_sweep_launch.py trains real points.)"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from qwen_jax import cli
from qwen_jax.sweep.collect import (
    DONE,
    MISSING,
    PARTIAL,
    collect,
    metric_value,
    point_status,
    read_metrics,
    results,
    sweep_points,
)
from qwen_jax.sweep.spec import Bayes, Grid, Sweep, int_uniform, log_uniform
from qwen_jax.testing.experiments import REPO

TINY = str(REPO / "experiments/pretrain/tiny.py:runlocal")
STEPS = 12


def _write_point(workdir: Path, losses: dict[int, float], evals: dict[int, float],
                 checkpoints: list[int], steps: int = STEPS, seed: int = 0,
                 extra: dict | None = None) -> None:  # fmt: skip
    """A workdir as the trainer leaves it (train and eval records are separate lines)."""
    workdir.mkdir(parents=True)
    config = {"run": {"steps": steps, "seed": seed}, "optim": {}, **(extra or {})}
    (workdir / "config.json").write_text(json.dumps(config))
    lines = []
    for step in sorted(set(losses) | set(evals)):
        if step in losses:
            lines.append(json.dumps({"step": step, "loss": losses[step], "lr": 1e-3}))
        if step in evals:
            lines.append(json.dumps({"step": step, "eval_loss": evals[step]}))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    for step in checkpoints:
        (workdir / "checkpoints" / str(step) / "state").mkdir(parents=True)


def _curve(start: float, rate: float, upto: int = STEPS) -> dict[int, float]:
    return {s: start * math.exp(-rate * s) + 0.1 * (s == 8) for s in range(2, upto + 1, 2)}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2 x 2 grid: three points finished or interrupted with different curves, one missing."""
    root = tmp_path_factory.mktemp("sweeps")
    sweep = Sweep(
        "lrw",
        TINY,
        space=Grid({"optim.peak_lr": [1e-3, 1e-2], "optim.warmup_steps": [1, 6]}),
        metric="eval_loss",
        read="final",
    )
    points = {p.name: p for p in sweep.points()}
    curves = {
        "peak_lr=0.001,warmup_steps=1,seed=0": (_curve(5.0, 0.05), [6, 12]),
        "peak_lr=0.001,warmup_steps=6,seed=0": (_curve(5.0, 0.04), [6, 12]),
        "peak_lr=0.01,warmup_steps=1,seed=0": (_curve(5.0, 0.09, upto=8), [6]),  # killed at 8
    }
    for name, (losses, ckpts) in curves.items():
        evals = {s: v + 0.2 for s, v in losses.items() if s % 6 == 0}
        _write_point(Path(sweep.workdir(str(root), points[name])), losses, evals, ckpts)
    return sweep, root, curves


def test_point_status_from_the_workdir(swept, tmp_path):
    sweep, root, _ = swept
    status = {p.name: point_status(sweep.workdir(str(root), p)) for p in sweep.points()}
    assert status == {
        "peak_lr=0.001,warmup_steps=1,seed=0": DONE,
        "peak_lr=0.001,warmup_steps=6,seed=0": DONE,
        "peak_lr=0.01,warmup_steps=1,seed=0": PARTIAL,
        "peak_lr=0.01,warmup_steps=6,seed=0": MISSING,
    }
    # The final step logged but its checkpoint not committed (killed while saving): partial.
    wd = tmp_path / "saving"
    _write_point(wd, _curve(5.0, 0.1), {}, [6])
    (wd / "checkpoints" / "12.orbax-checkpoint-tmp-3").mkdir()
    assert point_status(str(wd)) == PARTIAL
    # Only the config written (killed during the first steps): partial; an empty dir: missing.
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text(json.dumps({"run": {"steps": 5}}))
    assert point_status(str(tmp_path / "started")) == PARTIAL
    (tmp_path / "empty").mkdir()
    assert point_status(str(tmp_path / "empty")) == MISSING


def test_metric_read_final_best_and_at_a_step(tmp_path):
    wd = tmp_path / "p"
    _write_point(wd, {2: 3.0, 4: 2.0, 6: 2.5}, {4: 2.9, 6: 2.7}, [6], steps=6)
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # a record cut short by a kill: skipped
    records = read_metrics(str(wd))
    assert [r["step"] for r in records] == [2, 4, 4, 6, 6]
    assert metric_value(records, "loss", "min", "final") == (2.5, 6)
    assert metric_value(records, "loss", "min", "best") == (2.0, 4)
    assert metric_value(records, "loss", "max", "best") == (3.0, 2)
    assert metric_value(records, "eval_loss", "min", "step:4") == (2.9, 4)
    assert metric_value(records, "eval_loss", "min", "step:2") == (None, None)
    assert metric_value(records, "accuracy", "max", "final") == (None, None)


def test_collect_table_equals_each_points_metrics_file(swept, tmp_path):
    sweep, root, curves = swept
    out = tmp_path / "report"
    paths = collect(sweep, str(root), out)
    assert sorted(p.name for p in paths) == sorted([
        "results.csv", "results.md", "loss_curves.png",
        "metric_vs_peak_lr.png", "metric_vs_warmup_steps.png",
    ])  # fmt: skip
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # Each point's value, read back from its own metrics.jsonl: the last eval_loss record.
    own = {}
    for p in sweep.points():
        path = Path(sweep.workdir(str(root), p)) / "metrics.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        evals = [r for r in recs if "eval_loss" in r]
        own[p.name] = (evals[-1]["eval_loss"], evals[-1]["step"]) if evals else None
    assert [r["point"] for r in rows] == sorted(
        own, key=lambda n: (own[n] is None, own[n][0] if own[n] else 0)
    )  # best (lowest) first, the missing point last
    for r in rows:
        if own[r["point"]] is None:
            assert r["eval_loss"] == "" and r["status"] == MISSING
            continue
        assert float(r["eval_loss"]) == own[r["point"]][0]  # exact: repr of the float
        assert int(r["metric_step"]) == own[r["point"]][1]
        assert int(r["last_step"]) == max(curves[r["point"]][0])
    by_name = {r["point"]: r for r in rows}
    assert by_name["peak_lr=0.01,warmup_steps=1,seed=0"]["metric_step"] == "6"  # killed at 8
    assert float(by_name["peak_lr=0.01,warmup_steps=6,seed=0"]["optim.peak_lr"]) == 1e-2
    md = (out / "results.md").read_text()
    first = next(line for line in md.splitlines() if line.startswith(f"| {rows[0]['point']} "))
    assert f"| {float(rows[0]['eval_loss']):.6g} |" in first
    for png in (p for p in paths if p.suffix == ".png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png


def test_status_and_collect_verbs(swept, tmp_path, capsys):
    sweep, root, _ = swept
    sweep_file = tmp_path / "lrw.py"
    sweep_file.write_text(
        "from qwen_jax.sweep.spec import Grid, Sweep\n"
        "def get_sweep():\n"
        f"    return Sweep('lrw', {TINY!r}, metric='eval_loss',\n"
        "        space=Grid({'optim.peak_lr': [1e-3, 1e-2], 'optim.warmup_steps': [1, 6]}))\n"
    )
    assert cli.main(["sweep", "status", str(sweep_file), "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert status["peak_lr=0.01,warmup_steps=1,seed=0"][:2] == [PARTIAL, "8"]
    assert status["peak_lr=0.001,warmup_steps=1,seed=0"][:2] == [DONE, "12"]
    assert status["peak_lr=0.01,warmup_steps=6,seed=0"] == [MISSING, "-", "-"]
    assert lines[-1] == "2/4 done"
    out = tmp_path / "collected"
    argv = ["sweep", "collect", str(sweep_file), "--root", str(root), "--out", str(out)]
    assert cli.main(argv) == 0
    assert (out / "results.csv").exists() and (out / "loss_curves.png").exists()


def test_bayes_rounds_are_found_in_the_root(tmp_path):
    """Points suggested after the first batch are not in points(): status and collect find them
    under the sweep's root and rebuild their swept values from config.json."""
    pytest.importorskip("optuna")
    axes = {"optim.peak_lr": log_uniform(1e-4, 1e-2), "optim.warmup_steps": int_uniform(0, 6)}
    sweep = Sweep("tpe", TINY, space=Bayes(axes, num_points=4, batch=2, seed=1))
    first = sweep.points()
    later = sweep.suggest([(p, 1.0 + i) for i, p in enumerate(first)], 1)[0]
    for i, p in enumerate([*first, later]):
        extra = {"optim": {"peak_lr": p.overrides["optim.peak_lr"],
                           "warmup_steps": p.overrides["optim.warmup_steps"]}}  # fmt: skip
        _write_point(Path(sweep.workdir(str(tmp_path), p)), {12: 3.0 - i}, {}, [12], extra=extra)
    found = sweep_points(sweep, str(tmp_path))
    assert [p.name for p in found] == [*(p.name for p in first), later.name]
    assert found[-1].overrides == later.overrides
    rows = results(sweep, str(tmp_path))
    assert rows[0]["point"] == later.name and rows[0]["loss"] == 3.0 - 2
