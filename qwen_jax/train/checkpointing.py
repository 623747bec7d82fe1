"""Training checkpoints: Orbax CheckpointManager over (state, data position, resolved config).

Each step directory holds three items: `state` (params, optimizer state, step; restored into the
abstract tree of the run, resharded as needed), `data` (the input pipeline's JSON position, one
entry per logical data shard) and `config` (the resolved TrainConfig). Orbax finalises a step
atomically (a temporary directory renamed on commit), so a crash mid-save leaves only an
uncommitted temporary that is never listed.

Damage. A step whose files were damaged afterwards fails to restore: it is moved aside to
`<directory>_damaged/<step>` (outside what Orbax lists) with a warning naming the step and the
reason, and the previous step is used. Moving it matters: left in place it stays the newest step,
so the run would skip re-saving that step (it "exists"), retention would count it and could
delete the good older step, and every later resume would relive the fallback. Orbax deletes old
steps only after a newer one has committed, so with damaged steps out of the listing retention
never removes the last step that restores. A full disk during a save is one WorkdirError line,
not Orbax's hundreds of log lines.

Remote workdirs. A workdir may be a URI (gs://bucket/run: cloud sweeps, multi-host runs that
need shared storage): `workdir_path` makes it an etils.epath path, which Orbax writes through
TensorStore's GCS driver and everything else reads and writes through tf.io.gfile (as
sweep/collect.py does). Local paths stay pathlib.Path, handled exactly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from qwen_jax.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class ConfigMismatchError(RuntimeError):
    """The workdir was created with a different configuration."""


class WorkdirError(OSError):
    """The run directory cannot be written: not a directory, read-only, or full (one line)."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URI (gs://bucket/run): a pathlib path never holds `://`."""
    return "://" in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """A workdir (or a path in one) as a path object: a URI through etils.epath (gs://, and any
    scheme registered with it), a local path as pathlib.Path. pathlib would turn gs://b/x into
    the local folder gs:/b/x; epath's gs:// goes through tf.io.gfile."""
    if not is_remote(path):
        return Path(path)
    if not isinstance(path, str):
        return path  # already an epath URI path
    try:
        return epath.Path(path)
    except KeyError:  # epath's registry of URI schemes
        raise ValueError(
            f"{path}: unsupported storage scheme (use gs:// or a local path)"
        ) from None


def _orbax_directory(path: str | os.PathLike) -> epath.Path:
    """The checkpoints directory as Orbax manages it: a local path made absolute (relative to
    the working directory), a URI as is (TensorStore reaches gs:// through its own driver)."""
    path = workdir_path(path)
    return path if is_remote(path) else path.absolute()


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + "..."


