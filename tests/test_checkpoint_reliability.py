"""Checkpoint reliability (issue 12): a damaged newest step is moved aside and saved again, not
relived; its fallback is one visible warning, not a thousand `Event loop is closed` lines;
metrics.jsonl and TensorBoard keep one record per step across resumes; an unusable workdir or a
full disk is one clear error; and a run SIGKILLed several times, with a damaged checkpoint in
between, ends exactly like an uninterrupted one."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import REPO
from qwen_jax.train import loop
from qwen_jax.train.checkpointing import TrainCheckpointer, WorkdirError
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.metrics import MetricsWriter

# A guard against a hang, not a speed check: sized for a loaded 2-core machine (the suite runs
# two workers, and these tests start training subprocesses).
HANG_S = 900

# ------------------------------------------------------------------ a tiny checkpointer


def state_at(step: int) -> dict:
    """A small state tree: a few arrays whose values say which step saved them."""
    return {f"w{i}": jnp.arange(64, dtype=jnp.float32) + 100 * step + i for i in range(6)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_at(0))


def save_steps(directory: Path, steps, keep: int = 3) -> None:
    ck = TrainCheckpointer(directory, keep=keep, async_save=False)
    for s in steps:
        ck.save(s, state_at(s), {"pos": s}, {"saved_at": s}, force=True)
    ck.close()


def damage(step_dir: Path, item: str = "state") -> None:
    """Every file of one item cut to half its length, as after a failed disk."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def listed(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_damaged_newest_step_is_moved_aside_warned_and_saved_again(tmp_path, caplog):
    ckdir = tmp_path / "checkpoints"
    save_steps(ckdir, [2, 4])
    damage(ckdir / "4")

    ck = TrainCheckpointer(ckdir, keep=2, async_save=False)
    with caplog.at_level("WARNING"):
        step, state, data = ck.restore_latest(ABSTRACT)
    assert (step, data) == (2, {"pos": 2})
    np.testing.assert_array_equal(state["w0"], state_at(2)["w0"])
    # Out of the listing (so no longer "the newest step"), kept for inspection.
    assert ck.latest_step() == 2 and listed(ckdir) == [2]
    assert (tmp_path / "checkpoints_damaged" / "4" / "state").is_dir()
    (warning,) = [r.getMessage() for r in caplog.records if "could not be restored" in r.message]
    assert warning.startswith("checkpoint step 4 could not be restored (")
    assert "checkpoints_damaged/4" in warning and "\n" not in warning

    # The loop saves a step unless it is already the newest: step 4 is written again, and
    # retention (keep=2) then drops step 2, never the good step 4.
    for s in (4, 6):
        if ck.latest_step() != s:
            ck.save(s, state_at(s), {"pos": s}, {"saved_at": s}, force=True)
    ck.close()
    assert listed(ckdir) == [4, 6]
    again = TrainCheckpointer(ckdir, keep=2, async_save=False)
    assert again.restore_latest(ABSTRACT)[0] == 6
    again.close()


def test_keep_one_with_a_damaged_newest_step_keeps_a_restorable_step(tmp_path):
    ckdir = tmp_path / "checkpoints"
    save_steps(ckdir, [2, 4])
    damage(ckdir / "4")

    ck = TrainCheckpointer(ckdir, keep=1, async_save=False)
    assert ck.restore_latest(ABSTRACT)[0] == 2
    if ck.latest_step() != 4:  # the loop reaching step 4 again
        ck.save(4, state_at(4), {"pos": 4}, {"saved_at": 4}, force=True)
    ck.close()
    # The newest listed step is the one that restores: the next resume relives nothing.
    resumed = TrainCheckpointer(ckdir, keep=1, async_save=False)
    step, state, _ = resumed.restore_latest(ABSTRACT)
    assert step == resumed.latest_step() == 4
    np.testing.assert_array_equal(state["w3"], state_at(4)["w3"])
    resumed.close()
    assert listed(ckdir) == [4]


def test_unreadable_config_is_moved_aside(tmp_path):
    ckdir = tmp_path / "checkpoints"
    save_steps(ckdir, [2, 4])
    (ckdir / "4" / "config" / "metadata").write_text("{")
    ck = TrainCheckpointer(ckdir, keep=3, async_save=False)
    assert ck.saved_config() == {"saved_at": 2}
    assert ck.latest_step() == 2
    assert (tmp_path / "checkpoints_damaged" / "4").is_dir()
    ck.close()


def test_a_damaged_step_moved_twice_keeps_both_copies(tmp_path):
    ckdir = tmp_path / "checkpoints"
    save_steps(ckdir, [2])
    for _ in range(2):
        save_steps(ckdir, [4])
        damage(ckdir / "4")
        ck = TrainCheckpointer(ckdir, keep=3, async_save=False)
        assert ck.restore_latest(ABSTRACT)[0] == 2
        ck.close()
    moved = sorted(p.name for p in (tmp_path / "checkpoints_damaged").iterdir())
    assert len(moved) == 2 and moved[0] == "4" and moved[1].startswith("4-")


