"""Sweep files and `qwen-jax sweep plan`: expansion, validation of bad input, costs and fit.

Expansion: grid (order, seeds), random (seeded, in range, rounded so names show the values),
Optuna TPE (seeded first batch, deterministic next batches, budget), named points. Every bad
input is refused before anything runs, naming the key / point / topology. `plan` computes the
project's analytical FLOPs and chip-hours, and rejects a point that does not fit HBM when
compiled for its TPU slice, with the compiler's figure.
"""

from __future__ import annotations

import math
import re

import pytest

from qwen_jax import cli
from qwen_jax.model.config import PRESETS
from qwen_jax.sweep import plan as plan_mod
from qwen_jax.sweep.spec import (
    Bayes,
    Grid,
    Launch,
    Random,
    Sweep,
    SweepError,
    check_topology,
    choice,
    int_uniform,
    load_sweep,
    log_uniform,
    uniform,
)
from qwen_jax.testing.experiments import REPO

TINY = str(REPO / "experiments/pretrain/tiny.py:runlocal")
SWEEPS = sorted((REPO / "experiments/sweeps").glob("*.py"))


def _launch(topology: str) -> Launch:
    return Launch(topology, "us-east5-a", "v2-alpha-tpuv5", None, "gs://b/sweeps", None, None)


# ----------------------------------------------------------------------------- expansion


def test_grid_expands_in_order_with_seeds_and_fixed_overrides():
    s = Sweep(
        "g",
        TINY,
        space=Grid({"optim.peak_lr": [1e-3, 3e-3], "optim.warmup_steps": [1, 5]}),
        seeds=(0, 7),
        fixed={"run.steps": 4},
    )
    points = s.points()
    assert [p.name for p in points] == [
        f"peak_lr={lr},warmup_steps={w},seed={seed}"
        for lr in ("0.001", "0.003")
        for w in (1, 5)
        for seed in (0, 7)
    ]
    first = points[1]
    assert first.seed == 7
    assert first.overrides == {
        "run.steps": 4, "optim.peak_lr": 1e-3, "optim.warmup_steps": 1, "run.seed": 7,
    }  # fmt: skip
    assert s.workdir("gs://b/root/", first) == f"gs://b/root/g/{first.name}"
    # Every point builds its full TrainConfig with its values.
    configs = dict((p.name, c) for p, c in s.validate())
    cfg = configs["peak_lr=0.003,warmup_steps=5,seed=7"]
    assert (cfg.optim.peak_lr, cfg.optim.warmup_steps, cfg.run.seed, cfg.run.steps) == (
        3e-3, 5, 7, 4,
    )  # fmt: skip


def test_random_is_seeded_in_range_and_named_by_its_exact_values():
    axes = {
        "optim.peak_lr": log_uniform(1e-4, 1e-2),
        "optim.weight_decay": uniform(0.0, 0.2),
        "optim.warmup_steps": int_uniform(0, 9),
        "optim.schedule": choice("cosine", "constant"),
    }
    s = Sweep("r", TINY, space=Random(axes, num_points=16, seed=3))
    a, b = s.points(), s.points()
    assert a == b and len(a) == 16
    other = Sweep("r", TINY, space=Random(axes, num_points=16, seed=4)).points()
    assert [p.overrides for p in other] != [p.overrides for p in a]
    lrs = [p.overrides["optim.peak_lr"] for p in a]
    assert all(1e-4 <= x <= 1e-2 for x in lrs)
    assert min(lrs) < 1e-3 < max(lrs)  # log-uniform: both decades are reached
    assert all(isinstance(p.overrides["optim.warmup_steps"], int) for p in a)
    assert {p.overrides["optim.schedule"] for p in a} == {"cosine", "constant"}
    for p in a:
        # The name holds the override exactly: rounded to 4 significant digits.
        lr = p.overrides["optim.peak_lr"]
        assert float(f"{lr:.4g}") == lr and f"peak_lr={lr:.4g}," in p.name
    s.validate()


