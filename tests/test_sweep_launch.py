"""`qwen-jax sweep launch`: local sweeps train for real and resume; cloud commands are golden.

The local sweep is 4 points of the tiny experiment (`:runlocal`, a few steps each, the
`demo_assets` data and vocab) that differ only in run.seed, so one JAX compilation cache serves
every process. It is killed (the launcher and its running point, SIGKILL) once the 2nd point has
a checkpoint, then launched again: the finished point must not run again, the killed one must
resume in its workdir, the missing ones run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen_jax.cli import UsageError
from qwen_jax.cli import main as cli_main
from qwen_jax.sweep import backends, launch
from qwen_jax.sweep.collect import DONE, MISSING, PARTIAL, checkpoint_steps, point_status
from qwen_jax.sweep.spec import Sweep, load_sweep

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "sweep_golden"
STEPS = 12

LOCAL_SWEEP = """
from qwen_jax.sweep.spec import Sweep


def get_sweep():
    return Sweep(
        name="tiny_seeds",
        experiment="{experiment}",
        named={{"tiny": {{}}}},
        seeds=(0, 1, 2, 3),
        fixed={{
            "data.data_dir": "{data_dir}",
            "data.tokenizer": "{tokenizer}",
            "optim.warmup_steps": 2,
            "optim.total_steps": {steps},
            "run.steps": {steps},
            "run.log_every": 2,
            "run.eval_every": 0,
            "run.checkpoint_every": 2,
        }},
    )
