"""`qwen-jax train` and `qwen-jax compile`: experiment-driven verbs (absl + ml_collections flags).

qwen-jax train --config=experiments/pretrain/tiny.py[:arg] --workdir=DIR [--config.k=v ...]
               [--force] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
qwen-jax compile --config=experiments/pretrain/qwen_7b.py [--topology=v5p-128] [--fast]
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags


def _flag_values(verb: str, argv: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    try:
        return _parse(fv, verb, argv)
    except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
        # config_flags reports an unknown --config.key as a bare KeyError/AttributeError.
        raise SystemExit(f"qwen-jax {verb}: invalid flags: {type(e).__name__}: {e}") from None


def _parse(fv: flags.FlagValues, verb: str, argv: list[str]) -> flags.FlagValues:
    # sys_argv lets config_flags load the file while defining the flag, so that every
    # --config.a.b=v override is registered (and type-checked) before parsing.
    config_flags.DEFINE_config_file(
        "config",
        None,
        "experiment file, path[:arg]",
        flag_values=fv,
        lock_config=True,
        sys_argv=[f"qwen-jax {verb}", *argv],
    )
    if verb == "train":
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", flag_values=fv)
        flags.DEFINE_bool("force", False, "resume even if the saved config differs", flag_values=fv)
        flags.DEFINE_string("coordinator_address", None, "multi-host: HOST:PORT", flag_values=fv)
        flags.DEFINE_integer("num_processes", None, "multi-host: process count", flag_values=fv)
        flags.DEFINE_integer("process_id", None, "multi-host: this process", flag_values=fv)
    else:
        flags.DEFINE_string(
            "topology", None, "TPU slice, e.g. v5p-128 (default: the config's)", flag_values=fv
        )
        flags.DEFINE_bool(
            "fast", False, "fast-compile mode (O0; memory within a few %)", flag_values=fv
        )
    fv([f"qwen-jax {verb}", *argv])
    if fv.config is None:
        raise SystemExit(f"qwen-jax {verb}: error: --config=experiments/....py is required")
    return fv


def _typed_config(fv: flags.FlagValues):
    from qwen_jax.train.config import TrainConfig

    try:
        return TrainConfig.from_config_dict(fv.config)
    except ValueError as e:
        raise SystemExit(f"invalid config: {e}") from None


def train_main(argv: list[str]) -> int:
    fv = _flag_values("train", argv)
    if not fv.workdir:
        raise SystemExit("qwen-jax train: error: --workdir is required")
    config = _typed_config(fv)
    from qwen_jax.train.checkpointing import ConfigMismatchError
    from qwen_jax.train.distributed import init_distributed
    from qwen_jax.train.loop import train

    init_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
    try:
        result = train(config, fv.workdir, force=fv.force)
    except ConfigMismatchError as e:
        print(f"qwen-jax train: error: {e}", file=sys.stderr)
        return 1
    status = "preempted, checkpoint saved" if result.preempted else "done"
    print(f"qwen-jax train: {status} at step {result.last_step}")
    return 0


def compile_main(argv: list[str]) -> int:
    fv = _flag_values("compile", argv)
    config = _typed_config(fv)
    from qwen_jax.train.aot import compile_for_topology

    report = compile_for_topology(config, fv.topology or config.tpu.topology, fast=fv.fast)
    print(report.summary())
    return 0 if report.fits else 1