def test_bayes_first_batch_then_suggestions_from_results():
    pytest.importorskip("optuna")
    axes = {"optim.peak_lr": log_uniform(1e-4, 1e-1), "optim.warmup_steps": int_uniform(0, 8)}
    s = Sweep("b", TINY, space=Bayes(axes, num_points=10, batch=4, seed=0), seeds=(0, 1))
    first = s.points()
    assert len(first) == 8 and first == s.points()  # 4 configurations x 2 seeds, seeded
    assert len({p.overrides["optim.peak_lr"] for p in first}) == 4

    def loss(p):  # best near lr = 1e-2
        return (math.log10(p.overrides["optim.peak_lr"]) + 2) ** 2 + 0.01 * p.seed

    told = [(p, loss(p)) for p in first]
    nxt = s.suggest(told)
    assert nxt == s.suggest(told)  # deterministic given the results
    assert len(nxt) == 8
    seen = {p.name for p in first}
    assert not seen & {p.name for p in nxt}
    for p in nxt:
        assert 1e-4 <= p.overrides["optim.peak_lr"] <= 1e-1
        assert 0 <= p.overrides["optim.warmup_steps"] <= 8
    # The budget is 10 configurations: after 8 told, 2 remain, then none. A configuration
    # whose runs gave no finite value (diverged) still counts.
    told += [(p, math.nan if i < 2 else loss(p)) for i, p in enumerate(nxt)]
    assert len(s.suggest(told)) == 2 * 2
    told += [(p, loss(p)) for p in s.suggest(told)]
    assert s.suggest(told) == []
    with pytest.raises(SweepError, match="needs a Bayes space"):
        Sweep("g", TINY, space=Grid({"run.steps": [1]})).suggest(told)


def test_named_points_come_after_the_space_with_seeds():
    s = Sweep(
        "n",
        TINY,
        space=Grid({"optim.peak_lr": [1e-3]}),
        named={"baseline": {}, "hot lr": {"optim.peak_lr": 0.02}},
        seeds=(1, 2),
    )
    names = [p.name for p in s.points()]
    assert names == [
        "peak_lr=0.001,seed=1", "peak_lr=0.001,seed=2",
        "baseline,seed=1", "baseline,seed=2", "hot_lr,seed=1", "hot_lr,seed=2",
    ]  # fmt: skip
    hot = s.points()[-1]
    assert hot.overrides == {"optim.peak_lr": 0.02, "run.seed": 2}
    assert s.swept_keys == ("optim.peak_lr",)
    only_named = Sweep("n", TINY, named={"a": {"run.steps": 3}})
    assert [p.name for p in only_named.points()] == ["a,seed=0"]


def test_every_sweep_file_loads_and_validates():
    assert {p.stem for p in SWEEPS} >= {"tiny_lr_warmup", "qwen_7b_v5p_lr", "tiny_bayes"}
    for path in SWEEPS:
        text = path.read_text()
        for needle in ("Reproduces", "Hardware", "Metric", "qwen-jax sweep plan"):
            assert needle in text, f"{path.name} docstring lacks {needle!r}"
        sweep = load_sweep(str(path))
        if isinstance(sweep.space, Bayes) and not _has_optuna():
            continue
        assert sweep.validate()
    grid = load_sweep(str(REPO / "experiments/sweeps/tiny_lr_warmup.py"))
    assert len(grid.points()) == 4