def test_reads_left_in_flight_by_a_failed_restore_report_nothing(tmp_path, monkeypatch):
    """Orbax closes its event loop when the first read of a restore fails; TensorStore then
    completes the other reads into the closed loop, one `RuntimeError: Event loop is closed`
    report each. Which reads are still in flight depends on timing, so after a real failed
    restore one such late completion is made deterministic with a TensorStore promise."""
    import tensorstore as ts

    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    ckdir = tmp_path / "checkpoints"
    save_steps(ckdir, [2, 4])
    damage(ckdir / "4")
    ck = TrainCheckpointer(ckdir, keep=3, async_save=False)
    assert ck.restore_latest(ABSTRACT)[0] == 2
    ck.close()

    promise, future = ts.Promise.new()
    loop_ = asyncio.new_event_loop()

    async def read():
        await future

    loop_.create_task(read())
    loop_.run_until_complete(asyncio.sleep(0))  # the read now awaits TensorStore
    loop_.close()  # as Orbax does on the first failure
    promise.set_result(0)  # the read completes into the closed loop
    time.sleep(0.2)
    assert [str(r.exc_value) for r in reports] == []

    # Anything else still reaches the hook.
    other = SimpleNamespace(
        exc_type=ValueError, exc_value=ValueError("x"), exc_traceback=None, object=None
    )
    sys.unraisablehook(other)
    assert reports == [other]


# ------------------------------------------------------------------ metrics across resumes


