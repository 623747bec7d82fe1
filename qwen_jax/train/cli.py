"""`qwen-jax train` and `qwen-jax compile`: experiment-driven verbs (absl + ml_collections flags).

qwen-jax train --config=experiments/pretrain/tiny.py[:arg] --workdir=DIR [--config.k=v ...]
               [--force] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
qwen-jax compile --config=experiments/pretrain/qwen_7b.py [--topology=v5p-128] [--fast]

An experiment with rl.algorithm set (experiments/ppo, experiments/grpo) trains with the RL loop
(qwen_jax/rl/loop.py) and compiles every program of an RL iteration (train/aot.py).

Errors are raised (UsageError for flags and config values) and reported as one line by
`qwen_jax.cli.main`.
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from qwen_jax.cli import UsageError

_HELP = ("--help", "-h", "--helpfull", "-help")
_OVERRIDE = re.compile(r"^--?config\.([^=]+)")


def _flag_values(verb: str, argv: list[str]) -> flags.FlagValues | None:
    """The parsed flags, or None after printing the help (--help)."""
    want_help = any(a in _HELP for a in argv)
    argv = [a for a in argv if a not in _HELP]
    path = _config_path(argv)
    if path is not None and not Path(path).is_file():
        raise UsageError(f"--config: no experiment file {path}")
    fv = flags.FlagValues()
    _define(fv, verb, argv)
    if want_help:
        print(_help(verb, fv))
        return None
    try:
        fv([f"qwen-jax {verb}", *argv])
    except flags.Error as e:
        raise UsageError(str(e)) from None
    except (KeyError, AttributeError) as e:
        # config_flags reports an unknown --config.key as a bare KeyError/AttributeError.
        raise UsageError(_unknown_override(argv) or f"invalid --config override: {e}") from None
    if fv.config is None:
        raise UsageError("--config=experiments/....py is required")
    return fv


def _define(fv: flags.FlagValues, verb: str, argv: list[str]) -> None:
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


def _help(verb: str, fv: flags.FlagValues) -> str:
    doc = __doc__.splitlines()
    first = next(i for i, line in enumerate(doc) if line.startswith(f"qwen-jax {verb}"))
    usage = [doc[first]] + [line for line in doc[first + 1 :] if line.startswith("    ")][:1]
    lines = ["usage: " + "\n       ".join(u.strip() for u in usage), "", "flags:"]
    for name in sorted(fv):
        flag = fv[name]
        if name in ("flagfile", "undefok") or name.startswith("config.") or name != flag.name:
            continue
        default = "" if flag.default in (None, False) else f" (default: {flag.default})"
        lines.append(f"  --{name}: {flag.help}{default}")
    lines += [
        "  --config.SECTION.KEY=VALUE: override one key of the experiment, e.g.",
        "      --config.run.steps=50 --config.data.global_batch=16 (typed as the file's value)",
        "",
        "`qwen-jax --verbose " + verb + " ...` shows tracebacks and the libraries' logs.",
    ]
    return "\n".join(lines)


def _config_path(argv: list[str]) -> str | None:
    """The experiment file of `--config=path[:arg]` (None without the flag)."""
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if value is None:
        return None
    m = re.fullmatch(r"(.+\.py):(.*)", value)
    return m.group(1) if m else value


def _unknown_override(argv: list[str]) -> str | None:
    """ "unknown config key run.stepz; did you mean run.steps?" for the first override naming
    no key of the experiment (None when every one exists)."""
    from qwen_jax.train.config import config_keys, load_experiment, unknown_key_message

    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if value is None:
        return None
    known = config_keys(load_experiment(value))
    for arg in argv:
        m = _OVERRIDE.match(arg)
        if m and m.group(1) not in known:
            return unknown_key_message(m.group(1), known)
    return None


def _typed_config(fv: flags.FlagValues):
    from qwen_jax.train.config import TrainConfig

    try:
        return TrainConfig.from_config_dict(fv.config)
    except ValueError as e:
        raise UsageError(f"invalid config: {e}") from None


def train_main(argv: list[str]) -> int:
    fv = _flag_values("train", argv)
    if fv is None:
        return 0
    if not fv.workdir:
        raise UsageError("--workdir is required")
    config = _typed_config(fv)
    from qwen_jax.train.distributed import init_distributed

    if config.is_rl:  # PPO / GRPO: the RL loop (rollouts, four models)
        from qwen_jax.rl.loop import train_rl as train
    else:
        from qwen_jax.train.loop import train

    init_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)
    result = train(config, fv.workdir, force=fv.force)
    status = "preempted, checkpoint saved" if result.preempted else "done"
    unit = "iteration" if config.is_rl else "step"
    print(f"qwen-jax train: {status} at {unit} {result.last_step}")
    return 0


def compile_main(argv: list[str]) -> int:
    fv = _flag_values("compile", argv)
    if fv is None:
        return 0
    config = _typed_config(fv)
    from qwen_jax.train.aot import compile_for_topology, compile_rl_for_topology

    topology = fv.topology or config.tpu.topology
    if not topology:
        raise UsageError("no topology: pass --topology=v5p-128 (or set config.tpu.topology)")
    try:
        compile_fn = compile_rl_for_topology if config.is_rl else compile_for_topology
        report = compile_fn(config, topology, fast=fv.fast)
    except ValueError as e:  # an unknown or unsupported topology name
        raise UsageError(str(e)) from None
    print(report.summary())
    return 0 if report.fits else 1
