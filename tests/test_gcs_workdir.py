"""Training workdirs on object storage (gs://), tested offline (issue 18).

The store is qwen_jax/testing/object_store.py's: TensorFlow's in-memory `ram://` filesystem
behind etils.epath, behaving like an object store (no append, no directory rename), gs:// served
from ram://gcs/. Orbax cannot write ram:// (TensorStore rejects `ram:/...`: "Checkpoint path
should be absolute"), so the end-to-end test keeps the Orbax checkpoints in a local folder (one
patched seam, checkpointing._orbax_directory) and everything else of the workdir on the store.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import REPO
from qwen_jax.testing.object_store import object_store
from qwen_jax.train import checkpointing
from qwen_jax.train.checkpointing import WorkdirError, workdir_path
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.loop import check_workdir, train


@pytest.fixture(scope="module")
def store():
    """ram:// routed through epath as an object store (qwen_jax/testing/object_store.py); yields
    tf.io.gfile to inspect it."""
    with object_store() as gfile:
        yield gfile


def test_uri_workdir_is_not_a_local_folder():
    """pathlib turned gs://b/run into the local folder gs:/b/run (the defect)."""
    path = workdir_path("gs://bucket/sweep/point-1")
    assert str(path / "metrics.jsonl") == "gs://bucket/sweep/point-1/metrics.jsonl"
    assert str(workdir_path("runs/a") / "config.json") == "runs/a/config.json"
    with pytest.raises(ValueError, match="unsupported storage scheme"):
        workdir_path("ftp://host/run")


def test_check_workdir_on_the_store(store, monkeypatch):
    check_workdir("ram://check/new/run")  # created, probed
    assert store.isdir("ram://check/new/run")
    assert store.listdir("ram://check/new/run") == []  # the probe object is gone

    with store.GFile("ram://check/object", "w") as f:
        f.write("x")
    with pytest.raises(WorkdirError, match="not a directory"):
        check_workdir("ram://check/object")

    from etils.epath import gpath

    def denied(self, data):
        import tensorflow as tf

        raise tf.errors.PermissionDeniedError(None, None, "403 caller lacks storage.objects.create")

    monkeypatch.setattr(gpath._GPath, "write_bytes", denied)
    with pytest.raises(WorkdirError, match="not writable: 403 caller lacks") as e:
        check_workdir("ram://check/denied")
    assert "\n" not in str(e.value)


def test_gcs_steps_count_only_once_committed(store):
    """On gs:// Orbax writes a step in place and commits it with commit_success.txt last."""
    from qwen_jax.train.checkpointing import has_checkpoint

    check_workdir("gs://bucket/run")
    assert store.isdir("ram://gcs/bucket/run")  # the gs:// path reached the (fake) bucket
    step = "gs://bucket/run/checkpoints/3"
    workdir_path(step).mkdir(parents=True)
    (workdir_path(step) / "state").write_text("partial")
    assert not has_checkpoint("gs://bucket/run/checkpoints")  # a save still in flight
    (workdir_path(step) / "commit_success.txt").write_text("")
    assert has_checkpoint("gs://bucket/run/checkpoints")


def _tiny(assets, **run) -> TrainConfig:
    data_dir, spm = assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every = 0
    for k, v in run.items():
        c.run[k] = v
    return TrainConfig.from_config_dict(c)


def _read_json(store, path):
    with store.GFile(path, "r") as f:
        return json.loads(f.read())


def _records(store, path):
    with store.GFile(path, "r") as f:
        return [json.loads(line) for line in f.read().splitlines()]


def test_metrics_go_up_whole_at_sync_and_close(store):
    """No append on the store: records are staged locally, uploaded at sync() (each checkpoint)
    and close(); a resumed writer drops the records past its start step."""
    from qwen_jax.train.metrics import MetricsWriter

    wd = "ram://metrics/run"
    writer = MetricsWriter(wd, total_steps=4, start_step=0)
    for step in (1, 2):
        writer.write(step, {"loss": float(step)})
    writer.sync()
    assert [r["step"] for r in _records(store, f"{wd}/metrics.jsonl")] == [1, 2]
    writer.write(3, {"loss": 3.0})
    assert [r["step"] for r in _records(store, f"{wd}/metrics.jsonl")] == [1, 2]  # lags
    writer.close()
    assert [r["step"] for r in _records(store, f"{wd}/metrics.jsonl")] == [1, 2, 3]
    assert not os.path.exists(writer.staging)

    resumed = MetricsWriter(wd, total_steps=4, start_step=1)  # its checkpoint was step 1
    for step in (2, 3, 4):
        resumed.write(step, {"loss": 10.0 * step})
    resumed.close()
    rows = _records(store, f"{wd}/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    events = [n for n in store.listdir(f"{wd}/tensorboard") if n.startswith("events.")]
    assert len(events) == 2, events  # one file per writer, side by side


@pytest.mark.slow  # two tiny trainings, at most one compilation (the rest load from the cache)
def test_train_resume_and_restore_on_the_store(
    store, demo_assets, xla_cache_dir, tmp_path, monkeypatch
):
    """A tiny run into ram://, resumed from an earlier checkpoint, then restored for serving."""
    with persistent_compile_cache(xla_cache_dir):  # the run's cache (conftest.py), a local folder
        _train_resume_and_restore(store, demo_assets, tmp_path, monkeypatch)


def _train_resume_and_restore(store, demo_assets, tmp_path, monkeypatch):
    # TensorStore cannot reach ram:// (module docstring): Orbax's directory is mirrored locally.
    local = tmp_path / "orbax"

    def orbax_directory(path):
        path = workdir_path(path)
        return local / str(path).removeprefix("ram://") if str(path).startswith("ram://") else path

    monkeypatch.setattr(checkpointing, "_orbax_directory", orbax_directory)
    monkeypatch.chdir(tmp_path)  # the old defect would write a local folder `ram:` here
    wd = "ram://bucket/sweep/point"
    cfg = _tiny(demo_assets, steps=4, log_every=1, checkpoint_every=2, async_checkpoints=False)
    first = train(cfg, wd)
    assert first.last_step == 4
    assert not os.path.exists(tmp_path / "ram:")
    assert _read_json(store, f"{wd}/config.json")["run"]["steps"] == 4
    assert [r["step"] for r in _records(store, f"{wd}/metrics.jsonl")] == [1, 2, 3, 4]
    checkpoints = local / "bucket/sweep/point/checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4"]

    # A run killed after logging steps 3-4 but before checkpoint 4 committed: resume from 2.
    shutil.rmtree(checkpoints / "4")
    resumed = train(cfg, wd)
    assert resumed.history[0]["step"] == 3
    rows = _records(store, f"{wd}/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 3-4 once, from the resumed run
    assert [r["loss"] for r in rows[2:]] == [r["loss"] for r in resumed.history]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in first.history[:2]]
    # TensorBoard: each run's event file uploaded beside the other's.
    events = [n for n in store.listdir(f"{wd}/tensorboard") if n.startswith("events.")]
    assert len(events) == 2, events

    from qwen_jax.infer.load import is_training_workdir, model_config
    from qwen_jax.train.export import restore_model

    assert is_training_workdir(wd)
    step, model, run = restore_model(wd, mesh=None)
    assert step == 4 and run["run"]["steps"] == 4
    assert model.cfg == model_config(wd)