def _has_optuna() -> bool:
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(space=Grid({"optim.peak_lrr": [1e-3]})),
         "unknown config key optim.peak_lrr; did you mean optim.peak_lr?"),
        (dict(named={"a": {"run.stepz": 3}}),
         "unknown config key run.stepz; did you mean run.steps?"),
        (dict(space=Grid({"optim.peak_lr": ["fast"]})),
         "config key optim.peak_lr='fast': wrong type str"),
        (dict(space=Grid({"optim.warmup_steps": [1.5]})),
         "config key optim.warmup_steps=1.5: wrong type float"),
        (dict(space=Random({"optim.warmup_steps": uniform(0, 5)}, num_points=2)),
         "config key optim.warmup_steps=0.0: wrong type float"),
        (dict(space=Grid({"model.num_layers": ["2"]})),
         "config key model.num_layers='2': wrong type str"),
        (dict(space=Grid({"optim.warmup_steps": [5, 500]})),
         r"point warmup_steps=500,seed=0: config key optim.warmup_steps=500: must be <= "
         r"optim.total_steps=20"),
        (dict(space=Grid({"run.steps": [0]})), "point steps=0,seed=0: .*run.steps=0"),
        (dict(experiment="experiments/pretrain/nope.py", space=Grid({"run.steps": [1]})),
         "no experiment file"),
    ],
    ids=["unknown-key", "unknown-named-key", "str-for-float", "float-for-int",
         "uniform-on-int", "model-field-type", "invalid-point", "invalid-steps", "no-experiment"],
)  # fmt: skip
def test_bad_keys_and_values_are_named(kwargs, message):
    kwargs = {"experiment": TINY, **kwargs}
    with pytest.raises(SweepError, match=message):
        Sweep("bad", **kwargs).validate()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "empty space"),
        (dict(space=Grid({})), "empty space"),
        (dict(space=Grid({"optim.peak_lr": []})), "empty space .axis optim.peak_lr"),
        (dict(space=Random({"optim.peak_lr": choice()}, num_points=3)), "empty space"),
        (dict(space=Random({"optim.peak_lr": uniform(1, 0)}, num_points=3)), "empty range"),
        (dict(space=Random({"optim.peak_lr": log_uniform(0, 1)}, num_points=3)), "low > 0"),
        (dict(space=Random({"optim.peak_lr": uniform(0, 1)}, num_points=0)), "empty space"),
        (dict(named={"a": {}}, seeds=()), "seeds is empty"),
        (dict(named={"a": {}}, mode="lowest"), "mode 'lowest'"),
        (dict(named={"a": {}}, read="last"), "read 'last' must be"),
        (dict(named={"a": {}}, launch=_launch("v7-8")), "unknown topology 'v7-8'"),
        (dict(named={"a": {}}, launch=_launch("v5p-6")), "unknown topology 'v5p-6'"),
        (dict(named={"a": {}}, launch=_launch("h100-8")), "unknown topology 'h100-8'"),
        (dict(named={"a": {"run.seed": 3}}), "through seeds="),
        (dict(named={"a": {}}, seeds=(1, 1)), "repeat a seed"),
    ],
    ids=["nothing", "no-axes", "empty-axis", "empty-choice", "reversed-range", "log-zero",
         "zero-points", "no-seeds", "mode", "read", "topology-gen", "topology-size", "gpu",
         "seed-override", "same-seed-twice"],
)  # fmt: skip
def test_empty_spaces_and_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(SweepError, match=message):
        Sweep("bad", TINY, **kwargs)


def test_topology_names_follow_cloud_tpu():
    assert check_topology("v5p-64") == "v5p"  # 64 TensorCores = 32 chips
    assert check_topology("v5e-4") == "v5e" and check_topology("v4-8") == "v4"
    with pytest.raises(SweepError, match="counts TensorCores"):
        check_topology("v4-3")
    assert plan_mod.slice_chips("v5p-128")[1] == 64
    assert plan_mod.slice_chips("v6e-16")[1] == 16


def test_an_experiments_own_topology_is_checked():
    s = Sweep("t", TINY, named={"a": {"tpu.topology": "v9-8"}})
    with pytest.raises(SweepError, match="unknown topology 'v9-8'"):
        s.validate()


