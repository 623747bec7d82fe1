"""Training checkpoints: Orbax CheckpointManager over (state, data position, resolved config).

Each step directory holds three items: `state` (params, optimizer state, step; restored into the
abstract tree of the run, resharded as needed), `data` (the input pipeline's JSON position, one
entry per logical data shard) and `config` (the resolved TrainConfig). Orbax finalises a step
atomically (a temporary directory renamed on commit), so a crash mid-save leaves only an
uncommitted temporary that is never listed; a step whose files were damaged afterwards fails to
restore and the previous step is used, with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from qwen_jax.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class ConfigMismatchError(RuntimeError):
    """The workdir was created with a different configuration."""


# Keys a resumed run may change without being refused (cadence and length only).
RESUMABLE_CHANGES = {
    "run.steps",
    "run.log_every",
    "run.eval_every",
    "run.eval_batches",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.async_checkpoints",
    "init_from",  # read only when a run starts; a resume ignores it
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


# Keys that moved, old -> new, and keys added later with the value older runs implied: a
# workdir saved before the move resumes without --force.
MOVED_KEYS = {"step.z_loss": "objective.z_loss", "step.loss_chunk": "objective.loss_chunk"}
ADDED_KEYS = {"objective.name": "lm"}


def _upgrade(flat: dict[str, Any]) -> dict[str, Any]:
    """A saved config's flat keys in today's layout (MOVED_KEYS, ADDED_KEYS)."""
    out = dict(flat)
    for old, new in MOVED_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    for key, value in ADDED_KEYS.items():
        out.setdefault(key, value)
    return out


def config_differences(saved: dict, requested: dict) -> list[str]:
    """Human-readable differences outside RESUMABLE_CHANGES (the saved config read in today's
    layout first)."""
    a, b = _upgrade(_flatten(saved)), _flatten(json.loads(json.dumps(requested)))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: saved {a.get(key)!r}, requested {b.get(key)!r}")
    return diffs


class TrainCheckpointer:
    """Save/restore of the training state with fallback past damaged steps."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Any, config: dict, *, force: bool = False):
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=force,
        )

    def saved_config(self) -> dict | None:
        """The config of the newest readable step (None if there is no checkpoint)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(
                    step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
                )
                return out["config"]
            except Exception as e:  # noqa: BLE001 - any damage means "try an older step"
                log.warning("checkpoint step %d: config unreadable (%s)", step, e)
        return None

    def restore_latest(self, abstract_state) -> tuple[int, Any, Any] | None:
        """(step, state, data_state) from the newest step that restores cleanly, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001
                log.warning(
                    "checkpoint step %d could not be restored (%s: %s); trying the previous one",
                    step,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                )
                continue
            return step, out["state"], out["data"]
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(
    directory: str | Path, abstract_params, step: int | None = None
) -> tuple[int, Any] | None:
    """(step, params) of the newest step of a checkpoints directory whose params restore, or
    None. Only the params are read (the optimizer state stays on disk), into `abstract_params`'
    shapes, dtypes and shardings. With `step`, that step only: a missing step is a
    CheckpointError and a damaged one raises Orbax's error."""
    args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract_params
    )
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {directory} ({steps[::-1]})")
        for at in steps if step is None else [step]:
            try:
                out = manager.restore(
                    at,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            {"params": abstract_params},
                            restore_args={"params": args},
                            partial_restore=True,
                        )
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any damage means "try an older step"
                if step is not None:
                    raise
                log.warning("checkpoint step %d: params could not be restored (%s)", at, e)
                continue
            return at, out["state"]["params"]
    return None


def has_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoints directory holds a committed step (without creating anything)."""
    path = Path(directory)
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete or abstract tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
