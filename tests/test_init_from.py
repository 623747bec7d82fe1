"""`init_from`: a run started from a params export, a training run or an HF directory holds the
source's params at step 0 with a fresh optimizer; mismatches fail before anything is written;
a resume never reads init_from. The source run trains on user .jsonl files (data section).
A training run on gs:// (an in-memory object store, qwen_jax/testing/object_store.py) is a
source too; an export or HF directory there is one clear error."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qwen_jax.checkpoint import save_hf, save_params
from qwen_jax.sharding import make_mesh
from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import REPO
from qwen_jax.testing.object_store import object_store
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.train import checkpointing
from qwen_jax.train.checkpointing import TrainCheckpointer
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.export import restore_model
from qwen_jax.train.init_from import InitFromError, find_source
from qwen_jax.train.loop import model_vocab_size, train
from qwen_jax.train.step import build_steps


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_cache_dir):
    """The run's persistent compilation cache (tests/conftest.py, qwen_jax/testing/
    compile_cache.py): each train() builds the same step again; only the first compiles it."""
    with persistent_compile_cache(xla_cache_dir) as env:
        yield env


def _config(assets, data: str, **changes) -> TrainConfig:
    """The tiny runlocal experiment on `data`; `changes` are dotted keys ("run.steps")."""
    data_dir, spm = assets
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.data.mixture, c.data.eval_mixture = data, ""
    c.run.steps, c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 2, 1, 0, 0
    for key, value in changes.items():
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    return TrainConfig.from_config_dict(c)


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state)
    }


def _saved_state(config: TrainConfig, workdir):
    """(step, state) of the newest checkpoint of a run, restored like a resume would."""
    tok = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model_config(model_vocab_size(config, tok.vocab_size))
    steps = build_steps(config, model_cfg, make_mesh(config.mesh))
    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=1, async_save=False)
    try:
        step, state, _ = ckpt.restore_latest(steps.sharded_abstract_state())
    finally:
        ckpt.close()
    return step, state


@pytest.fixture(scope="module")
def source(demo_assets, tmp_path_factory):
    """A 2-step run on user files (train + held-out eval), and its params / HF exports."""
    root = tmp_path_factory.mktemp("init_from_source")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("heldout", 40)):
        lines = [
            json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words, 40))}) for i in range(n)
        ]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    config = _config(
        demo_assets,
        str(root / "train.jsonl"),
        **{"data.eval_mixture": str(root / "heldout.jsonl"), "run.eval_every": 2},
    )
    result = train(config, root / "run")
    evals = [r for r in result.history if "eval_loss" in r]
    assert len(evals) == 1 and np.isfinite(evals[0]["eval_loss"])
    _, model, _ = restore_model(root / "run")
    save_params(model, root / "params")
    save_hf(model, root / "hf")
    return root, _params(model), str(root / "train.jsonl")


@pytest.mark.parametrize("kind", ["run", "run/checkpoints", "params", "hf"])
def test_a_run_starts_from_the_source_params(demo_assets, source, tmp_path, kind):
    root, want, data = source
    # One step at learning rate 0: the weights stay the source's exactly.
    changes = {"run.steps": 1, "optim.peak_lr": 0.0}
    config = _config(demo_assets, data, init_from=str(root / kind), **changes)
    train(config, tmp_path / "new")
    step, state = _saved_state(config, tmp_path / "new")
    assert step == 1 and int(state["step"]) == 1
    # A fresh optimizer: its step counts are 1 (the source's optimizer had counted 2).
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0]
    assert counts and all(c == 1 for c in counts), counts
    got = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model.vocab_size": 2048}, r"vocabulary mismatch: the source has 1024 .* 2048"),
        ({"model.ffn_size": 192}, r"parameter mismatch: .* has shape \(2, (64, 176|176, 64)\) in"),
    ],
)
def test_a_mismatched_source_fails_and_writes_nothing(
    demo_assets, source, tmp_path, change, message
):
    root, _, data = source
    config = _config(demo_assets, data, init_from=str(root / "params"), **change)
    with pytest.raises(InitFromError, match=message):
        train(config, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_an_unknown_source_is_named(demo_assets, source, tmp_path):
    _, _, data = source
    (tmp_path / "empty").mkdir()
    config = _config(demo_assets, data, init_from=str(tmp_path / "empty"))
    with pytest.raises(InitFromError, match="is none of: a params export"):
        train(config, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_resume_wins_over_init_from(demo_assets, source, tmp_path):
    root, _, data = source
    # A copy of the source run (2 steps, checkpointed at its end, started without init_from).
    shutil.copytree(root / "run", tmp_path / "run")
    # The source does not exist: a resume must not even look at it.
    again = _config(
        demo_assets,
        data,
        init_from=str(tmp_path / "nowhere"),
        **{"data.eval_mixture": str(root / "heldout.jsonl"), "run.steps": 3},
    )
    result = train(again, tmp_path / "run")
    assert result.last_step == 3 and [r["step"] for r in result.history] == [3]


# ------------------------------------------------------------------ sources on gs://


@pytest.fixture
def store():
    with object_store() as gfile:
        yield gfile


def test_a_run_starts_from_a_training_run_on_gcs(demo_assets, source, tmp_path, store, monkeypatch):
    """pathlib read gs://bucket/base as the local folder gs:/bucket/base ("no such directory")."""
    root, want, data = source
    # The source run in the bucket: config.json and checkpoints/ on the store; TensorStore cannot
    # read ram://, so Orbax restores its steps from the local run (the one patched seam).
    store.makedirs("ram://gcs/bucket/base/checkpoints")
    store.copy(str(root / "run" / "config.json"), "ram://gcs/bucket/base/config.json")
    local_orbax = checkpointing._orbax_directory
    mirror = {"gs://bucket/base/checkpoints": root / "run" / "checkpoints"}
    monkeypatch.setattr(
        checkpointing, "_orbax_directory", lambda p: mirror.get(str(p)) or local_orbax(p)
    )
    for spelling in ("gs://bucket/base", "gs://bucket/base/checkpoints"):
        found = find_source(spelling)
        assert (found.kind, str(found.path)) == ("train", "gs://bucket/base/checkpoints")

    config = _config(
        demo_assets, data, init_from="gs://bucket/base", **{"run.steps": 1, "optim.peak_lr": 0.0}
    )
    train(config, tmp_path / "new")
    step, state = _saved_state(config, tmp_path / "new")
    assert step == 1
    got = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(state["params"])
    }
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_an_export_on_gcs_is_one_clear_error(demo_assets, source, tmp_path, store):
    _, _, data = source
    store.makedirs("ram://gcs/bucket/export/params")
    for name in ("qwen_config.json", "params/_METADATA"):
        with store.GFile(f"ram://gcs/bucket/export/{name}", "w") as f:
            f.write("{}")
    store.makedirs("ram://gcs/bucket/hf")
    for name in ("config.json", "model.safetensors"):
        with store.GFile(f"ram://gcs/bucket/hf/{name}", "w") as f:
            f.write("{}")
    config = _config(demo_assets, data, init_from="gs://bucket/export")
    with pytest.raises(InitFromError, match=r"is a params export on object storage") as e:
        train(config, tmp_path / "new")
    assert "\n" not in str(e.value) and "copy it to a local directory" in str(e.value)
    assert not (tmp_path / "new").exists()
    with pytest.raises(InitFromError, match=r"is a Hugging Face directory on object storage"):
        find_source("gs://bucket/hf")
    with pytest.raises(InitFromError, match=r"gs://bucket/nowhere'?: no such directory"):
        find_source("gs://bucket/nowhere")
    with pytest.raises(InitFromError, match=r"unsupported storage scheme"):
        find_source("ftp://host/run")
