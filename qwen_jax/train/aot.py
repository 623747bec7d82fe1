"""Ahead-of-time compilation of the full train step for a TPU slice, from a CPU-only host.

libtpu (the `tpu` extra) provides compile-only TPU devices through
`jax.experimental.topologies`; the step is lowered with the experiment's real shapes and
shardings (nothing allocated) and compiled by the TPU compiler, which reports per-device memory
(`memory_analysis`) and FLOPs (`cost_analysis`). An out-of-HBM program fails at compile time.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax

from qwen_jax import hardware
from qwen_jax.sharding import make_mesh
from qwen_jax.train.config import TrainConfig

GIB = hardware.GIB
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}


def topology_devices(name: str):
    """Compile-only devices of a slice named like Cloud TPU accelerator types; (chip, devices).

    v4-N and v5p-N count TensorCores (N/2 megacore chips, one JAX device each); v5e-N and v6e-N
    count chips. Chip facts (topology names, cores per device) come from `qwen_jax.hardware`.
    """
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if not m:
        raise ValueError(f"unknown topology {name!r}; expected v4-N, v5p-N, v5e-N or v6e-N")
    chip, n = hardware.CHIPS[m.group(1)], int(m.group(2))
    from jax.experimental import topologies

    prefix, chip_config = chip.topology
    chips = n // chip.cores_per_chip if chip.slice_counts_cores else n
    shapes = _3D if chip.slice_counts_cores else _2D  # v4/v5p: 3D torus; v5e/v6e: 2D
    if chips not in shapes:
        raise ValueError(f"{name}: {chips} chips is not a supported slice ({sorted(shapes)})")
    desc = topologies.get_topology_desc(
        topology_name=f"{prefix}:{shapes[chips]}",
        platform="tpu",
        chip_config_name=chip_config,
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=(shapes is _3D and chips >= 64,) * 3,
    )
    return chip.name, desc.devices


@dataclasses.dataclass
class CompileReport:
    topology: str
    devices: int
    mesh: dict[str, int]
    hbm_per_device: int
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    flops_per_step: float = 0.0  # XLA's cost_analysis: counts a loop body (scan) once
    model_flops_per_step: float = 0.0  # 6N + attention per token x tokens, per device
    compile_seconds: float = 0.0
    error: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return not self.error and self.peak_bytes <= self.hbm_per_device

    def summary(self) -> str:
        head = f"{self.topology}: {self.devices} devices, mesh {self.mesh}"
        if self.error:
            return f"{head}\nDOES NOT FIT / FAILED: {self.error}"
        return (
            f"{head}\n"
            f"  per-device HBM: {self.peak_bytes / GIB:.2f} GiB of {self.hbm_per_device / GIB:.0f}"
            f" (args {self.argument_bytes / GIB:.2f}, temp {self.temp_bytes / GIB:.2f},"
            f" out {self.output_bytes / GIB:.2f}, aliased {self.alias_bytes / GIB:.2f})\n"
            f"  FLOPs per step per device: model {self.model_flops_per_step:.3e}"
            f" (compiler count {self.flops_per_step:.3e}: scanned layers counted once)\n"
            f"  compiled in {self.compile_seconds:.1f} s; fits: {self.fits}"
        )


def compile_for_topology(config: TrainConfig, topology: str, *, fast: bool = False):
    """Lower and compile the experiment's train step for `topology`; never allocates."""
    from qwen_jax.train.step import build_steps

    if not topology:
        raise ValueError("no topology: pass --topology or set config.tpu.topology")
    gen, devices = topology_devices(topology)
    mesh = make_mesh(config.mesh, devices=devices)
    model_cfg = config.model_config()
    steps = build_steps(config, model_cfg, mesh)
    train_fn = steps.train
    state_in = steps.sharded_abstract_state()
    batch_in = steps.abstract_batch(config.data.global_batch, config.data.seq_len)
    report = CompileReport(topology, len(devices), dict(mesh.shape), hardware.CHIPS[gen].hbm_bytes)
    tokens = config.data.global_batch * config.data.seq_len
    report.model_flops_per_step = (
        model_cfg.flops_per_token(config.data.seq_len) * tokens / len(devices)
    )
    previous = jax.config.jax_optimization_level
    if fast:  # shared/notes/tpu_aot.md §5: ~10x faster compiles, memory within ~2%
        jax.config.update("jax_optimization_level", "O0")
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = train_fn.lower(state_in, batch_in).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's OOM is a result, not a crash
        report.error = str(e).splitlines()[0][:500]
        return report
    finally:
        jax.config.update("jax_optimization_level", previous)
    report.compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    report.argument_bytes = mem.argument_size_in_bytes
    report.output_bytes = mem.output_size_in_bytes
    report.alias_bytes = mem.alias_size_in_bytes
    report.temp_bytes = mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report.flops_per_step = float(cost.get("flops", 0.0))
    return report


