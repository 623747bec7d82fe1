"""Multi-process start-up: `jax.distributed.initialize`, automatic on Cloud TPU VMs."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """jax.distributed.initialize: automatic on Cloud TPU VMs, explicit elsewhere (e.g. two
    local CPU processes joined on 127.0.0.1); a no-op for a single process off TPU."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif on_tpu_vm():
        jax.distributed.initialize()


def on_tpu_vm() -> bool:
    """A Cloud TPU VM: the runtime's worker list is set, a TPU device node exists, and JAX is
    not forced onto the CPU (the tests set TPU_WORKER_HOSTNAMES for compile-only libtpu)."""
    return (
        bool(os.environ.get("TPU_WORKER_HOSTNAMES"))
        and os.environ.get("JAX_PLATFORMS", "") not in ("cpu",)
        # v4 exposes /dev/accel*, v5e / v5p / v6e VMs (and GKE TPU nodes) /dev/vfio/N.
        and (Path("/dev/accel0").exists() or any(Path("/dev/vfio").glob("[0-9]*")))
    )
