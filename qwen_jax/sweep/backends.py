"""The launch backends: each point as a fixed sequence of commands of an existing launcher.

Each backend gives `header()` (what a launch uses: slice, zone, image...), `lines(job)` (the
point's commands as shell lines: what --dry-run prints) and `run(job)` (runs those commands,
returns the exit status); `waits` says whether `run` returns only once the point has ended.

  local   on this machine, one point after another, each the subprocess
          `python -m qwen_jax.cli train --config=EXPERIMENT --workdir=ROOT/SWEEP/POINT
          --config.k=v ...` with its output appended to WORKDIR/launch.log. Ctrl-C (or SIGTERM)
          to the launcher stops the running point (it saves a checkpoint after its current
          step) and the launch; nothing else starts.
  tpu-vm  per point, one slice: `gcloud compute tpus queued-resources create`, a wait until the
          queued resource is ACTIVE, `gcloud compute tpus tpu-vm scp` of the experiment file and
          `gcloud compute tpus tpu-vm ssh --worker=all` running the sweep's `launch.setup` and the
          train line on every host (a TPU VM starts jax.distributed by itself), then the queued
          resource is deleted, also after a failure or Ctrl-C. A queued resource left by an
          interrupted launch is reused. Points run one after another.
  xpk     per point `xpk workload create` on the sweep's GKE cluster, in `launch.docker_image`
          (qwen-jax installed, the checkout's experiments/ in its working directory); the launch
          returns once every point is submitted. A point whose workdir is started but unfinished
          has its old workload deleted first (the trainer saves on SIGTERM), then resubmitted.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwen_jax.cli import UsageError

LOG_NAME = "launch.log"  # in each local point's workdir: every attempt's train output
POLL_S = 30.0  # seconds between two looks at a queued resource's state
_QR_DEAD = ("FAILED", "SUSPENDING", "SUSPENDED")


@dataclasses.dataclass(frozen=True)
class Job:
    """One point of the launch: where it runs and what its workdir says (None: not read)."""

    point: object  # spec.Point
    workdir: str
    status: str | None  # collect.point_status: "done" | "running/partial" | "missing"


# ----------------------------------------------------------------------------- shared pieces


def train_argv(experiment: str, workdir: str, overrides: dict, prefix=("qwen-jax",)) -> list:
    """`qwen-jax train --config=EXPERIMENT --workdir=WD --config.k=v ...` as an argv."""
    flags = [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
    return [*prefix, "train", f"--config={experiment}", f"--workdir={workdir}", *flags]


def _flag_value(v) -> str:
    """A value as `--config.k=` parses it back: repr for numbers and tuples (3e-4 -> 0.0003,
    exact), the text itself for strings."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def job_name(sweep, point, limit: int = 40) -> str:
    """A stable cloud name for a point: `[a-z]([-a-z0-9]*[a-z0-9])?`, at most `limit` characters
    (xpk allows 40, queued resources 63): the sweep's name, then 8 hex digits of the point's."""
    digest = hashlib.sha1(f"{sweep.name}/{point.name}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9]+", "-", sweep.name.lower()).strip("-")
    stem = stem if stem[:1].isalpha() else f"s{stem}"
    return f"{stem[: limit - 9].rstrip('-')}-{digest}"


def accelerator_type(topology: str) -> str:
    """Cloud TPU's accelerator type for a topology name: v5e-N is `v5litepod-N`."""
    return re.sub(r"^v5e-", "v5litepod-", topology)


def slice_hosts(topology: str) -> tuple[int, int]:
    """(chips, hosts) of a slice: 4 chips per host, 8 on single-host v5e/v6e slices."""
    from qwen_jax import hardware
    from qwen_jax.sweep.spec import check_topology

    chip = hardware.CHIPS[check_topology(topology)]
    n = int(topology.rsplit("-", 1)[1])
    chips = n // chip.cores_per_chip if chip.slice_counts_cores else n
    single = 4 if chip.slice_counts_cores else 8
    return chips, 1 if chips <= single else chips // 4


def shell(argv: list[str]) -> str:
    """An argv as one shell line; `--flag=value` stays one readable token (`--flag='a b'`)."""
    out = []
    for arg in argv:
        m = re.fullmatch(r"(--[\w.-]+=)(.*)", arg, re.S)
        out.append(m.group(1) + shlex.quote(m.group(2)) if m else shlex.quote(arg))
    return " ".join(out)


def _run(argv: list[str]) -> int:
    """Run one launcher command in the foreground, echoed first (its output is the user's)."""
    print("+ " + shell(argv), flush=True)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, check=False).returncode


def _gcloud_where(launch) -> list[str]:
    project = [f"--project={launch.project}"] if launch.project else []
    return [*project, f"--zone={launch.zone}"]


