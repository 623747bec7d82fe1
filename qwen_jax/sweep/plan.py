"""`qwen-jax sweep plan`: every point's cost and fit, before anything is launched.

Per point: its full TrainConfig (validated), the slice it runs on (the sweep's launch topology,
else the experiment's `tpu.topology`; none for a local sweep), and

- HBM per device and fit: the train step compiled ahead of time for the slice
  (`qwen_jax.train.aot.compile_for_topology`: the TPU compiler's memory analysis on this CPU
  host). Points that compile to the same program (they differ only in optimizer values, steps
  or seeds) are compiled once. `fast=True` compiles at the O0 level with the layer scan capped
  at FAST_LAYERS layers (minutes -> seconds for a 7B): a lower bound on memory, so a point
  rejected fast is rejected at full depth, while one that fits fast may still not fit (the
  default, full depth at the default level, decides);
- FLOPs per step, analytical: `QwenConfig.flops_per_token(seq_len)` x tokens per step (6N +
  causal attention, the formula MFU uses);
- tokens (steps x batch x sequence) and chip-hours at a stated MFU:
  FLOPs per step x steps / (MFU x peak bf16 FLOP/s per chip, qwen_jax.hardware) / 3600.

A Bayes sweep plans its first batch (later batches vary the same keys over the same ranges).
A point that does not fit is rejected with its figures: `plan` raises SweepError (exit 1) after
printing the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from qwen_jax import hardware
from qwen_jax.sweep.spec import Point, Sweep, SweepError, check_topology, format_value

FAST_LAYERS = 2
GIB = hardware.GIB


@dataclasses.dataclass
class PointPlan:
    point: Point
    topology: str  # "" = local (no slice)
    chips: int
    flops_per_step: float  # all devices together
    tokens: int  # over the whole run
    chip_hours: float | None  # None without a slice (no published peak)
    report: Any = None  # CompileReport, or None when not compiled
    layers_compiled: int | None = None  # FAST_LAYERS under fast=True

    @property
    def fits(self) -> bool | None:
        return None if self.report is None else self.report.fits

    def hbm(self) -> str:
        r = self.report
        if r is None:
            return "not compiled"
        if r.error:
            return "out of HBM" if "RESOURCE_EXHAUSTED" in r.error else "compile failed"
        cap = "" if self.layers_compiled is None else f" ({self.layers_compiled} layers: >=)"
        return f"{r.peak_bytes / GIB:.2f} / {r.hbm_per_device / GIB:.0f} GiB{cap}"

    def rejection(self) -> str:
        r = self.report
        where = f"point {self.point.name} on {self.topology}"
        if r.error:
            return f"{where}: {r.error}"
        depth = "" if self.layers_compiled is None else f" with {self.layers_compiled} layers"
        return (
            f"{where}: needs {r.peak_bytes / GIB:.2f} GiB per device{depth} > "
            f"{r.hbm_per_device / GIB:.0f} GiB HBM (args {r.argument_bytes / GIB:.2f}, temp"
            f" {r.temp_bytes / GIB:.2f}, out {r.output_bytes / GIB:.2f},"
            f" aliased {r.alias_bytes / GIB:.2f})"
        )


def slice_chips(topology: str) -> tuple[hardware.Chip, int]:
    """(chip row, chips) of a Cloud TPU slice name ("v5p-64" -> v5p, 32 chips)."""
    chip = hardware.CHIPS[check_topology(topology)]
    n = int(topology.rsplit("-", 1)[1])
    return chip, (n // chip.cores_per_chip if chip.slice_counts_cores else n)


def plan(
    sweep: Sweep,
    *,
    compile: bool = True,
    fast: bool = False,
    mfu: float = 0.4,
    validated: Sequence[tuple[Point, Any]] | None = None,
) -> list[PointPlan]:
    """The plan of every point (module docstring); SweepError for invalid points. `validated`:
    `sweep.validate()`'s result when the caller has it already."""
    if not 0 < mfu <= 1:
        raise SweepError(f"--mfu {mfu}: must be in (0, 1]")
    out = []
    compiled: dict[str, Any] = {}
    for point, cfg in sweep.validate() if validated is None else validated:
        topology = sweep.launch.topology if sweep.launch else cfg.tpu.topology
        model = cfg.model_config()
        tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        flops = model.flops_per_token(cfg.data.seq_len) * tokens_per_step
        pp = PointPlan(point, topology, 0, flops, cfg.run.steps * tokens_per_step, None)
        if topology:
            chip, pp.chips = slice_chips(topology)
            peak_per_chip = chip.peak_bf16_flops * chip.devices_per_chip
            pp.chip_hours = flops * cfg.run.steps / (mfu * peak_per_chip) / 3600
            if compile:
                pp.report, pp.layers_compiled = _compile(cfg, topology, fast, compiled)
        out.append(pp)
    return out


def _compile(cfg, topology: str, fast: bool, cache: dict):
    """The CompileReport of the point's train step (cached by what shapes the program)."""
    from qwen_jax.train.aot import compile_for_topology

    layers = None
    if fast:
        model = dict(cfg.model_overrides)
        full = cfg.model_config().num_layers
        if full > FAST_LAYERS:
            layers = FAST_LAYERS
            model["num_layers"] = layers
            cfg = dataclasses.replace(cfg, model_overrides=tuple(sorted(model.items())))
    key = repr(
        (cfg.model_config(), cfg.data.seq_len, cfg.data.global_batch, cfg.step, cfg.objective,
         cfg.mesh, cfg.init_from != "", topology, fast)
    )  # fmt: skip
    if key not in cache:
        try:
            cache[key] = compile_for_topology(cfg, topology, fast=fast)
        except ValueError as e:  # the mesh does not divide the slice, an unsupported size
            raise SweepError(f"{topology}: {e}") from None
    return cache[key], layers


def table(sweep: Sweep, plans: Sequence[PointPlan], mfu: float) -> str:
    """The plan as a fixed-width text table, with the sweep's shared overrides above it."""
    fixed = " ".join(f"--config.{k}={format_value(v)}" for k, v in sweep.fixed.items())
    lines = [
        f"sweep {sweep.name}: {sweep.experiment}, {len(plans)} points;"
        f" metric {sweep.metric} ({sweep.mode}, {sweep.read})",
        f"every point: {fixed or '(no shared overrides)'}",
        "",
    ]
    head = ["point", "topology", "HBM/device", "fits", "FLOPs/step", "tokens",
            f"chip-hours@{mfu:g}MFU", "hours"]  # fmt: skip
    rows = [head]
    for p in plans:
        rows.append([
            p.point.name,
            p.topology or "local",
            p.hbm(),
            "-" if p.fits is None else ("yes" if p.fits else "NO"),
            f"{p.flops_per_step:.3e}",
            f"{p.tokens:.3e}",
            _hours(p.chip_hours),
            _hours(None if p.chip_hours is None else p.chip_hours / p.chips),
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = sum(p.chip_hours or 0.0 for p in plans)
    if total:
        lines.append(f"\ntotal: {_hours(total)} chip-hours at {mfu:g} MFU")
    return "\n".join(lines)


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def check_fit(plans: Sequence[PointPlan]) -> None:
    """SweepError naming each point that does not fit, with its figures."""
    bad = [p for p in plans if p.fits is False]
    if bad:
        raise SweepError(
            f"{len(bad)} point(s) do not fit: " + "; ".join(p.rejection() for p in bad)
        )
