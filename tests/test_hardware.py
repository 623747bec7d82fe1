"""The hardware table agrees with libtpu's own device model, and MFU reads its peaks.

For each TPU row, the slice `qwen_jax.train.aot` compiles for (v4-8 / v5p-8: 8 TensorCores,
v5e-4 / v6e-4: 4 chips) must show the row's device kind, devices per chip and TensorCores per
device; a row that halved v4's peak for "two devices per chip" would fail here.
"""

from __future__ import annotations

import types

import pytest

from qwen_jax import hardware
from qwen_jax.kernels import block_sizes as bsz
from qwen_jax.train import metrics


@pytest.mark.tpu_aot
@pytest.mark.parametrize("name", hardware.TPU_CHIPS)
def test_tpu_rows_match_topology(name):
    pytest.importorskip("libtpu")
    from qwen_jax.train.aot import topology_devices

    chip = hardware.CHIPS[name]
    slice_size = 8 if chip.slice_counts_cores else 4
    gen, devices = topology_devices(f"{name}-{slice_size}")
    assert gen == name
    n_chips = len({tuple(d.coords) for d in devices})
    assert n_chips == slice_size // (chip.cores_per_chip if chip.slice_counts_cores else 1)
    assert len(devices) == n_chips * chip.devices_per_chip
    assert {d.device_kind for d in devices} == {chip.device_kind}
    assert {d.num_cores for d in devices} == {chip.cores_per_device}
    assert hardware.chip_for_device_kind(devices[0].device_kind) is chip


def test_device_kind_lookup():
    assert hardware.chip_for_device_kind("TPU v5 lite").name == "v5e"
    assert hardware.chip_for_device_kind("TPU v5").name == "v5p"
    assert hardware.chip_for_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert hardware.chip_for_device_kind("NVIDIA H200").name == "h200"
    with pytest.raises(ValueError, match="TPU v3"):
        hardware.chip_for_device_kind("TPU v3")
    assert bsz.VMEM_BYTES["v4"] == hardware.CHIPS["v4"].vmem_bytes == 16 << 20


def test_mfu_peak_from_table():
    v4 = types.SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert metrics.peak_flops_per_device(device=v4) == 275e12  # one megacore device per chip
    h200 = types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu")
    assert metrics.peak_flops_per_device("float32", h200) == 67e12
    # No published figure (CPU; fp32 on TPU): the measured matmul peak, not a guess.
    measured = metrics.measured_cpu_matmul_peak()
    assert metrics.peak_flops_per_device() == measured
    assert metrics.peak_flops_per_device("float32", v4) == measured