# ----------------------------------------------------------------------------- backends


class Local:
    """Each point as a `qwen-jax train` subprocess of this Python, one after another."""

    waits = True

    def __init__(self, sweep):
        self.sweep = sweep

    def header(self) -> list[str]:
        return ["# every point runs here, one after another (output: WORKDIR/launch.log)"]

    def argv(self, job: Job) -> list[str]:
        prefix = (sys.executable, "-m", "qwen_jax.cli")
        return train_argv(self.sweep.experiment, job.workdir, job.point.overrides, prefix)

    def lines(self, job: Job) -> list[str]:
        return [shell(self.argv(job))]

    def run(self, job: Job) -> int:
        workdir = Path(job.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        argv = self.argv(job)
        with open(workdir / LOG_NAME, "a") as log:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            if log.tell():  # a killed attempt's last line (a progress bar) has no end
                log.write("\n")
            log.write(f"# launch {stamp}: {shell(argv)}\n")
            log.flush()
            print(f"  log: {workdir / LOG_NAME}", flush=True)
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                return proc.wait()
            except KeyboardInterrupt:
                _stop(proc)
                raise

    def where_logged(self, job: Job) -> str:
        return f"; see {Path(job.workdir) / LOG_NAME}"


def _stop(proc: subprocess.Popen) -> None:
    """Stop the running point and wait while it saves its checkpoint; a second Ctrl-C kills.

    SIGTERM, whether or not a terminal's Ctrl-C reached the point already: the trainer takes
    both as "checkpoint after this step", and before its handler is installed SIGTERM ends the
    process outright, where a SIGINT can be lost (Python drops a KeyboardInterrupt raised
    inside a garbage-collection callback, as happens while JAX is imported)."""
    try:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()


class signals_as_interrupt:
    """SIGTERM and SIGINT to the launcher stop it the way Ctrl-C does (main thread only).

    SIGINT is set explicitly: a process started in the background of a non-interactive shell
    (`qwen-jax sweep launch ... &` in a script) inherits SIGINT ignored, and Python then never
    turns it into KeyboardInterrupt, so `kill -INT` would be lost and every point would run."""

    def __enter__(self):
        self.old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, _raise_interrupt)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


def _raise_interrupt(_signum, _frame):
    raise KeyboardInterrupt