_NO_SPACE = "No space left on device"  # strerror(ENOSPC), also in TensorStore's messages


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in an exception chain. TensorStore reports it as a ValueError
    (`RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']`), not an OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if _NO_SPACE in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _DropDiskFullReports(logging.Filter):
    """Drops the log records of a full disk (Orbax's ERROR records with tracebacks, four or
    five per failed save; asyncio's "Task exception was never retrieved"): TrainCheckpointer
    raises one WorkdirError for it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (_is_disk_full(exc) or _NO_SPACE in record.getMessage())


def _is_closed_loop_report(u) -> bool:
    code = getattr(u.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True  # an Orbax coroutine its closed loop left pending, finalised at exit
    if u.exc_type is not RuntimeError or str(u.exc_value) != "Event loop is closed":
        return False
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def _quiet_closed_loop_reports() -> None:
    """Drop the `RuntimeError: Event loop is closed` reports a failed Orbax restore or save
    leaves behind (a sys.unraisablehook wrapper, installed once per process).

    Orbax runs a restore (or a save's writes) in a fresh event loop and closes it as soon as one
    operation fails, without cancelling those still in flight (orbax _src/asyncio_utils.
    _run_sync_via_new_loop: run_until_complete, then close). TensorStore completes them later
    and each done-callback calls `call_soon_threadsafe` on the closed loop; the RuntimeError goes
    to sys.unraisablehook, one 5-line traceback per pending read (about a thousand lines for a
    real model). The failure itself is reported (fallback warning, WorkdirError), so only these
    reports are dropped. Installed before any checkpoint I/O and kept: a background save fails
    before anyone waits for it, and the callbacks can fire after the failed call has returned.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_reports", False):
        return
    # The failed writes of a full disk, garbage-collected later: "Task exception was never
    # retrieved" (asyncio's logger), each with its traceback.
    logging.getLogger("asyncio").addFilter(_DropDiskFullReports())

    def hook(u):
        if not _is_closed_loop_report(u):
            previous(u)

    hook._drops_closed_loop_reports = True
    sys.unraisablehook = hook


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


# Keys that moved, old -> new: a workdir saved before the move resumes without --force.
MOVED_KEYS = {"step.z_loss": "objective.z_loss", "step.loss_chunk": "objective.loss_chunk"}


def _upgrade(flat: dict[str, Any]) -> dict[str, Any]:
    """A saved config's flat keys in today's layout (MOVED_KEYS)."""
    out = dict(flat)
    for old, new in MOVED_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _defaults() -> dict[str, Any]:
    """Every config key's default, flat, as saved (the resolved model's fields included): what
    a run saved before a key existed implied."""
    from qwen_jax.model.config import QwenConfig
    from qwen_jax.train.config import TrainConfig

    out = _flatten(json.loads(json.dumps(TrainConfig().to_dict())))
    for f in dataclasses.fields(QwenConfig):
        if f.default is not dataclasses.MISSING:
            out[f"resolved_model.{f.name}"] = json.loads(json.dumps(f.default))
    return out


def config_differences(saved: dict, requested: dict) -> list[str]:
    """Human-readable differences outside RESUMABLE_CHANGES (the saved config read in today's
    layout first). A key the saved run did not have yet (added since) differs only when the
    requested value is not the key's default."""
    a, b = _upgrade(_flatten(saved)), _flatten(json.loads(json.dumps(requested)))
    defaults = _defaults()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or a.get(key) == b.get(key):
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        diffs.append(f"{key}: saved {a.get(key)!r}, requested {b.get(key)!r}")
    return diffs


class TrainCheckpointer:
    """Save/restore of the training state; steps that do not restore are moved aside."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = _orbax_directory(directory)
        # A sibling, not a child: Orbax lists (and retention counts) only `directory`'s steps.
        self.damaged_directory = self.directory.with_name(self.directory.name + "_damaged")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )
        self._pending: int | None = None  # the step whose async save may still fail
        self._disk_full = False
        self._quiet = _DropDiskFullReports()
        logging.getLogger("absl").addFilter(self._quiet)  # Orbax logs through absl
        _quiet_closed_loop_reports()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: Any, config: dict, *, force: bool = False):
        self.wait()  # an earlier async save that failed is reported under its own step
        with self._reporting_disk_full(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config),
                ),
                force=force,
            )
        self._pending = step

    @contextlib.contextmanager
    def _reporting_disk_full(self, step: int | None):
        try:
            yield
        except Exception as e:
            if not _is_disk_full(e):
                raise
            self._disk_full = True
            raise WorkdirError(
                f"no space left on device while saving checkpoint step {step} to {self.directory}"
            ) from e

    def saved_config(self) -> dict | None:
        """The config of the newest step whose config reads (None if there is none); steps
        newer than it are moved aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(
                    step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
                )
                return out["config"]
            except Exception as e:  # noqa: BLE001 - any damage means "try an older step"
                self._set_aside(step, "has an unreadable config", e)
        return None

    def restore_latest(self, abstract_state) -> tuple[int, Any, Any] | None:
        """(step, state, data_state) from the newest step that restores cleanly, or None; the
        steps newer than it are moved aside, so it is also the newest step listed."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any damage means "try an older step"
                self._set_aside(step, "could not be restored", e)
                continue
            return step, out["state"], out["data"]
        return None

    def _set_aside(self, step: int, what: str, error: Exception) -> None:
        """Move step `step` to damaged_directory (process 0; every process then re-lists) and
        warn. Moved, not deleted: a transient read error must not cost a good checkpoint."""
        source = self.directory / str(step)
        target = self.damaged_directory / str(step)
        if target.exists():
            target = target.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        moved = ""
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if is_remote(source):  # gfile renames a remote directory object by object
                    source.rename(target)
                else:
                    os.replace(source, target)
                moved = f"moved it to {target}"
            except Exception as e:  # noqa: BLE001 - OSError, or tf.errors from gfile
                moved = f"could not move it aside ({e})"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"qwen_jax checkpoint {step} set aside")
        self.manager.reload()
        if jax.process_index() == 0:
            log.warning(
                "checkpoint step %d %s (%s: %s); %s; trying the previous step",
                step,
                what,
                type(error).__name__,
                _first_line(error),
                moved,
            )

    def wait(self) -> None:
        with self._reporting_disk_full(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Wait for the pending save and release the manager. After a full-disk WorkdirError,
        Orbax's repeats of that error are swallowed (the caller is already unwinding)."""
        try:
            if not self._disk_full:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._disk_full:
                    raise
            finally:
                logging.getLogger("absl").removeFilter(self._quiet)


def restore_params(
    directory: str | Path, abstract_params, step: int | None = None
) -> tuple[int, Any] | None:
    """(step, params) of the newest step of a checkpoints directory whose params restore, or
    None: `restore_items` of the params alone."""
    found = restore_items(directory, {"params": abstract_params}, step)
    return None if found is None else (found[0], found[1]["params"])


def restore_items(
    directory: str | Path, abstract_items: dict[str, Any], step: int | None = None
) -> tuple[int, dict[str, Any]] | None:
    """(step, {name: tree}) of the newest step of a checkpoints directory whose state entries
    `abstract_items` ("params"; "frozen" for a LoRA run's base) restore, or None. Only those
    entries are read (the optimizer state stays on disk), into the abstract trees' shapes,
    dtypes and shardings. With `step`, that step only: a missing step is a CheckpointError and
    a damaged one raises Orbax's error."""
    args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract_items
    )
    _quiet_closed_loop_reports()
    with ocp.CheckpointManager(_orbax_directory(directory)) as manager:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint step {step} in {directory} ({steps[::-1]})")
        for at in steps if step is None else [step]:
            try:
                out = manager.restore(
                    at,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            dict(abstract_items), restore_args=args, partial_restore=True
                        )
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any damage means "try an older step"
                if step is not None:
                    raise
                log.warning(
                    "checkpoint step %d: weights could not be restored (%s: %s)",
                    at,
                    type(e).__name__,
                    _first_line(e),
                )
                continue
            return at, {k: out["state"][k] for k in abstract_items}
    return None


def has_checkpoint(directory: str | Path) -> bool:
    """Whether a checkpoints directory holds a committed step (without creating anything). On
    gs:// Orbax has no atomic rename: it writes a step in place and commits it last with a
    commit_success.txt inside, so there a step counts only with that file."""
    path = _orbax_directory(directory)
    if not path.is_dir():
        return False
    steps = (p for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if not str(path).startswith("gs://"):
        return any(True for _ in steps)
    return any((p / "commit_success.txt").exists() for p in steps)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete or abstract tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
