"""`qwen-jax sweep`: plan, launch, watch and collect a sweep file's points.

qwen-jax sweep plan SWEEP [--no-compile] [--fast] [--mfu 0.4]
qwen-jax sweep launch SWEEP [--backend {local,tpu-vm,xpk}] [--dry-run] [--root DIR_OR_GS]
qwen-jax sweep status SWEEP [--root DIR_OR_GS]
qwen-jax sweep collect SWEEP --out DIR [--root DIR_OR_GS]

SWEEP is a sweep file (experiments/sweeps/*.py). Points run in ROOT/SWEEP_NAME/POINT_NAME; ROOT
defaults to the sweep's launch.gcs_root for the cloud backends and for status/collect of a sweep
with launch settings, else runs/sweeps. Every verb validates the whole sweep first (config keys,
types, every point's TrainConfig, the topology) and reports one line on bad input.
"""

from __future__ import annotations

import argparse

from qwen_jax.cli import UsageError

LOCAL_ROOT = "runs/sweeps"
BACKENDS = ("local", "tpu-vm", "xpk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen-jax sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="{plan,launch,status,collect}")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        a = sub.add_parser(name, help=help_, prog=f"qwen-jax sweep {name}")
        a.add_argument("sweep", help="sweep file, experiments/sweeps/NAME.py")
        return a

    a = add("plan", "points, HBM fit, FLOPs, tokens and chip-hours; rejects what does not fit")
    a.add_argument("--no-compile", action="store_true", help="skip the AOT compile (no HBM fit)")
    a.add_argument(
        "--fast", action="store_true", help="compile at O0 with 2 layers: a lower bound on HBM"
    )
    a.add_argument("--mfu", type=float, default=0.4, help="MFU for chip-hours (default 0.4)")
    a = add("launch", "run the points (skips finished ones, resumes interrupted ones)")
    a.add_argument("--backend", choices=BACKENDS, default="local", help="default: local")
    a.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a.add_argument("--root", help="workdir root, local dir or gs://bucket/path")
    a = add("status", "done / partial (last step) / missing per point")
    a.add_argument("--root", help="workdir root, local dir or gs://bucket/path")
    a = add("collect", "results table (CSV, markdown) and PNG plots")
    a.add_argument("--root", help="workdir root, local dir or gs://bucket/path")
    a.add_argument("--out", required=True, help="local directory for the table and plots")
    return p


def default_root(sweep, backend: str | None) -> str:
    """Where points run when --root is not given (module docstring)."""
    if sweep.launch is not None and backend != "local":
        return sweep.launch.gcs_root
    return LOCAL_ROOT


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from qwen_jax.sweep.spec import SweepError, load_sweep

    try:
        sweep = load_sweep(args.sweep)
        # Everything checked before anything runs; status/collect read points, build none.
        validated = sweep.validate(None if args.action in ("plan", "launch") else [])
    except SweepError as e:
        raise UsageError(str(e)) from None
    if hasattr(args, "root"):
        args.root = (args.root or default_root(sweep, getattr(args, "backend", None))).rstrip("/")
    actions = {"plan": _plan, "launch": _launch, "status": _status, "collect": _collect}
    return actions[args.action](sweep, args, validated)


def _plan(sweep, args, validated) -> int:
    from qwen_jax.sweep.plan import check_fit, plan, table

    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu {args.mfu}: must be in (0, 1]")
    plans = plan(
        sweep, compile=not args.no_compile, fast=args.fast, mfu=args.mfu, validated=validated
    )
    print(table(sweep, plans, args.mfu), flush=True)
    check_fit(plans)
    return 0


def _launch(sweep, args, validated) -> int:
    from qwen_jax.sweep.launch import main_launch

    return int(main_launch(sweep, args) or 0)


def _status(sweep, args, validated) -> int:
    from qwen_jax.sweep.collect import DONE, results

    rows = results(sweep, args.root)
    rows.sort(key=lambda r: r["point"])
    width = max([len("point"), *(len(r["point"]) for r in rows)])
    print(f"sweep {sweep.name}: {len(rows)} points under {args.root}/{sweep.name}")
    print(f"{'point'.ljust(width)}  {'status':<15}  {'last step':>9}  {sweep.metric}")
    for r in rows:
        step = "-" if r["last_step"] is None else str(r["last_step"])
        value = "-" if r[sweep.metric] is None else f"{r[sweep.metric]:.6g}"
        print(f"{r['point'].ljust(width)}  {r['status']:<15}  {step:>9}  {value}")
    done = sum(r["status"] == DONE for r in rows)
    print(f"{done}/{len(rows)} done")
    return 0


def _collect(sweep, args, validated) -> int:
    from qwen_jax.sweep.collect import collect

    for path in collect(sweep, args.root, args.out):
        print(path)
    return 0
