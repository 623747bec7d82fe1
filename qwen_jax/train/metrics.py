"""Metric sinks of the training loop (process 0 only): jsonl, TensorBoard, progress bar; and MFU.

One record per step whatever the crash history: a run resumed at step S logs steps S+1... again
(they ran after the checkpoint it restored), so it first drops the records past S from
metrics.jsonl and tells TensorBoard to purge them (SummaryWriter's purge_step).
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from qwen_jax import hardware


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


class MetricsWriter:
    """Writes scalars to workdir/metrics.jsonl and TensorBoard; shows a tqdm bar. No-op off
    process 0. `start_step`: the step the run starts from; records after it are dropped."""

    def __init__(self, workdir: Path, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tqdm import tqdm

        trim_metrics(workdir / "metrics.jsonl", start_step)
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        from tensorboardX import SummaryWriter

        # Steps are logged from 1: TensorBoard hides the earlier events at steps >= purge_step.
        self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
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

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()
