"""The training loop end to end on the demo corpus: exact resume after SIGKILL, preemption,
damaged checkpoints, config mismatch, multi-host, and every experiment file."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import EXPERIMENTS, REPO
from qwen_jax.train.checkpointing import ConfigMismatchError
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.loop import train

# A guard against a hang, not a speed check: sized for a loaded 2-core machine (the suite runs
# two workers, and these tests start training subprocesses).
HANG_S = 900


def tiny_config(assets, **run) -> TrainConfig:
    data_dir, spm = assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every = 0
    for k, v in run.items():
        c.run[k] = v
    return TrainConfig.from_config_dict(c)


def cli_args(assets, workdir, **run):
    data_dir, spm = assets
    args = [
        "--config=experiments/pretrain/tiny.py:runlocal",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        f"--config.data.tokenizer={spm}",
        "--config.run.eval_every=0",
    ]
    args += [f"--config.run.{k}={v}" for k, v in run.items()]
    return args


def spawn(args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "train", *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(rows) -> dict[int, dict]:
    """Last row per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for r in rows:
        if "loss" in r:
            out[r["step"]] = r
    return out


def wait_for_step(proc, workdir: Path, step: int, timeout: float = HANG_S) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()}")
        if any(r.get("step", 0) >= step for r in metric_rows(workdir)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout} s")


def wait_for_committed_checkpoint(proc, workdir: Path, timeout: float = HANG_S) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no committed checkpoint within {timeout} s")


STEPS = 12


def uninterrupted_config(assets) -> TrainConfig:
    return tiny_config(assets, steps=STEPS, log_every=1, checkpoint_every=3)


@pytest.fixture(scope="module")
def uninterrupted(demo_assets, tmp_path_factory):  # noqa: F811
    """(loss rows by step, workdir) of a 12-step run; its workdir (checkpoints 9 and 12, the
    tiny experiment keeping 2) is also the finished run the damage and mismatch tests copy."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train(uninterrupted_config(demo_assets), workdir)
    rows = by_step(metric_rows(workdir))
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows, workdir


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_cache_dir):
    """The run's persistent compilation cache (conftest.py) for this module's runs, in process
    and in the kill and preemption subprocesses (its value is their environment; qwen_jax/
    testing/compile_cache.py): each run builds the same step again, and only the first run of
    the suite compiles it."""
    with persistent_compile_cache(xla_cache_dir) as env:
        yield env


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(demo_assets, uninterrupted, compile_cache, tmp_path):
    uninterrupted, _ = uninterrupted
    kill_at = random.Random(os.getpid()).randint(4, STEPS - 2)
    args = cli_args(demo_assets, tmp_path, steps=STEPS, log_every=1, checkpoint_every=3)
    proc = spawn(args, env=compile_cache)
    wait_for_step(proc, tmp_path, kill_at)
    # Checkpoints are async: kill only once one is committed (Orbax renames "3.orbax-checkpoint-
    # tmp" to "3"), or the resume would rightly start from scratch and test nothing.
    wait_for_committed_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_rows = by_step(metric_rows(tmp_path))
    assert max(killed_rows) < STEPS, "the run finished before it was killed"

    result = train(uninterrupted_config(demo_assets), tmp_path)
    resumed_from = result.history[0]["step"] - 1
    assert 0 < resumed_from <= max(killed_rows)
    rows = by_step(metric_rows(tmp_path))
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        # Bit-identical losses, and the very same batch at every step: nothing seen twice or
        # skipped across the kill.
        assert rows[step]["loss"] == uninterrupted[step]["loss"], step
        assert rows[step]["data_crc32"] == uninterrupted[step]["data_crc32"], step


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(demo_assets, compile_cache, tmp_path):
    args = cli_args(demo_assets, tmp_path, steps=500, log_every=1, checkpoint_every=0)
    proc = spawn(args, env=compile_cache)
    wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, out
    assert "preempted, checkpoint saved at step" in out
    saved = int(out.rsplit("at step", 1)[1].split()[0])
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [saved] and saved >= 3


def test_damaged_latest_checkpoint_falls_back(demo_assets, uninterrupted, tmp_path, caplog):
    shutil.copytree(uninterrupted[1], tmp_path, dirs_exist_ok=True)  # a finished run
    saved = (tmp_path / "checkpoints").iterdir()
    assert sorted(int(p.name) for p in saved if p.name.isdigit()) == [9, 12]
    state_dir = tmp_path / "checkpoints" / "12" / "state"
    damaged = [p for p in state_dir.rglob("*") if p.is_file()]
    assert damaged
    for p in damaged:
        p.write_bytes(b"")  # truncated files, as after a failed disk
    with caplog.at_level("WARNING"):
        result = train(uninterrupted_config(demo_assets), tmp_path)
    assert result.history[0]["step"] == 10  # resumed from step 9
    assert any("step 12 could not be restored" in r.message for r in caplog.records)


def test_config_mismatch_is_refused_unless_forced(demo_assets, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted[1], tmp_path, dirs_exist_ok=True)  # a finished 12-step run
    data_dir, spm = demo_assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every, c.run.steps = 0, STEPS + 2  # a longer run is allowed...
    c.optim.peak_lr = 1e-4  # ...a different learning rate is not
    other = TrainConfig.from_config_dict(c)
    with pytest.raises(ConfigMismatchError, match=r"optim.peak_lr: saved 0.003"):
        train(other, tmp_path)
    assert train(other, tmp_path, force=True).last_step == STEPS + 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(demo_assets, tmp_path):  # noqa: F811
    steps = 6
    one = train(TrainConfig.from_config_dict(_with_shards(demo_assets, steps)), tmp_path / "one")
    port = _free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    args = cli_args(demo_assets, tmp_path / "two", steps=steps, log_every=1)
    args.append("--config.data.num_shards=2")
    procs = [
        spawn(
            [
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=HANG_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    two = by_step(metric_rows(tmp_path / "two"))
    ref = {r["step"]: r for r in one.history if "loss" in r}
    assert sorted(two) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert two[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
    assert ref[steps]["loss"] < ref[1]["loss"]


def _with_shards(assets, steps):
    data_dir, spm = assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every, c.run.steps, c.run.log_every = 0, steps, 1
    c.data.num_shards = 2
    return c


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_loads(path):
    text = path.read_text()
    for needle in ("Hardware", "Expected", "Metric", "qwen-jax", ":runlocal"):
        assert needle in text, f"{path.name} docstring lacks {needle!r}"
    full = TrainConfig.from_config_dict(load_experiment(path))
    local = TrainConfig.from_config_dict(load_experiment(path, "runlocal"))
    assert local.model_config().num_params() < 10_000_000
    if full.model_preset != "tiny":
        assert full.tpu.topology, f"{path.name} declares no TPU topology"
    from qwen_jax.data.pipeline import registered_names

    for name in (full.data.mixture, full.data.eval_mixture, local.data.mixture):
        assert name in registered_names(), f"{path.name}: mixture {name!r} is not registered"
