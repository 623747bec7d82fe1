"""Sweep files: a base experiment, a search space over its config fields, the metric to optimise.

A sweep file (experiments/sweeps/*.py) exposes `get_sweep() -> Sweep`:

    Sweep(
        name="tiny_lr_warmup",
        experiment="experiments/pretrain/tiny.py:runlocal",
        space=Grid({"optim.peak_lr": [1e-3, 3e-3], "optim.warmup_steps": [2, 5]}),
        fixed={"run.steps": 10},          # applied to every point, not swept
        seeds=(0,),                        # each point repeated over run.seed
        metric="loss", mode="min", read="final",
    )

Spaces: `Grid` (cartesian product, in the order given), `Random` (`num_points` draws from
`uniform` / `log_uniform` / `int_uniform` / `choice`, seeded), `Bayes` (Optuna's TPE, seeded,
ask/tell: `Sweep.points()` is the first batch, `Sweep.suggest(results, n)` the next from the
finished points' metrics), or none; `named` points (name -> overrides) come on top of the space.

A point's overrides are dotted keys of the experiment's ConfigDict ("optim.peak_lr"), exactly the
`--config.optim.peak_lr=...` flags of its `qwen-jax train` line; "run.seed" is always among them.
Sampled floats are rounded to 4 significant digits, so a point's name shows its values exactly
and the same point is drawn again on every call (the launch is idempotent by name).

`Sweep.validate()` checks everything before anything runs: unknown config keys (named, with the
closest valid key), values of the wrong type, an empty space, an unknown topology, every point's
full TrainConfig (`TrainConfig.from_config_dict`). Its errors are `SweepError` (a ValueError:
`qwen-jax sweep` prints one line).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qwen_jax import hardware

MODES = ("min", "max")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")  # what a point name's value may hold (else "_")


class SweepError(ValueError):
    """A sweep file that cannot run: the message names the sweep, point or key."""


# ----------------------------------------------------------------------------- distributions


@dataclasses.dataclass(frozen=True)
class Dist:
    """One axis of a random / Bayesian space. kind: "uniform" | "log_uniform" | "int_uniform" |
    "choice"; low/high are inclusive bounds; `values` the choices."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    def sample(self, rng: random.Random):
        if self.kind == "choice":
            return self.values[rng.randrange(len(self.values))]
        if self.kind == "int_uniform":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "log_uniform":
            x = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            x = rng.uniform(self.low, self.high)
        return self.clip(x)

    def clip(self, x: float) -> float:
        """`x` rounded to 4 significant digits, kept inside [low, high]."""
        return min(max(round_sig(x), self.low), self.high)

    def check(self, where: str) -> None:
        if self.kind == "choice":
            if not self.values:
                raise SweepError(f"{where}: choice() of nothing (empty space)")
            return
        if self.kind not in ("uniform", "log_uniform", "int_uniform"):
            raise SweepError(f"{where}: unknown distribution {self.kind!r}")
        if not self.low <= self.high:
            raise SweepError(f"{where}: empty range [{self.low}, {self.high}]")
        if self.kind == "log_uniform" and self.low <= 0:
            raise SweepError(f"{where}: log_uniform needs low > 0, got {self.low}")

    def examples(self) -> tuple:
        """Values that show the axis's type (what type checks run on)."""
        if self.kind == "choice":
            return self.values
        if self.kind == "int_uniform":
            return (int(self.low), int(self.high))
        return (float(self.low), float(self.high))


def uniform(low: float, high: float) -> Dist:
    return Dist("uniform", float(low), float(high))


def log_uniform(low: float, high: float) -> Dist:
    return Dist("log_uniform", float(low), float(high))


def int_uniform(low: int, high: int) -> Dist:
    return Dist("int_uniform", int(low), int(high))


def choice(*values) -> Dist:
    return Dist("choice", values=tuple(values))