def tfrecords(path: Path):
    """The records of a TFRecord file (length, its crc, data, its crc)."""
    data, at = path.read_bytes(), 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        yield data[at + 12 : at + 12 + length]
        at += 12 + length + 4


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag as TensorBoard shows them: event files read in name (time)
    order, and a SessionLog.START at step T purging every earlier event at step >= T."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in tfrecords(path):
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = {k: [(s, v) for s, v in rows if s < event.step] for k, rows in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_resumed_metrics_hold_one_record_per_step(tmp_path):
    first = MetricsWriter(tmp_path, total_steps=8, start_step=0)
    for step in range(1, 7):
        first.write(step, {"loss": 10.0 + step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # killed mid-write
    time.sleep(1.1)  # TensorBoard event files are named by the second they were opened

    resumed = MetricsWriter(tmp_path, total_steps=8, start_step=4)  # the checkpoint was step 4
    for step in range(5, 9):
        resumed.write(step, {"loss": 20.0 + step})
    resumed.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [(s, 10.0 + s) for s in range(1, 5)] + [(s, 20.0 + s) for s in range(5, 9)]
    assert [(r["step"], r["loss"]) for r in rows] == expected
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == expected


# ------------------------------------------------------------------ workdir and full disk


def config_with_missing_tokenizer() -> TrainConfig:
    """A config whose tokenizer does not exist: an error about the workdir proves the workdir
    was checked before anything was loaded."""
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.tokenizer = "/nonexistent/tokenizer.model"
    return TrainConfig.from_config_dict(c)


def test_workdir_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    config = config_with_missing_tokenizer()
    with pytest.raises(WorkdirError, match=r"^workdir .*/run is not a directory$"):
        loop.train(config, path)
    with pytest.raises(WorkdirError, match=r"/run/sub is not a directory \(.*/run is a file\)$"):
        loop.train(config, path / "sub")


def test_read_only_or_full_workdir_is_one_clear_error(tmp_path, monkeypatch):
    # Simulated: tests run as root, whom a read-only mode does not stop.
    def refuse(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(loop.tempfile, "mkstemp", refuse)
    config = config_with_missing_tokenizer()
    with pytest.raises(WorkdirError, match=r"workdir .*/new/run is not writable: Read-only"):
        loop.train(config, tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # nothing created
    monkeypatch.undo()

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop.os, "fsync", full)
    with pytest.raises(WorkdirError, match=r"is not writable: no space left on device$"):
        loop.train(config, tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_workdir_really(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WorkdirError, match="is not writable"):
            loop.check_workdir(tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)


# TensorStore's words for a write that hit a full disk (seen on a full tmpfs).
ENOSPC_FROM_TENSORSTORE = (
    'RESOURCE_EXHAUSTED: Error writing "w0/0" in OCDBT database at local file "...": Failed to '
    "write 417022 bytes to file 4: No space left on device [os_error_code='28']"
)


def test_full_disk_while_saving_is_one_clear_error(tmp_path, monkeypatch, caplog):
    ckdir = tmp_path / "checkpoints"
    ck = TrainCheckpointer(ckdir, keep=3, async_save=True)
    ck.save(2, state_at(2), {"pos": 2}, {}, force=True)

    # An async save fails in the background: the next save reports it, under its own step.
    def failed_background_save():
        raise ValueError(ENOSPC_FROM_TENSORSTORE)

    ck.wait()
    monkeypatch.setattr(ck.manager, "wait_until_finished", failed_background_save)
    ck._pending = 2  # as after ck.save(2) returned
    with pytest.raises(WorkdirError) as e:
        ck.save(4, state_at(4), {"pos": 4}, {}, force=True)
    assert str(e.value) == f"no space left on device while saving checkpoint step 2 to {ckdir}"
    with caplog.at_level("ERROR"):
        # Orbax's own reports of it (with tracebacks) are dropped while the checkpointer lives.
        logging.getLogger("absl").error("save failed", exc_info=ValueError(ENOSPC_FROM_TENSORSTORE))
        ck.close()  # repeats of the same failure are not raised again
    # Only the full disk's reports are the subject: other threads of earlier tests may log.
    disk_full = [
        r
        for r in caplog.records
        if "No space left" in r.getMessage() or (r.exc_info and "No space" in str(r.exc_info[1]))
    ]
    assert disk_full == [], [r.getMessage() for r in caplog.records]


def test_full_disk_in_a_synchronous_save_names_the_step(tmp_path, monkeypatch):
    ck = TrainCheckpointer(tmp_path / "checkpoints", keep=3, async_save=False)

    def full(*_a, **_k):
        raise ValueError(ENOSPC_FROM_TENSORSTORE)

    monkeypatch.setattr(ck.manager, "save", full)
    with pytest.raises(
        WorkdirError,
        match=r"^no space left on device while saving checkpoint step 6 to .*checkpoints$",
    ):
        ck.save(6, state_at(6), {"pos": 6}, {}, force=True)
    ck.close()


# ------------------------------------------------------------------ SIGKILL, damage, resume

STEPS, EVERY = 24, 2


def cli_train(assets, workdir: Path, env: dict) -> subprocess.Popen:
    data_dir, spm = assets
    args = [
        "--config=experiments/pretrain/tiny.py:runlocal",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.data.tokenizer={spm}",
        "--config.run.eval_every=0",
        f"--config.run.steps={STEPS}",
        "--config.run.log_every=1",
        f"--config.run.checkpoint_every={EVERY}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "train", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reference_config(assets) -> TrainConfig:
    """cli_train's config, for the uninterrupted run in this process."""
    data_dir, spm = assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every, c.run.steps, c.run.log_every, c.run.checkpoint_every = 0, STEPS, 1, EVERY
    return TrainConfig.from_config_dict(c)


def loss_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in row:
            rows.append(row)
    return rows


def run_until(proc, done, timeout: float = HANG_S) -> None:
    end = time.time() + timeout
    while not done():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{out}\n{err}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[1]}")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_several_times_with_a_damaged_checkpoint_ends_like_an_uninterrupted_run(
    demo_assets, xla_cache_dir, tmp_path
):
    # The uninterrupted run, in this process (a subprocess would add only its start-up: ~20 s
    # CPU importing TensorFlow, and torch through tensorboardX where installed). It fills the
    # run's compilation cache (or loads the step another module compiled) that every trainer
    # process then loads its step from.
    with persistent_compile_cache(xla_cache_dir) as env:
        loop.train(reference_config(demo_assets), tmp_path / "reference")
    env = {**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    rng = random.Random(os.getpid())
    workdir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    damaged = None
    outputs = []
    for kill in range(3):
        start = listed(ckdir) if ckdir.exists() else []
        proc = cli_train(demo_assets, workdir, env)
        # Killed at a random step once this process has committed a new checkpoint (two for
        # the first one, so that the damaged step has a good one before it).
        target = rng.randint(max(start, default=0) + 1, max(start, default=0) + 2 * EVERY)
        need = 2 if kill == 0 else 1

        def progressed(target=target, start=start, need=need):
            new = set(listed(ckdir)) - set(start) if ckdir.exists() else set()
            return len(new) >= need and any(r["step"] >= target for r in loss_rows(workdir))

        run_until(proc, progressed)
        proc.send_signal(signal.SIGKILL)
        outputs.append(proc.communicate()[1])
        if kill == 0:
            damaged = max(listed(ckdir))
            damage(ckdir / str(damaged))
    assert max(listed(ckdir)) < STEPS, "the run finished before its last kill"
    reference = {r["step"]: r for r in loss_rows(tmp_path / "reference")}
    assert sorted(reference) == list(range(1, STEPS + 1))
    final = cli_train(demo_assets, workdir, env)
    out, err = final.communicate(timeout=HANG_S)
    outputs.append(err)
    assert final.returncode == 0, err
    assert f"done at step {STEPS}" in out

    # The damaged step: one warning on stderr (no logging configured by the user), moved aside.
    warnings = [line for line in outputs[1].splitlines() if "could not be restored" in line]
    assert len(warnings) == 1 and f"checkpoint step {damaged} could not be restored" in warnings[0]
    assert (workdir / "checkpoints_damaged" / str(damaged)).is_dir()
    for text in outputs:
        assert "Event loop is closed" not in text and "Traceback" not in text

    # One record per step, each the uninterrupted run's: same loss, same batch.
    rows = loss_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["loss"] == reference[r["step"]]["loss"], r["step"]
        assert r["data_crc32"] == reference[r["step"]]["data_crc32"], r["step"]

    # The newest step restores, and it is the last one.
    ck = TrainCheckpointer(ckdir, keep=3, async_save=False)
    restored = ck.restore_latest(None)
    ck.close()
    assert restored is not None and restored[0] == STEPS == max(listed(ckdir))
    assert int(restored[1]["step"]) == STEPS