"""


def _args(backend: str, root, dry_run: bool = False) -> argparse.Namespace:
    return argparse.Namespace(backend=backend, dry_run=dry_run, root=str(root))


def _launch(sweep, backend: str, root, dry_run: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = launch.main_launch(sweep, _args(backend, root, dry_run))
    return rc, out.getvalue()


def _child_env(cache: Path) -> dict[str, str]:
    """One CPU device (not conftest's 8) and one compilation cache for every train process."""
    return {
        "XLA_FLAGS": "",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def _launches(workdir: str) -> int:
    """How many times the launcher started this point (one header line per attempt)."""
    log = Path(workdir) / backends.LOG_NAME
    return log.read_text().count("# launch ") if log.exists() else 0


def _files(workdir: str) -> dict[str, int]:
    """Every file under a workdir with its modification time (ns): a rerun changes them."""
    root = Path(workdir)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _wait(proc, condition, what: str, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) before {what}")
        if time.time() > end:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed_then_relaunched(demo_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep_launch")
    data_dir, spm = demo_assets
    sweep_file = tmp / "tiny_seeds.py"
    sweep_file.write_text(
        LOCAL_SWEEP.format(
            experiment=f"{REPO}/experiments/pretrain/tiny.py:runlocal",
            data_dir=data_dir,
            tokenizer=spm,
            steps=STEPS,
        )
    )
    sweep, root = load_sweep(str(sweep_file)), tmp / "root"
    points = sweep.points()
    workdirs = [sweep.workdir(str(root), p) for p in points]
    env = _child_env(tmp / "jax_cache")

    # 1. `qwen-jax sweep launch`, killed with its running point once point 2 has a checkpoint.
    argv = ["sweep", "launch", str(sweep_file), "--backend=local", f"--root={root}"]
    with open(tmp / "first.out", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_jax.cli", *argv],
            cwd=tmp,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes the point too
        )
        _wait(proc, lambda: bool(checkpoint_steps(workdirs[1])), "point 2's first checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = {
        "status": [point_status(w) for w in workdirs],
        "steps_2": checkpoint_steps(workdirs[1]),
        "files_1": _files(workdirs[0]),
        "config_2": (Path(workdirs[1]) / "config.json").stat().st_mtime_ns,
    }

    # 2. Launched again, in this process.
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        start = time.monotonic()
        rc, out = _launch(sweep, "local", root)
        took = time.monotonic() - start
        # 3. Once more: everything is done, nothing runs.
        files = {w: _files(w) for w in workdirs}
        rc3, out3 = _launch(sweep, "local", root)
    return dict(
        sweep=sweep, workdirs=workdirs, first=first, rc=rc, out=out, took=took,
        files=files, rc3=rc3, out3=out3,
    )  # fmt: skip


@pytest.mark.slow
def test_local_sweep_killed_then_relaunched_completes(killed_then_relaunched):
    r = killed_then_relaunched
    # The kill left point 1 done, point 2 partial (a checkpoint before its last step), 3-4 missing.
    assert r["first"]["status"] == [DONE, PARTIAL, MISSING, MISSING]
    assert r["first"]["steps_2"] and max(r["first"]["steps_2"]) < STEPS
    assert r["rc"] == 0, r["out"]
    for workdir in r["workdirs"]:
        assert point_status(workdir) == DONE
        losses = [
            row["step"]
            for row in map(json.loads, (Path(workdir) / "metrics.jsonl").read_text().splitlines())
            if "loss" in row
        ]
        assert losses == list(range(2, STEPS + 1, 2)), workdir  # one record per logged step


@pytest.mark.slow
def test_relaunch_runs_only_what_was_missing(killed_then_relaunched):
    r = killed_then_relaunched
    w = r["workdirs"]
    # Point 1 finished before the kill: skipped, not one of its files touched.
    assert f"[1] {r['sweep'].points()[0].name}: done, skipped" in r["out"]
    assert _launches(w[0]) == 1
    assert r["files"][w[0]] == r["first"]["files_1"]
    # Point 2 ran again in the same workdir and resumed: config.json is written only by a run
    # that starts from scratch.
    assert _launches(w[1]) == 2
    assert (Path(w[1]) / "config.json").stat().st_mtime_ns == r["first"]["config_2"]
    assert [_launches(x) for x in w[2:]] == [1, 1]
    # A third launch finds every point done and runs nothing.
    assert r["rc3"] == 0
    assert r["out3"].count("done, skipped") == 4
    assert {x: _files(x) for x in w} == r["files"]


@pytest.mark.slow
def test_collect_of_the_real_sweep_equals_each_points_metrics(killed_then_relaunched, tmp_path):
    """`collect` on the 4 trained points: results.csv's metric is each point's own last loss
    record in its metrics.jsonl (read here with json, not with the sweep's reader), the rows are
    sorted by it, and the plots are PNG files."""
    import csv

    from qwen_jax.sweep.collect import collect

    r = killed_then_relaunched
    sweep, workdirs = r["sweep"], r["workdirs"]
    paths = collect(sweep, str(Path(workdirs[0]).parents[1]), tmp_path / "report")
    with open(tmp_path / "report" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    want = {}
    for point, workdir in zip(sweep.points(), workdirs):
        records = [
            json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
        ]
        want[point.name] = [x[sweep.metric] for x in records if sweep.metric in x][-1]
    assert {row["point"]: float(row[sweep.metric]) for row in rows} == want
    values = [float(row[sweep.metric]) for row in rows]
    assert values == sorted(values, reverse=sweep.mode == "max")
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_ctrl_c_stops_the_running_point_and_the_launch(demo_assets, tmp_path):
    """SIGINT to the launcher alone (as `kill -INT` sends it) stops the running point too; the
    launch ends with exit 130 and starts nothing else."""
    data_dir, spm = demo_assets
    sweep_file = tmp_path / "tiny_seeds.py"
    sweep_file.write_text(
        LOCAL_SWEEP.format(
            experiment=f"{REPO}/experiments/pretrain/tiny.py:runlocal",
            data_dir=data_dir,
            tokenizer=spm,
            steps=STEPS,
        )
    )
    sweep, root = load_sweep(str(sweep_file)), tmp_path / "root"
    workdirs = [sweep.workdir(str(root), p) for p in sweep.points()]
    argv = ["sweep", "launch", str(sweep_file), "--backend=local", f"--root={root}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", *argv],
        cwd=tmp_path,
        env={**os.environ, **_child_env(tmp_path / "jax_cache")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no terminal: only the launcher gets the signal
    )
    _wait(proc, lambda: _launches(workdirs[0]) == 1, "the first point's start", timeout=300)
    time.sleep(1.0)  # the point's process is running
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "qwen-jax sweep: error: interrupted" in err
    assert "interrupted; launch again to resume it" in out
    assert point_status(workdirs[0]) != DONE  # stopped, not run to its end
    assert not Path(workdirs[1]).exists()
    assert not _processes_naming(str(root)), "the point's train process outlived the launcher"


def _processes_naming(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


# ----------------------------------------------------------------------------- cloud commands


CLOUD_SWEEP = """
from qwen_jax.sweep.spec import Grid, Launch, Sweep


def get_sweep(**launch_overrides):
    # Two points of the 7B experiment on a multi-host v5p-64 slice (32 chips, 8 hosts).
    settings = dict(
        topology="v5p-64",
        zone="us-east5-a",
        runtime_version="v2-alpha-tpuv5",
        project="my-project",
        gcs_root="gs://my-bucket/sweeps",
        cluster="my-v5p-cluster",
        docker_image="us-docker.pkg.dev/my-project/images/qwen-jax:latest",
        setup="pip install --quiet 'qwen-jax[tpu]'",
    )
    settings.update(launch_overrides)
    return Sweep(
        name="qwen_7b_lr",
        experiment="experiments/pretrain/qwen_7b.py",
        space=Grid({"optim.peak_lr": [1.5e-4, 3e-4]}),
        fixed={
            "data.data_dir": "gs://my-bucket/corpora",
            "run.steps": 2000,
            "run.checkpoint_every": 500,
            "tpu.topology": "v5p-64",
        },
        metric="eval_loss",
        launch=Launch(**settings),
    )
"""


def _cloud_sweep(**launch_overrides) -> Sweep:
    namespace: dict = {}
    exec(CLOUD_SWEEP, namespace)  # the same text the CLI test loads as a sweep file
    return namespace["get_sweep"](**launch_overrides)


@pytest.mark.parametrize("backend", ["tpu-vm", "xpk"])
def test_dry_run_commands_match_the_golden_files(backend, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the experiment path is relative to the checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # neither gcloud nor xpk: a dry run needs none
    sweep = _cloud_sweep()
    sweep.validate()
    rc, out = _launch(sweep, backend, "gs://my-bucket/sweeps", dry_run=True)
    assert rc == 0
    golden = GOLDEN / f"{backend.replace('-', '_')}_v5p_64.txt"
    if os.environ.get("QWEN_JAX_UPDATE_GOLDEN") == "1":
        golden.write_text(out)
    assert out == golden.read_text()


def test_train_line_parses_back_to_each_points_config(monkeypatch):
    """The overrides on a point's train line, read by `qwen-jax train`'s own flag parser, give
    exactly the config the sweep validated for that point."""
    from qwen_jax.train.cli import _flag_values
    from qwen_jax.train.config import TrainConfig

    monkeypatch.chdir(REPO)
    sweep = _cloud_sweep()
    for point, config in sweep.validate():
        argv = backends.train_argv(sweep.experiment, "/tmp/unused", point.overrides)
        assert argv[:2] == ["qwen-jax", "train"]
        parsed = TrainConfig.from_config_dict(_flag_values("train", argv[2:]).config)
        assert parsed == config, point.name
        assert parsed.optim.peak_lr == point.overrides["optim.peak_lr"]


def test_multi_host_slice_figures_and_names():
    assert backends.slice_hosts("v5p-64") == (32, 8)
    assert backends.slice_hosts("v5e-8") == (8, 1)
    assert backends.slice_hosts("v6e-64") == (64, 16)
    assert backends.accelerator_type("v5e-16") == "v5litepod-16"
    sweep = _cloud_sweep()
    names = [backends.job_name(sweep, p) for p in sweep.points()]
    assert len(set(names)) == 2
    for name in names:  # xpk's rule for workload names
        assert len(name) <= 40 and name[0].isalpha() and name.replace("-", "").isalnum()
        assert name == name.lower()


@pytest.mark.parametrize(("backend", "tool"), [("tpu-vm", "gcloud"), ("xpk", "xpk")])
def test_missing_launcher_is_one_error_before_anything_runs(
    backend, tool, tmp_path, capsys, monkeypatch
):
    sweep_file = tmp_path / "cloud.py"
    sweep_file.write_text(CLOUD_SWEEP)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(REPO)
    rc = cli_main(["sweep", "launch", str(sweep_file), f"--backend={backend}"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines() == [
        f"qwen-jax sweep: error: --backend={backend} needs `{tool}` on PATH and it is not there"
        f" ({(backends.TpuVm if tool == 'gcloud' else backends.Xpk).install}); --dry-run prints the"
        " commands without it"
    ]
    assert out == ""  # nothing launched, nothing printed


def test_root_that_cannot_hold_the_workdirs_is_one_error(tmp_path, monkeypatch):
    sweep = _cloud_sweep()
    blocker = tmp_path / "root"
    blocker.write_text("a file, not a directory")
    with pytest.raises(
        UsageError, match=r"sweep root .*/root cannot hold the workdirs: .*is a file"
    ):
        _launch(sweep, "local", blocker)

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    from qwen_jax.train import loop

    monkeypatch.setattr(loop.tempfile, "mkstemp", read_only)
    with pytest.raises(UsageError, match=r"is not writable: Read-only file system$"):
        _launch(sweep, "local", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()

    with pytest.raises(UsageError, match=r"--root must be a local path, not gs://b/x"):
        _launch(sweep, "local", "gs://b/x")
    with pytest.raises(UsageError, match=r"root must be gs://BUCKET/.*got '/tmp/x'"):
        _launch(sweep, "tpu-vm", "/tmp/x", dry_run=True)
    no_cluster = _cloud_sweep(cluster=None)
    with pytest.raises(UsageError, match=r"sets no launch.cluster"):
        _launch(no_cluster, "xpk", "gs://b/x", dry_run=True)
    with pytest.raises(UsageError, match=r"launch.num_slices=2 needs --backend=xpk"):
        _launch(_cloud_sweep(num_slices=2), "tpu-vm", "gs://b/x", dry_run=True)


FAKE_TOOL = """#!/bin/sh
# Records each call (one argument per line, then ---); a queued resource is first absent, then
# WAITING_FOR_RESOURCES, then ACTIVE; `tpu-vm ssh` exits with $FAKE_SSH_RC.
printf '%s\\n' "$(basename "$0")" "$@" --- >> "$FAKE_LOG"
if [ "$3 $4" = "queued-resources describe" ]; then
  n=$(cat "$FAKE_LOG.$5" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_LOG.$5"
  [ "$n" = 0 ] && exit 1
  [ "$n" = 1 ] && echo WAITING_FOR_RESOURCES || echo ACTIVE
fi
[ "$3 $4" = "tpu-vm ssh" ] && exit "${FAKE_SSH_RC:-0}"
exit 0
"""


def _fake_tools(tmp_path, monkeypatch, statuses) -> Path:
    """gcloud and xpk replaced by FAKE_TOOL on PATH; point_status answers from `statuses`
    (workdir -> status before the point ran; "done" once its ssh ran)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("gcloud", "xpk"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(backends, "POLL_S", 0.0)

    def status(workdir):
        ran = log.exists() and f"--workdir={workdir}" in log.read_text()
        return DONE if ran and os.environ.get("FAKE_SSH_RC", "0") == "0" else statuses[workdir]

    from qwen_jax.sweep import collect

    monkeypatch.setattr(collect, "point_status", status)
    return log


def _calls(log: Path) -> list[list[str]]:
    calls = log.read_text().split("---\n")
    return [c.splitlines() for c in calls if c]


@pytest.mark.parametrize("ssh_rc", [0, 1])
def test_tpu_vm_runs_the_dry_run_commands_and_always_deletes_the_slice(
    ssh_rc, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FAKE_SSH_RC", str(ssh_rc))
    sweep, root = _cloud_sweep(), "gs://my-bucket/sweeps"
    points = sweep.points()
    done, todo = (sweep.workdir(root, p) for p in points)
    log = _fake_tools(tmp_path, monkeypatch, {done: DONE, todo: MISSING})
    rc, out = _launch(sweep, "tpu-vm", root)
    backend = backends.TpuVm(sweep)
    job = backends.Job(points[1], todo, MISSING)
    name = backend.names(job)
    describe = backend.describe(name)
    # The finished point is skipped; the other one: look, create, wait for ACTIVE, copy the
    # experiment, train on every host, delete, whether the training succeeded or not.
    assert _calls(log) == [
        describe,
        backend.create(name),
        describe,
        describe,
        backend.copy(name),
        backend.ssh(name, job),
        backend.delete(name),
    ]
    assert f"[1] {points[0].name}: done, skipped" in out
    assert rc == ssh_rc
    assert (f"[2] {points[1].name}: failed (exit 1)" in out) == bool(ssh_rc)
    # What ran is what the dry run prints.
    _, dry = _launch(sweep, "tpu-vm", root, dry_run=True)
    for call in (backend.create(name), backend.copy(name), backend.ssh(name, job)):
        assert backends.shell(call) in dry


def test_xpk_submits_each_point_and_replaces_an_unfinished_one(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep, root = _cloud_sweep(), "gs://my-bucket/sweeps"
    points = sweep.points()
    partial, missing = (sweep.workdir(root, p) for p in points)
    log = _fake_tools(tmp_path, monkeypatch, {partial: PARTIAL, missing: MISSING})
    rc, out = _launch(sweep, "xpk", root)
    backend = backends.Xpk(sweep)
    jobs = [backends.Job(points[0], partial, PARTIAL), backends.Job(points[1], missing, MISSING)]
    assert rc == 0
    assert _calls(log) == [
        backend.delete(jobs[0]),
        backend.create(jobs[0]),
        backend.create(jobs[1]),
    ]
    assert out.count(": submitted in") == 2


def _finished(workdir: str, steps: int, loss: float) -> None:
    """A workdir as a finished run leaves it (config, last checkpoint, metrics)."""
    path = Path(workdir)
    (path / "checkpoints" / str(steps)).mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"run": {"steps": steps}}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": steps, "loss": loss}) + "\n")


def test_bayes_launch_moves_on_once_a_batch_is_finished(tmp_path):
    from qwen_jax.sweep.spec import Bayes, log_uniform

    sweep = Sweep(
        name="bayes",
        experiment=f"{REPO}/experiments/pretrain/tiny.py:runlocal",
        space=Bayes({"optim.peak_lr": log_uniform(1e-4, 1e-2)}, num_points=4, batch=2, seed=0),
        fixed={"run.steps": 4},
    )
    first = sweep.points()
    assert len(first) == 2
    _finished(sweep.workdir(str(tmp_path), first[0]), 4, 3.0)
    _, out = _launch(sweep, "local", tmp_path, dry_run=True)
    assert "[3]" not in out  # a batch with an unfinished point suggests nothing yet
    _finished(sweep.workdir(str(tmp_path), first[1]), 4, 2.0)
    _, out = _launch(sweep, "local", tmp_path, dry_run=True)
    assert out.count("done, skipped") == 2
    following = sweep.suggest([(first[0], 3.0), (first[1], 2.0)])
    assert len(following) == 2
    for i, point in enumerate(following, 3):
        assert f"# [{i}] {point.name} -> {sweep.workdir(str(tmp_path), point)}" in out
    assert "[5]" not in out  # the budget of 4 points is spent
