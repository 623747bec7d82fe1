"""THE hardware table: one row per chip, in JAX's device model (figures are per JAX device).

Used by MFU (`qwen_jax.train.metrics.peak_flops_per_device`), ahead-of-time compilation
(`qwen_jax.train.aot`: topology names, HBM per device) and the Pallas kernels' block sizes and
VMEM budgets (`qwen_jax.kernels.block_sizes`).

What one JAX device is, read from libtpu's own topology descriptions
(`jax.experimental.topologies`, checked by tests/test_hardware.py): on TPU v4 and v5p one device
is one chip whose two TensorCores run as one "megacore" (`device.num_cores == 2`), so a per-device
figure is the chip's figure; v5e and v6e have one TensorCore per chip; v2/v3 (not in the table)
show one device per TensorCore, two per chip. libtpu can also describe v4 split into two devices
per chip (`chip_config_name="default"`), but JAX's runtime and our AOT compiles use megacore.

Peaks are dense (no structured sparsity), as published:
- TPU: Cloud TPU system architecture pages, https://cloud.google.com/tpu/docs/v4, /v5e, /v5p,
  /v6e ("peak compute per chip" bf16, "HBM capacity" per chip). No fp32 peak is published: the
  MXU multiplies bf16 and XLA runs fp32 matmuls as bf16 passes (one at default precision, six at
  HIGHEST), so `peak_fp32_flops` is None and MFU measures instead of guessing.
- GPU: NVIDIA H100 (SXM5) and H200 (SXM) datasheets: "BF16 Tensor Core 1,979 TFLOPS" is with
  sparsity, so 989.5e12 dense; "FP32 67 TFLOPS" (CUDA cores; TF32 tensor cores are a
  different format); HBM 80 GB and 141 GB; HBM bandwidth 3.35 TB/s and 4.8 TB/s.
- HBM bandwidth per chip (`hbm_bytes_per_s`): the same pages ("HBM bandwidth"): v4 1200 GB/s,
  v5e 819 GB/s, v5p 2765 GB/s, v6e 1640 GB/s. Roofline estimates of bandwidth-bound kernels
  (decode, int8 matmul) divide bytes moved by it.
- CPU: no published peak; callers measure one (`metrics.measured_cpu_matmul_peak`).
"""

from __future__ import annotations

import dataclasses

import jax

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip generation. FLOP/s and HBM are per JAX device (a megacore counts as one).

    `device_kinds`: what `jax.Device.device_kind` says, the runtime's spelling first (matched as
    case-insensitive prefixes, the longest winning: "TPU v5 lite" is v5e, "TPU v5" is v5p).
    TPU-only facts: `cores_per_device` (TensorCores fused into one device), `vmem_bytes` (per
    TensorCore, what one Mosaic kernel may use), `topology` (libtpu's topology-name prefix and
    chip config) and `slice_counts_cores` (Cloud TPU names v4-N / v5p-N count TensorCores, v5e-N
    / v6e-N count chips).
    """

    name: str
    platform: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float | None
    peak_fp32_flops: float | None
    hbm_bytes: int | None
    devices_per_chip: int = 1
    cores_per_device: int = 1
    vmem_bytes: int | None = None
    topology: tuple[str, str] | None = None
    slice_counts_cores: bool = False
    hbm_bytes_per_s: float | None = None

    @property
    def device_kind(self) -> str:
        """The runtime's spelling of `jax.Device.device_kind`."""
        return self.device_kinds[0]

    @property
    def cores_per_chip(self) -> int:
        """TensorCores on one chip (what Cloud TPU's v4-N / v5p-N names count)."""
        return self.cores_per_device * self.devices_per_chip

    def peak_flops(self, dtype) -> float | None:
        """Published dense peak FLOP/s per device for matmuls in `dtype` (None: unpublished)."""
        dtype = jax.numpy.dtype(dtype)
        if dtype == jax.numpy.bfloat16:
            return self.peak_bf16_flops
        if dtype == jax.numpy.float32:
            return self.peak_fp32_flops
        raise ValueError(f"no peak for {dtype} in the hardware table (bfloat16 or float32)")


_TB = 1e12
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip(
            "v4", "tpu", ("TPU v4",), 275 * _TB, None, 32 * GIB,
            cores_per_device=2, vmem_bytes=16 * MIB, topology=("v4", "megacore"),
            slice_counts_cores=True, hbm_bytes_per_s=1200e9,
        ),
        Chip(
            "v5e", "tpu", ("TPU v5 lite", "TPU v5e"), 197 * _TB, None, 16 * GIB,
            vmem_bytes=128 * MIB, topology=("v5e", "default"), hbm_bytes_per_s=819e9,
        ),
        Chip(
            "v5p", "tpu", ("TPU v5", "TPU v5p"), 459 * _TB, None, 95 * GIB,
            cores_per_device=2, vmem_bytes=64 * MIB, topology=("v5", "megacore"),
            slice_counts_cores=True, hbm_bytes_per_s=2765e9,
        ),
        Chip(
            "v6e", "tpu", ("TPU v6 lite", "TPU v6e"), 918 * _TB, None, 32 * GIB,
            vmem_bytes=128 * MIB, topology=("v6e", "default"), hbm_bytes_per_s=1640e9,
        ),
        Chip(
            "h100", "gpu", ("NVIDIA H100 80GB HBM3",), 989.5 * _TB, 67 * _TB, 80 * 10**9,
            hbm_bytes_per_s=3.35e12,
        ),
        Chip(
            "h200", "gpu", ("NVIDIA H200",), 989.5 * _TB, 67 * _TB, 141 * 10**9,
            hbm_bytes_per_s=4.8e12,
        ),
        Chip("cpu", "cpu", ("cpu",), None, None, None),
    )
}  # fmt: skip
TPU_CHIPS = tuple(name for name, chip in CHIPS.items() if chip.platform == "tpu")


def chip_for_device_kind(device_kind: str) -> Chip:
    """The row whose `device_kinds` prefix-matches `device_kind` (longest match); ValueError if
    none does."""
    kind = device_kind.lower()
    matches = [
        (len(k), chip) for chip in CHIPS.values() for k in chip.device_kinds
        if kind.startswith(k.lower())
    ]  # fmt: skip
    if not matches:
        raise ValueError(f"device kind {device_kind!r} is not in the hardware table")
    return max(matches, key=lambda m: m[0])[1]


def target_device():
    """The device the current computation targets: the active mesh's, else jax's default.

    The abstract mesh matters for ahead-of-time compilation: under `jax.set_mesh(topology_mesh)`
    on a CPU host the target is the topology's TPU, while `jax.devices()` still says CPU. Returns
    an object with `.device_kind` (and `.platform` when it is a real device).
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    return device if device is not None else jax.devices()[0]


def device_platform(device) -> str:
    """ "tpu", "gpu" or "cpu" for a jax device or an abstract mesh device (no `.platform`)."""
    platform = getattr(device, "platform", None)
    if platform is None:
        platform = "tpu" if device.device_kind.lower().startswith("tpu") else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform
