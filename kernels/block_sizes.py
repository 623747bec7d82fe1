"""Block (tile) sizes for the flash-attention kernels, with defaults per chip generation.

One frozen dataclass, `FlashBlockSizes`, serves both backends: the TPU kernels
(qwen_jax.kernels.flash_attention_tpu) need multiples of 128 (the lane width; the sequence axis
is also the lane axis of the score tile), the GPU kernels (flash_attention_gpu) need powers of two
>= 16 (Triton tiles and tensor-core shapes). `default_block_sizes(chip)` picks per generation.

The defaults are chosen from each chip's VMEM size and MXU width, not tuned on hardware (this
project has no TPU to time on): 512-row tiles keep the MXU fed on the 128x128-MXU chips
(v4, v5e, v5p) while the forward kernel's working set stays at a few MiB, well inside v4's
16 MiB; v6e has a 256x256 MXU and 128 MiB of VMEM, so its tiles are twice as long. The GPU
defaults follow the usual Triton flash-attention choice for head dim 128 (a 128x64 forward tile
with 4-8 warps; 32x32 backward tiles so the fp32 dK/dV accumulators stay in registers).
"""

from __future__ import annotations

import dataclasses

from qwen_jax import hardware

# VMEM per TensorCore in bytes (what one Mosaic kernel may use), by TPU generation.
VMEM_BYTES: dict[str, int] = {name: hardware.CHIPS[name].vmem_bytes for name in hardware.TPU_CHIPS}
TPU_CHIPS = hardware.TPU_CHIPS


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
    """Tile sizes (in sequence rows) of the three flash-attention kernels.

    Forward: a [block_q, block_kv] score tile; the kv axis is the reduction loop.
    Backward dK/dV: [block_kv_dkv] key rows accumulate over [block_q_dkv]-row query tiles.
    Backward dQ: [block_q_dq] query rows accumulate over [block_kv_dq]-row key tiles.
    """

    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int

    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))

    def check_multiple_of(self, multiple: int, why: str) -> None:
        """Raise ValueError naming the first block that is not a positive multiple."""
        for name, value in self.items():
            if value <= 0 or value % multiple:
                raise ValueError(
                    f"FlashBlockSizes.{name}={value} must be a positive multiple of {multiple} "
                    f"({why})"
                )

    def check_power_of_two(self, minimum: int, why: str) -> None:
        """Raise ValueError naming the first block that is not a power of two >= minimum."""
        for name, value in self.items():
            if value < minimum or value & (value - 1):
                raise ValueError(
                    f"FlashBlockSizes.{name}={value} must be a power of two >= {minimum} ({why})"
                )

    def capped(self, cap: int) -> FlashBlockSizes:
        """Each block limited to `cap` rows (short sequences: one tile instead of padding)."""
        return FlashBlockSizes(**{name: min(value, cap) for name, value in self.items()})


_DEFAULTS: dict[str, FlashBlockSizes] = {
    "v4": FlashBlockSizes(512, 512, 512, 512, 512, 512),
    "v5e": FlashBlockSizes(512, 512, 512, 512, 512, 512),
    "v5p": FlashBlockSizes(512, 1024, 512, 512, 512, 1024),
    "v6e": FlashBlockSizes(1024, 1024, 1024, 512, 1024, 1024),
    "gpu": FlashBlockSizes(128, 64, 32, 32, 32, 32),
    # CPU runs the TPU kernel in interpret mode: the smallest legal tiles are the fastest there.
    "cpu": FlashBlockSizes(128, 128, 128, 128, 128, 128),
}
CHIPS = tuple(_DEFAULTS)


def chip_from_device_kind(device_kind: str, platform: str = "tpu") -> str:
    """Map a jax `device_kind` ("TPU v5 lite", "TPU v4", "NVIDIA H100 ...") to a key of CHIPS:
    the hardware table's TPU generation, or "gpu" / "cpu" (one default per platform)."""
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "cpu":
        return "cpu"
    try:
        chip = hardware.chip_for_device_kind(device_kind)
    except ValueError:
        chip = None
    if chip is None or chip.name not in _DEFAULTS:
        raise ValueError(
            f"no flash-attention block sizes for device kind {device_kind!r}; pass block_sizes"
        )
    return chip.name


def current_chip() -> str:
    """The chip the current computation targets (`hardware.target_device`), a key of CHIPS."""
    device = hardware.target_device()
    return chip_from_device_kind(device.device_kind, hardware.device_platform(device))


def default_block_sizes(chip: str | None = None) -> FlashBlockSizes:
    """Defaults for `chip` (one of CHIPS), or for `current_chip()` when None."""
    chip = current_chip() if chip is None else chip
    if chip not in _DEFAULTS:
        raise ValueError(f"unknown chip {chip!r}; expected one of {CHIPS}")
    return _DEFAULTS[chip]