def test_bad_sweep_files_are_one_line_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from qwen_jax.sweep.spec import Sweep, Grid\n"
        "def get_sweep():\n"
        f"    return Sweep('bad', {TINY!r}, space=Grid({{'optim.peak_lrr': [1e-3]}}))\n"
    )
    none = tmp_path / "none.py"
    none.write_text("x = 1\n")
    cases = [
        (["sweep", "plan", str(bad), "--no-compile"], "did you mean optim.peak_lr?"),
        (["sweep", "status", str(bad)], "did you mean optim.peak_lr?"),
        (["sweep", "plan", str(none)], "must define get_sweep"),
        (["sweep", "plan", str(tmp_path / "missing.py")], "no sweep file"),
        (["sweep", "launch", str(bad), "--backend", "gke"], "invalid choice: 'gke'"),
        (["sweep", "collect", str(bad)], "--out"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qwen-jax sweep: error: "), err
        assert message in err[0], (message, err)


# ----------------------------------------------------------------------------- plan


def test_plan_flops_tokens_and_chip_hours_of_the_7b_sweep(capsys):
    path = str(REPO / "experiments/sweeps/qwen_7b_v5p_lr.py")
    assert cli.main(["sweep", "plan", path, "--no-compile", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    sweep = load_sweep(path)
    plans = plan_mod.plan(sweep, compile=False, mfu=0.5)
    assert [p.point.name for p in plans] == [
        "peak_lr=0.00015,seed=0", "peak_lr=0.0003,seed=0", "peak_lr=0.0006,seed=0",
    ]  # fmt: skip
    model = PRESETS["qwen_7b"]
    tokens_per_step = 2048 * 2048
    flops = model.flops_per_token(2048) * tokens_per_step  # 6N + attention, the MFU formula
    for p in plans:
        assert p.topology == "v5p-128" and p.chips == 64 and p.report is None
        assert p.flops_per_step == pytest.approx(flops, rel=1e-12)
        assert p.tokens == 5000 * tokens_per_step
        # 459 TFLOP/s bf16 per v5p chip (one JAX device = one megacore chip).
        assert p.chip_hours == pytest.approx(flops * 5000 / (0.5 * 459e12) / 3600, rel=1e-12)
    row = next(line for line in out.splitlines() if line.startswith("peak_lr=0.0003,"))
    assert f"{flops:.3e}" in row and f"{plans[1].chip_hours:,.1f}" in row
    assert "not compiled" in row
    assert "--config.run.steps=5000" in out  # the shared overrides are shown once
    assert f"total: {3 * plans[0].chip_hours:,.1f} chip-hours at 0.5 MFU" in out


def test_plan_without_a_slice_has_no_chip_hours():
    s = load_sweep(str(REPO / "experiments/sweeps/tiny_lr_warmup.py"))
    plans = plan_mod.plan(s, compile=True)  # nothing to compile for: a local sweep
    assert all(p.topology == "" and p.chip_hours is None and p.report is None for p in plans)
    assert "local" in plan_mod.table(s, plans, 0.4)


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_plan_rejects_a_point_that_does_not_fit_with_its_figure(tmp_path, capsys):
    """A tiny-width model on a v5e-4 slice (16 GiB per chip), parameters replicated: with a
    1024-row vocabulary it fits; with 8M rows (2G parameters, 32 GiB of fp32 state and more
    of Adam's) it cannot, and the compiler's figure is in the rejection."""
    sweep_file = tmp_path / "oom.py"
    sweep_file.write_text(
        "from qwen_jax.sweep.spec import Grid, Launch, Sweep\n"
        "def get_sweep():\n"
        "    return Sweep(\n"
        f"        'oom', {str(REPO / 'experiments/pretrain/tiny.py')!r},\n"
        "        space=Grid({'model.vocab_size': [1024, 8_388_608]}),\n"
        "        fixed={'mesh.data': -1, 'mesh.fsdp': 1, 'data.global_batch': 4,\n"
        "               'data.seq_len': 128},\n"
        "        launch=Launch('v5e-4', 'z', 'v2-alpha-tpuv5-lite', None, 'gs://b/s', None,\n"
        "                      None),\n"
        "    )\n"
    )
    rc = cli.main(["sweep", "plan", str(sweep_file), "--fast"])
    out, err = capsys.readouterr()
    assert rc == 1
    fits = next(line for line in out.splitlines() if line.startswith("vocab_size=1024,"))
    assert re.search(r"\d+\.\d\d / 16 GiB \(2 layers: >=\)\s+yes", fits), fits
    big = next(line for line in out.splitlines() if line.startswith("vocab_size=8388608,"))
    assert " NO " in big
    err = err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("qwen-jax sweep: error: 1 point(s) do not fit: point "
                             "vocab_size=8388608,seed=0 on v5e-4: ")  # fmt: skip
    # The figure: the compiler's "required (NN.NNG) exceeds available HBM (15.75G)", or ours.
    assert re.search(r"\d+(\.\d+)?G\) exceeds|\d+\.\d\d GiB per device", err[0]), err[0]


def test_plan_mfu_must_be_a_fraction(capsys):
    path = str(REPO / "experiments/sweeps/tiny_lr_warmup.py")
    assert cli.main(["sweep", "plan", path, "--no-compile", "--mfu", "40"]) == 2
    assert "--mfu 40.0: must be in (0, 1]" in capsys.readouterr().err