def round_sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (what a point's name shows)."""
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------- spaces


@dataclasses.dataclass(frozen=True)
class Grid:
    """Every combination of the axes' values (key -> list of values), first key outermost."""

    axes: Mapping[str, Sequence]


@dataclasses.dataclass(frozen=True)
class Random:
    """`num_points` independent draws from the axes' distributions, seeded."""

    axes: Mapping[str, Dist]
    num_points: int
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Bayes:
    """Optuna TPE (the pinned `sweep` extra), seeded. `batch` points per round (the first round
    is TPE's random start-up); `num_points` the budget over all rounds."""

    axes: Mapping[str, Dist]
    num_points: int
    batch: int = 4
    seed: int = 0


# ----------------------------------------------------------------------------- points, launch


@dataclasses.dataclass(frozen=True)
class Point:
    """One training run of the sweep: its workdir is ROOT/SWEEP/NAME, its train line
    `qwen-jax train --config=EXPERIMENT --workdir=... --config.KEY=VALUE` per override."""

    name: str  # stable, filesystem-safe: "peak_lr=0.003,warmup_steps=5,seed=0"
    overrides: dict  # dotted config key -> value, "run.seed" included
    seed: int


@dataclasses.dataclass(frozen=True)
class Launch:
    """Cloud settings of the sweep's points (one slice per point)."""

    topology: str  # Cloud TPU name, e.g. "v5p-64" (validated against qwen_jax.hardware)
    zone: str
    runtime_version: str  # TPU VM software version, e.g. "v2-alpha-tpuv5"
    project: str | None
    gcs_root: str  # "gs://bucket/sweeps": points run in {gcs_root}/{sweep}/{point}
    cluster: str | None  # xpk: the GKE cluster
    docker_image: str | None  # xpk: the image holding qwen-jax
    num_slices: int = 1
    setup: str = ""  # tpu-vm: shell run on every worker before training (install qwen-jax)
    spot: bool = False  # tpu-vm: spot capacity


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep file's content (module docstring); checked for shape at construction, against
    the experiment's config by `validate()`."""

    name: str
    experiment: str  # "experiments/pretrain/tiny.py" (optionally ":arg")
    metric: str = "loss"  # a key of metrics.jsonl records: "loss", "eval_loss", ...
    mode: str = "min"  # "min" | "max"
    read: str = "final"  # "final" | "best" | "step:N"
    launch: Launch | None = None
    space: Grid | Random | Bayes | None = None
    named: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = f"sweep {self.name!r}"
        if not self.name or _SAFE.sub("_", self.name) != self.name:
            raise SweepError(f"{where}: name must be non-empty and use only [A-Za-z0-9._+-]")
        if self.mode not in MODES:
            raise SweepError(f"{where}: mode {self.mode!r} must be one of {MODES}")
        read_step(self.read, where)
        if not self.seeds:
            raise SweepError(f"{where}: seeds is empty (give at least one run.seed)")
        if len(set(self.seeds)) != len(self.seeds):
            raise SweepError(f"{where}: seeds {self.seeds} repeat a seed")
        if self.space is None and not self.named:
            raise SweepError(f"{where}: empty space (no space and no named points)")
        if isinstance(self.space, Grid):
            if not self.space.axes:
                raise SweepError(f"{where}: empty space (Grid with no axes)")
            for key, values in self.space.axes.items():
                if isinstance(values, str) or not len(values):
                    raise SweepError(f"{where}: empty space (axis {key} has no values)")
        elif isinstance(self.space, Random | Bayes):
            if not self.space.axes or self.space.num_points < 1:
                raise SweepError(f"{where}: empty space (no axes or num_points < 1)")
            for key, dist in self.space.axes.items():
                dist.check(f"{where}: axis {key}")
            if isinstance(self.space, Bayes) and self.space.batch < 1:
                raise SweepError(f"{where}: Bayes batch must be >= 1")
        elif self.space is not None:
            raise SweepError(f"{where}: space must be Grid, Random, Bayes or None")
        if self.launch is not None:
            check_topology(self.launch.topology)
            if self.launch.num_slices < 1:
                raise SweepError(f"{where}: launch.num_slices must be >= 1")
        if "run.seed" in (*self.fixed, *self.swept_keys):
            raise SweepError(f"{where}: set run.seed through seeds=(...), not as an override")

    # ------------------------------------------------------------------ expansion

    @property
    def swept_keys(self) -> tuple[str, ...]:
        """The config keys the space varies (the named points' keys too), in order."""
        keys = list(self.space.axes) if self.space is not None else []
        for overrides in self.named.values():
            keys += [k for k in overrides if k not in keys]
        return tuple(keys)

    def points(self) -> list[Point]:
        """The points to run now: the space's (Grid: all; Random: all `num_points` draws; Bayes:
        the first batch) then the named ones, each repeated over `seeds`."""
        if isinstance(self.space, Grid):
            keys = list(self.space.axes)
            combos = [
                dict(zip(keys, values, strict=True))
                for values in itertools.product(*self.space.axes.values())
            ]
        elif isinstance(self.space, Random):
            rng = random.Random(self.space.seed)
            combos = [
                {k: d.sample(rng) for k, d in self.space.axes.items()}
                for _ in range(self.space.num_points)
            ]
        elif isinstance(self.space, Bayes):
            combos = self._ask([], min(self.space.batch, self.space.num_points))
        else:
            combos = []
        out = [self._point(None, combo, seed) for combo in combos for seed in self.seeds]
        out += [
            self._point(label, dict(overrides), seed)
            for label, overrides in self.named.items()
            for seed in self.seeds
        ]
        _check_unique(self.name, out)
        return out

    def suggest(self, results: Sequence[tuple[Point, float]], n: int | None = None) -> list[Point]:
        """Bayes: the next `n` (default: the batch) points from the finished points' metric
        values; the seeds of one configuration are averaged. Deterministic given the results.
        Fewer (or none) once the `num_points` budget is spent."""
        if not isinstance(self.space, Bayes):
            raise SweepError(f"sweep {self.name!r}: suggest() needs a Bayes space")
        keys = list(self.space.axes)
        by_config: dict[tuple, list[float]] = {}
        for point, value in results:
            if all(k in point.overrides for k in keys):
                config = tuple(point.overrides[k] for k in keys)
                by_config.setdefault(config, []).extend([value] if math.isfinite(value) else [])
        # A configuration without a finite value (diverged, metric never logged) counts against
        # the budget but tells TPE nothing.
        told = [
            (dict(zip(keys, c, strict=True)), sum(v) / len(v)) for c, v in by_config.items() if v
        ]
        n = self.space.batch if n is None else n
        n = max(0, min(n, self.space.num_points - len(by_config)))
        combos = self._ask(told, n)
        out = [self._point(None, combo, seed) for combo in combos for seed in self.seeds]
        _check_unique(self.name, out)
        return out

    def _ask(self, told: list[tuple[dict, float]], n: int) -> list[dict]:
        """Replay `told` (config, value) into a fresh seeded study and ask `n` configurations.
        The sampler's seed moves with the history size, so rounds do not repeat the start-up
        draws; TPE proper starts once the first batch is told."""
        try:
            import optuna
        except ImportError:
            raise SweepError("Bayes sweeps need Optuna: pip install 'qwen-jax[sweep]'") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = self.space
        dists = {k: _optuna_dist(optuna, d) for k, d in space.axes.items()}
        sampler = optuna.samplers.TPESampler(
            seed=space.seed + 7919 * len(told), n_startup_trials=space.batch, constant_liar=True
        )
        study = optuna.create_study(direction=f"{self.mode}imize", sampler=sampler)
        for params, value in told:
            try:
                trial = optuna.trial.create_trial(params=params, distributions=dists, value=value)
            except ValueError:  # a result outside the current space (the file changed): unused
                continue
            study.add_trial(trial)
        out = []
        for _ in range(n):
            # Asked trials stay pending: the constant liar spreads one batch over the space.
            trial = study.ask(dists)
            out.append(
                {k: space.axes[k].clip(v) if isinstance(v, float) else v
                 for k, v in trial.params.items()}
            )  # fmt: skip
        return out

    def _point(self, label: str | None, combo: dict, seed: int) -> Point:
        overrides = {**self.fixed, **combo, "run.seed": seed}
        if label is not None:
            name = f"{_safe(label)},seed={seed}"
        else:
            labels = short_labels(list(combo))
            name = ",".join(f"{labels[k]}={_safe(format_value(v))}" for k, v in combo.items())
            name += f",seed={seed}"
        return Point(name=name, overrides=overrides, seed=seed)

    def workdir(self, root: str, point: Point) -> str:
        return f"{root.rstrip('/')}/{self.name}/{point.name}"

    # ------------------------------------------------------------------ validation

    def validate(self, points: Sequence[Point] | None = None) -> list[tuple[Point, Any]]:
        """Each point with its full TrainConfig; SweepError naming the first bad key, value or
        point. Keys and types are checked over the whole space (every grid value, every choice,
        both bounds of a range), not only the points drawn."""
        from qwen_jax.train.config import TrainConfig, config_keys, load_experiment

        where = f"sweep {self.name!r}"
        base = _load(load_experiment, self.experiment, where)
        known = set(config_keys(base))
        keys = [*self.fixed, *self.swept_keys, "run.seed"]
        for key in keys:
            if key not in known:
                from qwen_jax.train.config import unknown_key_message

                raise SweepError(f"{where}: {unknown_key_message(key, sorted(known))}")
        for key, values in self._all_values().items():
            for value in values:
                c = _load(load_experiment, self.experiment, where)
                _set(c, key, value, where)
        out = []
        for point in self.points() if points is None else points:
            c = _load(load_experiment, self.experiment, where)
            for key, value in point.overrides.items():
                _set(c, key, value, f"{where}, point {point.name}")
            try:
                out.append((point, TrainConfig.from_config_dict(c)))
            except ValueError as e:
                raise SweepError(f"{where}, point {point.name}: {e}") from None
        topology = self.launch.topology if self.launch else None
        for _, cfg in out:
            if not topology and cfg.tpu.topology:
                check_topology(cfg.tpu.topology)
        return out

    def _all_values(self) -> dict[str, list]:
        vals: dict[str, list] = {k: [v] for k, v in self.fixed.items()}
        if isinstance(self.space, Grid):
            for k, v in self.space.axes.items():
                vals.setdefault(k, []).extend(v)
        elif self.space is not None:
            for k, d in self.space.axes.items():
                vals.setdefault(k, []).extend(d.examples())
        for overrides in self.named.values():
            for k, v in overrides.items():
                vals.setdefault(k, []).append(v)
        vals["run.seed"] = list(self.seeds)
        return vals


# ----------------------------------------------------------------------------- helpers


def read_step(read: str, where: str = "sweep") -> int | None:
    """The step of `read="step:N"` (None for "final" / "best"); SweepError otherwise."""
    if read in ("final", "best"):
        return None
    m = re.fullmatch(r"step:(\d+)", read)
    if not m:
        raise SweepError(f"{where}: read {read!r} must be 'final', 'best' or 'step:N'")
    return int(m.group(1))


def check_topology(name: str) -> str:
    """The chip generation of a Cloud TPU slice name ("v5p-64" -> "v5p"); SweepError unless the
    generation is in qwen_jax.hardware and the count is a whole power-of-two number of chips
    (what `qwen_jax.train.aot.topology_devices` can describe; the compile checks the rest)."""
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name or "")
    chip = hardware.CHIPS.get(m.group(1)) if m else None
    if chip is None or chip.platform != "tpu":
        raise SweepError(
            f"unknown topology {name!r}; expected one of "
            + ", ".join(f"{c}-N" for c in hardware.TPU_CHIPS)
        )
    n = int(m.group(2))
    per_chip = chip.cores_per_chip if chip.slice_counts_cores else 1
    chips = n // per_chip
    if n % per_chip or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if chip.slice_counts_cores else "chips"
        raise SweepError(
            f"unknown topology {name!r}: {chip.name}-N counts {unit}; N must give a power of"
            " two number of chips"
        )
    return chip.name