@dataclasses.dataclass
class RLCompileReport:
    """`qwen-jax compile` of an RL experiment: every program of an iteration (the rollout
    engine's new-cache, prefill, first-token and decode steps, the scoring forward, the value
    and policy updates) compiled for the slice, with what stays resident on a device for the
    whole run: policy and value params + AdamW states, the frozen reference and reward models
    and the rollout engine's copy of the policy weights.

    A program runs while everything resident stays put, so its peak per device is the resident
    total, minus the resident trees it takes as arguments (`reads`: counted once, inside its
    own peak), plus its own peak (arguments + outputs - aliased + temporaries). The whole
    iteration's HBM is the largest program peak."""

    topology: str
    devices: int
    mesh: dict[str, int]
    hbm_per_device: int
    resident: dict[str, int] = dataclasses.field(default_factory=dict)  # tree -> bytes/device
    programs: dict[str, CompileReport] = dataclasses.field(default_factory=dict)
    reads: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # see above
    compile_seconds: float = 0.0
    error: str = ""

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    def program_peak(self, name: str) -> int:
        report = self.programs[name]
        held = sum(self.resident.get(k, 0) for k in self.reads.get(name, ()))
        return self.resident_bytes - held + report.peak_bytes

    @property
    def iteration_peak(self) -> int:
        """Per-device HBM of the whole iteration: the largest program peak."""
        return max((self.program_peak(n) for n in self.programs), default=self.resident_bytes)

    @property
    def fits(self) -> bool:
        if self.error or not self.programs or any(r.error for r in self.programs.values()):
            return False
        return self.iteration_peak <= self.hbm_per_device

    def summary(self) -> str:
        head = f"{self.topology}: {self.devices} devices, mesh {self.mesh}"
        if self.error:
            return f"{head}\nDOES NOT FIT / FAILED: {self.error}"
        lines = [head, "  resident per device for the whole run:"]
        for name, b in self.resident.items():
            lines.append(f"    {name:<18} {b / GIB:8.2f} GiB")
        lines.append(f"    {'all':<18} {self.resident_bytes / GIB:8.2f} GiB")
        lines.append("  programs (peak per device with the resident state beside it):")
        for name, r in self.programs.items():
            if r.error:
                lines.append(f"    {name}: FAILED: {r.error}")
                continue
            lines.append(
                f"    {name:<20} {self.program_peak(name) / GIB:8.2f} GiB (args "
                f"{r.argument_bytes / GIB:.2f}, temp {r.temp_bytes / GIB:.2f}, out "
                f"{r.output_bytes / GIB:.2f}, aliased {r.alias_bytes / GIB:.2f}); "
                f"compiled in {r.compile_seconds:.1f} s"
            )
        lines.append(
            f"  whole iteration: {self.iteration_peak / GIB:.2f} GiB per device of "
            f"{self.hbm_per_device / GIB:.0f}"
        )
        lines.append(f"  compiled in {self.compile_seconds:.1f} s; fits: {self.fits}")
        return "\n".join(lines)


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (ShapeDtypeStructs with shardings)."""
    import math

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and hasattr(sharding, "shard_shape"):
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * jax.numpy.dtype(leaf.dtype).itemsize
    return total


def compile_rl_for_topology(config: TrainConfig, topology: str, *, fast: bool = False):
    """Lower and compile every program of one RL iteration for `topology` (RLCompileReport):
    the scoring and update steps (`RL.aot_programs`) and the rollout engine's programs
    (rl/rollout_aot.py), from abstract state only; never allocates nor reads a weight."""
    from qwen_jax.rl.algo import build_rl
    from qwen_jax.rl.rollout_aot import rollout_programs
    from qwen_jax.tokenizer import load_tokenizer

    if not topology:
        raise ValueError("no topology: pass --topology or set config.tpu.topology")
    gen, devices = topology_devices(topology)
    mesh = make_mesh(config.mesh, devices=devices)
    hbm = hardware.CHIPS[gen].hbm_bytes
    if config.rl.algorithm == "ppo" and not config.rl.reward_model:
        # Only the RM's architecture matters here: absent one (a full-size file names it on
        # the command line), the policy's with a reward head, as the report's same-size RM.
        rl_cfg = dataclasses.replace(config.rl, reward_model="(policy-shaped reward model)")
        config = dataclasses.replace(config, rl=rl_cfg)
    report = RLCompileReport(topology, len(devices), dict(mesh.shape), hbm)
    previous = jax.config.jax_optimization_level
    if fast:
        jax.config.update("jax_optimization_level", "O0")
    start = time.perf_counter()
    try:
        # Outside set_mesh, as the trainer's build_steps: abstract models carry logical axes.
        # load=False: abstract weights only (the sources need not exist on this host).
        rl = build_rl(config, load_tokenizer(config.data.tokenizer), mesh, load=False)
        programs = rl.aot_programs()  # lowered under the mesh (RL.aot_programs)
        engine_programs, engine_weights = rollout_programs(rl, mesh)
        programs.update(engine_programs)
        policy, value = rl.policy_abstract, rl.value_abstract
        trees = {
            "policy_params": policy["params"],
            "policy_opt_state": {k: v for k, v in policy.items() if k != "params"},
            "reference": rl.reference.abstract,
            "rollout_weights": engine_weights,
        }
        if rl.ppo:
            trees["value_params"] = value["params"]
            trees["value_opt_state"] = {k: v for k, v in value.items() if k != "params"}
            trees["reward"] = rl.reward.abstract
        report.resident = {k: _per_device_bytes(v) for k, v in trees.items()}
        report.reads = _RL_READS
        with jax.set_mesh(mesh):
            for name, lowered in programs.items():
                report.programs[name] = _compile_program(lowered, topology, devices, mesh, hbm)
    except Exception as e:  # noqa: BLE001 - a failure to build or lower is the result
        report.error = str(e).splitlines()[0][:500] if str(e) else type(e).__name__
    finally:
        jax.config.update("jax_optimization_level", previous)
    report.compile_seconds = time.perf_counter() - start
    return report


# The resident trees each RL program takes as arguments (RLCompileReport.program_peak).
_RL_READS = {
    "experience": ("policy_params", "reference", "value_params", "reward"),
    "policy_step": ("policy_params", "policy_opt_state"),
    "value_step": ("value_params", "value_opt_state"),
    "rollout_prefill": ("rollout_weights",),
    "rollout_decode": ("rollout_weights",),
}


def _compile_program(lowered, topology, devices, mesh, hbm) -> CompileReport:
    r = CompileReport(topology, len(devices), dict(mesh.shape), hbm)
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the compiler's OOM is a result, not a crash
        r.error = str(e).splitlines()[0][:500]
        return r
    r.compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    r.argument_bytes, r.output_bytes = mem.argument_size_in_bytes, mem.output_size_in_bytes
    r.alias_bytes, r.temp_bytes = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    r.flops_per_step = float(cost.get("flops", 0.0))
    return r
