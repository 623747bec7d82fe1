"""Metric sinks of the training loop (process 0 only): jsonl, TensorBoard, progress bar; and MFU."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (chip, or per core where JAX shows cores as devices).
_PEAK_FLOPS = {
    "TPU v4": 275e12 / 2,  # v4 exposes 2 devices (cores) per chip without megacore
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


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


def peak_flops_per_device() -> float:
    kind = jax.devices()[0].device_kind
    for prefix, value in _PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return value
    return measured_cpu_matmul_peak()


class MetricsWriter:
    """Writes scalars to workdir/metrics.jsonl and TensorBoard; shows a tqdm bar. No-op off
    process 0."""

    def __init__(self, workdir: Path, total_steps: int, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tqdm import tqdm

        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tensorboard"))
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