def short_labels(keys: Sequence[str]) -> dict[str, str]:
    """A point name's label per key: its last component, or the full key where two collide."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def format_value(v) -> str:
    """How a value appears in a point name: floats to 4 significant digits, others as str."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple | list):
        return "-".join(format_value(x) for x in v)
    return str(v)


def _safe(text: str) -> str:
    return _SAFE.sub("_", text)


def _check_unique(sweep: str, points: list[Point]) -> None:
    seen = set()
    for p in points:
        if p.name in seen:
            raise SweepError(f"sweep {sweep!r}: two points share the name {p.name!r}")
        seen.add(p.name)


def _load(load_experiment, experiment: str, where: str):
    try:
        return load_experiment(experiment)
    except FileNotFoundError:
        raise SweepError(f"{where}: no experiment file {experiment!r}") from None


def _set(c, key: str, value, where: str) -> None:
    """c[key] = value through ConfigDict's type-checked assignment."""
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
        node = node[part]
    try:
        setattr(node, leaf, value)
    except (TypeError, ValueError) as e:
        want = type(node[leaf]).__name__ if node[leaf] is not None else "its declared type"
        raise SweepError(
            f"{where}: config key {key}={value!r}: wrong type {type(value).__name__}"
            f" (expected {want})"
        ) from e


def _optuna_dist(optuna, d: Dist):
    if d.kind == "choice":
        return optuna.distributions.CategoricalDistribution(d.values)
    if d.kind == "int_uniform":
        return optuna.distributions.IntDistribution(int(d.low), int(d.high))
    return optuna.distributions.FloatDistribution(d.low, d.high, log=d.kind == "log_uniform")


def load_sweep(path: str) -> Sweep:
    """The Sweep of a sweep file (experiments/sweeps/*.py exposing `get_sweep()`)."""
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    if spec is None or spec.loader is None or not path.endswith(".py"):
        raise SweepError(f"no sweep file at {path!r} (a .py file exposing get_sweep())")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        raise SweepError(f"no sweep file at {path!r}") from None
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"{path}: a sweep file must define get_sweep() -> Sweep")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep")
    return sweep
