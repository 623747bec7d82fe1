"""`qwen-jax sweep launch SWEEP --backend {local,tpu-vm,xpk} [--dry-run] [--root R]`.

Runs a sweep's points through launchers that already exist; there is no scheduler here. A launch
is a loop over the points, each one a fixed sequence of commands of its backend (backends.py):
`local` trains each point here as a `qwen-jax train` subprocess, one after another; `tpu-vm`
creates one slice per point (`gcloud compute tpus queued-resources`), runs the train line on
every host (`gcloud compute tpus tpu-vm ssh --worker=all`) and deletes the slice; `xpk` submits
one `xpk workload create` per point to a GKE cluster.

Idempotent: a point whose workdir is "done" (`collect.point_status`) is skipped; any other one
runs again in the same workdir and the trainer resumes from its last checkpoint. Bayes sweeps
continue with `Sweep.suggest` once a batch is finished (so xpk, which only submits, moves on
one batch per launch). Workdirs are ROOT/SWEEP/POINT; ROOT is --root, else `runs/sweeps`
(local) or the sweep's `launch.gcs_root` (cloud, which must be gs://).

--dry-run prints the commands as a shell script (topology, zone, runtime version, environment or
image, each point's workdir and train line) and needs neither gcloud nor xpk; without it a
missing tool, a root that is not writable (local) or not gs:// (cloud) is one error line before
anything runs. On gs:// roots a dry run does not read the points' status (all are listed).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from qwen_jax.cli import UsageError
from qwen_jax.sweep.backends import Job, Local, TpuVm, Xpk, signals_as_interrupt

BACKENDS = ("local", "tpu-vm", "xpk")
LOCAL_ROOT = "runs/sweeps"


def main_launch(sweep, args) -> int:
    """Launch `sweep` (args: backend, dry_run, root); 0 when every point ran or was submitted."""
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {args.backend!r}")
    root = _root(sweep, args.backend, args.root)
    backend = _backend(sweep, args.backend, root, args.dry_run)
    read_status = args.backend == "local" or not args.dry_run
    points = sweep.points()  # validated by the caller (`qwen-jax sweep` validates every verb)

    print(f"# sweep {sweep.name}: backend {args.backend}, workdirs under {root}/{sweep.name}")
    for line in backend.header():
        print(line)
    failed, seen, index = [], [], 0
    while points:
        jobs = [_job(sweep, root, p, read_status) for p in points]
        seen += jobs
        for job in jobs:
            index += 1
            label = f"[{index}] {job.point.name}"
            if job.status == "done":
                print(f"# {label}: done, skipped ({job.workdir})")
                continue
            if args.dry_run:
                print(f"\n# {label} -> {job.workdir}")
                print("\n".join(backend.lines(job)))
                continue
            rc = _run_job(backend, job, label)
            if rc != 0:
                failed.append(job.point.name)
        points = _next_batch(sweep, seen, read_status)
    if args.dry_run:
        return 0
    if failed:
        print(f"# {len(failed)} point(s) failed: {', '.join(failed)}; launch again to resume them")
        return 1
    return 0


def _run_job(backend, job: Job, label: str) -> int:
    state = "resuming" if job.status == "running/partial" else "starting"
    print(f"# {label}: {state} -> {job.workdir}", flush=True)
    start = time.monotonic()
    try:
        with signals_as_interrupt():
            rc = backend.run(job)
    except KeyboardInterrupt:
        print(f"# {label}: interrupted; launch again to resume it", flush=True)
        raise
    took = f"{time.monotonic() - start:.1f} s"
    if rc != 0:
        print(f"# {label}: failed (exit {rc}){backend.where_logged(job)}", flush=True)
        return rc
    if not backend.waits:
        print(f"# {label}: submitted in {took}", flush=True)
        return 0
    from qwen_jax.sweep.collect import DONE, point_status

    status = point_status(job.workdir)
    if status != DONE:  # e.g. preempted: the trainer saved and exited 0 before its last step
        print(f"# {label}: ended {status} after {took}{backend.where_logged(job)}", flush=True)
        return 1
    print(f"# {label}: done in {took}", flush=True)
    return 0


def _job(sweep, root: str, point, read_status: bool) -> Job:
    from qwen_jax.sweep.collect import point_status

    workdir = sweep.workdir(root, point)
    return Job(point, workdir, point_status(workdir) if read_status else None)


def _next_batch(sweep, seen: list[Job], can_read: bool) -> list:
    """Bayes: the next points suggested from every launched point's metric, once all of them
    are done (re-read now); [] otherwise, and for the other spaces."""
    from qwen_jax.sweep.spec import Bayes

    if not isinstance(sweep.space, Bayes) or not can_read:
        return []
    from qwen_jax.sweep.collect import DONE, metric_value, point_status, read_metrics

    if any(point_status(j.workdir) != DONE for j in seen):
        return []
    results = []
    for j in seen:
        value, _ = metric_value(read_metrics(j.workdir), sweep.metric, sweep.mode, sweep.read)
        results.append((j.point, math.nan if value is None else value))
    known = {j.point.name for j in seen}
    return [p for p in sweep.suggest(results) if p.name not in known]


# ----------------------------------------------------------------------------- checks


def _root(sweep, backend: str, root: str | None) -> str:
    """The workdir root, checked: local and writable, or gs:// for the cloud backends."""
    if backend == "local":
        root = root or LOCAL_ROOT
        if root.startswith("gs://"):
            raise UsageError(
                f"--backend=local trains here: --root must be a local path, not {root}"
            )
        from qwen_jax.train.checkpointing import WorkdirError
        from qwen_jax.train.loop import check_workdir

        try:
            check_workdir(Path(root) / sweep.name)
        except WorkdirError as e:
            raise UsageError(f"sweep root {root} cannot hold the workdirs: {e}") from None
        return root.rstrip("/")
    if sweep.launch is None:
        raise UsageError(
            f"--backend={backend}: sweep {sweep.name!r} has no launch settings (Sweep.launch)"
        )
    root = root or sweep.launch.gcs_root
    if not (root or "").startswith("gs://"):
        raise UsageError(
            f"--backend={backend}: the workdir root must be gs://BUCKET/... (every host writes"
            f" there), got {root!r}"
        )
    return root.rstrip("/")


def _backend(sweep, name: str, root: str, dry_run: bool):
    if name == "local":
        return Local(sweep)
    backend = TpuVm(sweep) if name == "tpu-vm" else Xpk(sweep)
    if not dry_run and shutil.which(backend.tool) is None:
        raise UsageError(
            f"--backend={name} needs `{backend.tool}` on PATH and it is not there"
            f" ({backend.install}); --dry-run prints the commands without it"
        )
    return backend
