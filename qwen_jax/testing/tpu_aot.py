"""One chip of a compile-only TPU slice: lower and compile a function for it from a CPU host.

libtpu (the `tpu` extra) describes TPU slices through `jax.experimental.topologies`
(`qwen_jax.train.aot.topology_devices`); the function is lowered for the first chip of a 4-chip
slice with single-device shardings and compiled by the real TPU compiler, nothing allocated
(shared/notes/tpu_aot.md). Used by the kernels' AOT tests and scripts/tpu_kernel_aot.py.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from qwen_jax import hardware

# 4 chips each; v4 / v5p as megacore chips (one JAX device per chip), like real slices.
SLICES = {"v4": "v4-8", "v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}
DEVICE_KIND = {chip: hardware.CHIPS[chip].device_kind for chip in SLICES}


def tpu_devices(chip: str):
    """The compile-only devices of `chip`'s 4-chip slice (chip: a key of SLICES)."""
    from qwen_jax.train.aot import topology_devices

    if chip not in SLICES:
        raise ValueError(f"unknown TPU chip {chip!r}; expected one of {sorted(SLICES)}")
    return topology_devices(SLICES[chip])[1]


def lower_for_tpu(chip: str, fn, *shapes):
    """Lower jit(fn) for one chip of `chip`'s slice; shapes are ShapeDtypeStructs (or arrays).

    Returns (lowered, device). The abstract one-device mesh is what tells Pallas which TPU it
    lowers for (pltpu.get_tpu_info reads the mesh's device kind, not jax.devices()).
    """
    devices = tpu_devices(chip)
    device = devices[0]
    args = [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=SingleDeviceSharding(device))
        for s in shapes
    ]
    with jax.set_mesh(Mesh(np.array(devices[:1]), ("x",))):
        return jax.jit(fn).lower(*args), device


def compile_for_tpu(chip: str, fn, *shapes):
    """Compile fn for one chip of `chip`'s slice; returns (compiled, device)."""
    lowered, device = lower_for_tpu(chip, fn, *shapes)
    return lowered.compile(), device