class TpuVm:
    """One TPU VM slice per point through queued resources; the train line over ssh."""

    tool = "gcloud"
    install = "the Google Cloud CLI: https://cloud.google.com/sdk/docs/install"
    waits = True

    def __init__(self, sweep):
        self.sweep, self.launch = sweep, sweep.launch
        if self.launch.num_slices != 1:
            raise UsageError(
                f"--backend=tpu-vm runs one slice per point; launch.num_slices="
                f"{self.launch.num_slices} needs --backend=xpk (multi-slice)"
            )
        m = re.fullmatch(r"(.+\.py)(:.*)?", sweep.experiment)
        path, arg = (m.group(1), m.group(2) or "") if m else (sweep.experiment, "")
        self.experiment = Path(path)
        # Copied to each host's home directory; the train line names it there.
        self.remote_experiment = self.experiment.name + arg

    def header(self) -> list[str]:
        launch = self.launch
        chips, hosts = slice_hosts(launch.topology)
        setup = launch.setup or "none (qwen-jax already installed on the image)"
        return [
            f"# slice {launch.topology} (accelerator type {accelerator_type(launch.topology)}:"
            f" {chips} chips, {hosts} host(s)), zone {launch.zone}, runtime version"
            f" {launch.runtime_version}, project {launch.project or '(gcloud default)'}"
            + (", spot" if launch.spot else ""),
            f"# environment on every host: {setup}",
            "# one slice per point, one point after another; multi-host through"
            " jax.distributed (automatic on a TPU VM)",
        ]

    def where_logged(self, job: Job) -> str:
        return ""  # gcloud's and the hosts' output went to this terminal

    def names(self, job: Job) -> str:
        return job_name(self.sweep, job.point, 63)

    def create(self, name: str) -> list[str]:
        return [
            "gcloud", "compute", "tpus", "queued-resources", "create", name,
            f"--node-id={name}", *_gcloud_where(self.launch),
            f"--accelerator-type={accelerator_type(self.launch.topology)}",
            f"--runtime-version={self.launch.runtime_version}",
            *(["--spot"] if self.launch.spot else []),
        ]  # fmt: skip

    def describe(self, name: str) -> list[str]:
        return [
            "gcloud", "compute", "tpus", "queued-resources", "describe", name,
            *_gcloud_where(self.launch), "--format=value(state.state)",
        ]  # fmt: skip

    def copy(self, name: str) -> list[str]:
        return [
            "gcloud", "compute", "tpus", "tpu-vm", "scp", str(self.experiment),
            f"{name}:{self.experiment.name}", *_gcloud_where(self.launch), "--worker=all",
        ]  # fmt: skip

    def ssh(self, name: str, job: Job) -> list[str]:
        train = train_argv(self.remote_experiment, job.workdir, job.point.overrides)
        steps = [self.launch.setup] if self.launch.setup else []
        # `pip install --user` puts the qwen-jax script in ~/.local/bin, off a non-login PATH.
        steps += ['export PATH="$HOME/.local/bin:$PATH"', shell(train)]
        return [
            "gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *_gcloud_where(self.launch),
            "--worker=all", "--command=set -e; " + "; ".join(steps),
        ]  # fmt: skip

    def delete(self, name: str) -> list[str]:
        return [
            "gcloud", "compute", "tpus", "queued-resources", "delete", name,
            *_gcloud_where(self.launch), "--force", "--quiet",
        ]  # fmt: skip

    def lines(self, job: Job) -> list[str]:
        name = self.names(job)
        state = f'"$({shell(self.describe(name))})"'
        return [
            shell(self.create(name)),
            f"until [ {state} = ACTIVE ]; do sleep {POLL_S:.0f}; done",
            shell(self.copy(name)),
            shell(self.ssh(name, job)),
            shell(self.delete(name)),
        ]

    def run(self, job: Job) -> int:
        name = self.names(job)
        state = self._state(name)
        if state in _QR_DEAD:
            _run(self.delete(name))
            state = None
        try:
            if state is None:
                rc = _run(self.create(name))
                if rc != 0:
                    return rc
            else:
                print(f"  queued resource {name} exists ({state}): reused", flush=True)
            rc = self._wait_active(name)
            if rc == 0:
                rc = _run(self.copy(name))
            if rc == 0:
                rc = _run(self.ssh(name, job))
            return rc
        finally:
            _run(self.delete(name))

    def _state(self, name: str) -> str | None:
        """The queued resource's state, None when there is none (or it cannot be read)."""
        out = subprocess.run(
            self.describe(name), capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        return out.stdout.strip() or None if out.returncode == 0 else None

    def _wait_active(self, name: str) -> int:
        last = None
        while True:
            state = self._state(name)
            if state != last:
                print(f"  queued resource {name}: {state}", flush=True)
                last = state
            if state == "ACTIVE":
                return 0
            if state is None or state in _QR_DEAD:
                return 1
            time.sleep(POLL_S)


class Xpk:
    """One `xpk workload create` per point; xpk and the cluster do the rest."""

    tool = "xpk"
    install = "pip install xpk: https://github.com/AI-Hypercomputer/xpk"
    waits = False

    def __init__(self, sweep):
        self.sweep, self.launch = sweep, sweep.launch
        missing = [k for k in ("cluster", "docker_image") if not getattr(self.launch, k)]
        if missing:
            raise UsageError(
                f"--backend=xpk: sweep {sweep.name!r} sets no launch." + " or launch.".join(missing)
            )

    def header(self) -> list[str]:
        launch = self.launch
        chips, hosts = slice_hosts(launch.topology)
        return [
            f"# cluster {launch.cluster}: {launch.num_slices} x {launch.topology}"
            f" ({chips} chips, {hosts} host(s) per slice), zone {launch.zone}, project"
            f" {launch.project or '(gcloud default)'}",
            f"# image {launch.docker_image} (qwen-jax installed, experiments/ in its workdir)",
            "# unfinished points with a workdir are deleted (`xpk workload delete`) and"
            " resubmitted; they resume from their checkpoints",
        ]

    def where_logged(self, job: Job) -> str:
        return ""

    def create(self, job: Job) -> list[str]:
        launch = self.launch
        train = train_argv(self.sweep.experiment, job.workdir, job.point.overrides)
        return [
            "xpk", "workload", "create", f"--cluster={launch.cluster}",
            f"--workload={job_name(self.sweep, job.point)}",
            f"--tpu-type={accelerator_type(launch.topology)}",
            f"--num-slices={launch.num_slices}", f"--docker-image={launch.docker_image}",
            *_gcloud_where(launch), f"--command={shell(train)}",
        ]  # fmt: skip

    def delete(self, job: Job) -> list[str]:
        return [
            "xpk", "workload", "delete", f"--cluster={self.launch.cluster}",
            f"--workload={job_name(self.sweep, job.point)}", *_gcloud_where(self.launch),
            "--force",
        ]  # fmt: skip

    def lines(self, job: Job) -> list[str]:
        first = [shell(self.delete(job))] if job.status == "running/partial" else []
        return [*first, shell(self.create(job))]

    def run(self, job: Job) -> int:
        if job.status == "running/partial":
            _run(self.delete(job))  # "not found" is fine: only a stale one must go
        return _run(self.create(job))
