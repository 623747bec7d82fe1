"""Metric sinks of the training loop (process 0 only): jsonl, TensorBoard, progress bar; and MFU.

One record per step whatever the crash history: a run resumed at step S logs steps S+1... again
(they ran after the checkpoint it restored), so it first drops the records past S from
metrics.jsonl and tells TensorBoard to purge them (SummaryWriter's purge_step).

Remote workdirs (gs://...). An object store cannot append, and tensorboardX reaches gs:// only
through google-cloud-storage (not a dependency) by re-uploading its whole buffer at each flush.
So metrics.jsonl and the TensorBoard events are written to a local temporary folder exactly as
for a local workdir (metrics.jsonl first seeded from the remote one, trimmed to the start step),
and `sync()` uploads them: at each checkpoint (the loop calls it) and at close. metrics.jsonl
goes up whole, as a temporary object renamed over the old one, so a reader (sweep/collect.py)
sees the previous file or the new one. A run killed between checkpoints loses only records past
its last checkpoint: exactly those a resume drops and logs again. Between syncs the remote
files lag.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from qwen_jax import hardware
from qwen_jax.train.checkpointing import is_remote, workdir_path


@functools.cache
def measured_cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted fp32 n x n matmul on this host's default device (best of `repeats`)."""
    x = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(dtype="bfloat16", device=None) -> float:
    """Peak matmul FLOP/s of one device (default: the first) for MFU, from the hardware table.

    bf16 by default: accelerator runs compute in bf16 (design.md §3). Where the table has no
    published figure (CPU; fp32 on TPU) the peak is measured on the default device instead.
    """
    device = jax.devices()[0] if device is None else device
    try:
        peak = hardware.chip_for_device_kind(device.device_kind).peak_flops(dtype)
    except ValueError:  # a chip not in the table: measured stays measured
        peak = None
    return measured_cpu_matmul_peak() if peak is None else peak


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the records of metrics.jsonl with step <= last_step, rewritten atomically (temp
    file, fsync, os.replace: a kill during the rewrite leaves the old file or the new one).
    A line cut short by a kill mid-write is dropped too (it would glue onto the next record)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _upload(local: Path, remote) -> None:
    """Copy a local file over a remote one: a temporary object, then renamed over it."""
    tmp = remote.with_name(remote.name + ".tmp")
    tmp.write_bytes(local.read_bytes())
    tmp.replace(remote)


class MetricsWriter:
    """Writes scalars to workdir/metrics.jsonl and TensorBoard; shows a tqdm bar. No-op off
    process 0. `start_step`: the step the run starts from; records after it are dropped. A
    remote workdir's files are written locally and uploaded by `sync()` (module docstring)."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tqdm import tqdm

        self.workdir = workdir_path(workdir)
        self.staging = None  # the local folder a remote workdir's files are written in
        local = self.workdir
        if is_remote(self.workdir):
            self.staging = local = Path(tempfile.mkdtemp(prefix="qwen-jax-metrics-"))
            remote = self.workdir / "metrics.jsonl"
            if remote.exists():
                (local / "metrics.jsonl").write_bytes(remote.read_bytes())
        trim_metrics(local / "metrics.jsonl", start_step)
        self.jsonl = open(local / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        from tensorboardX import SummaryWriter

        # Steps are logged from 1: TensorBoard hides the earlier events at steps >= purge_step.
        # Event files are named by second and host: a remote one gets the staging folder's
        # unique name too, or a writer started in the same second would overwrite it.
        suffix = "" if self.staging is None else f".{self.staging.name}"
        self.tb = SummaryWriter(
            str(local / "tensorboard"), purge_step=start_step + 1, filename_suffix=suffix
        )
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()
        shown = {k: f"{v:.4g}" for k, v in clean.items() if k in ("loss", "eval_loss", "lr")}
        self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def sync(self) -> None:
        """Upload a remote workdir's metrics.jsonl and TensorBoard event files (no-op for a
        local workdir: its files are flushed at each write). Each event file is this run's own
        (tensorboardX names them by time and host), so earlier runs' files stay beside them."""
        if not self.enabled or self.staging is None:
            return
        self.tb.flush()
        _upload(self.staging / "metrics.jsonl", self.workdir / "metrics.jsonl")
        events = sorted((self.staging / "tensorboard").glob("events.*"))
        if events:
            (self.workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
        for f in events:
            _upload(f, self.workdir / "tensorboard" / f.name)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()
            if self.staging is not None:
                try:
                    self.sync()
                finally:
                    shutil.rmtree(self.staging, ignore_errors=True)
