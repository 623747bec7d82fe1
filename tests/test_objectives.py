"""Objectives plug into the one train step: declared features and abstract batches, per-feature
shardings, a new objective (with a per-example feature) trained with exact accumulation on 8
devices, and the objective config section."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qwen_jax import sharding
from qwen_jax.model.logprobs import token_logprobs
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.objectives import (
    Feature,
    LMObjective,
    Objective,
    ObjectiveConfig,
    make_objective,
)
from qwen_jax.train.optim import OptimConfig
from qwen_jax.train.step import StepConfig, build_steps

B, T, VOCAB = 8, 16, 128


@dataclasses.dataclass(frozen=True)
class LastTokenObjective(Objective):
    """A toy classification objective: -log p(label_b) at each row's last position, one weight
    per sequence (what a reward/DPO objective looks like to the step: [B] features, a weight
    that is not a token count)."""

    features = (Feature("tokens"), Feature("label", per_token=False))
    weight_name = "sequences"

    def loss_sums(self, model, batch, ctx):
        h_btd, _ = model(batch["tokens"], return_hidden=True)
        logp_b1, _ = token_logprobs(
            h_btd[:, -1:], model.head_weight().astype(h_btd.dtype), batch["label"][:, None]
        )
        nll = -jnp.sum(logp_b1)
        return nll, {"nll": nll, "sequences": jnp.asarray(batch["label"].shape[0], jnp.float32)}


def test_lm_objective_declares_its_batch():
    obj = make_objective(ObjectiveConfig(z_loss=1e-4, loss_chunk=8))
    assert obj == LMObjective(z_loss=1e-4, chunk=8)
    batch = obj.abstract_batch(4, 32)
    assert list(batch) == [
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "decoder_segment_ids",
        "decoder_positions",
    ]
    assert all(a.shape == (4, 32) and a.dtype == jnp.int32 for a in batch.values())
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        make_objective(ObjectiveConfig(name="ppo"))


def _config(microbatches: int) -> TrainConfig:
    return TrainConfig(
        model_preset="tiny",
        model_overrides=(("num_kv_heads", 2), ("vocab_size", VOCAB)),
        optim=OptimConfig(peak_lr=1e-2, warmup_steps=2, total_steps=10),
        step=StepConfig(microbatches=microbatches),
        mesh=sharding.MESH_PRESETS["fsdp"],
    )


def _run(microbatches: int):
    config = _config(microbatches)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices())
    steps = build_steps(config, config.model_config(), mesh, objective=LastTokenObjective())
    rng = np.random.default_rng(0)
    host = {
        "tokens": rng.integers(1, VOCAB, size=(B, T)).astype(np.int32),
        "label": rng.integers(0, VOCAB, size=(B,)).astype(np.int32),
    }
    out = []
    with jax.set_mesh(mesh):
        state = steps.init()
        batch = steps.device_batch(host)
        for _ in range(3):
            state, metrics = steps.train(state, batch)
            out.append({k: float(v) for k, v in metrics.items()})
        sums = jax.device_get(steps.evaluate(state, batch))
    return steps, out, sums


@pytest.fixture(scope="module")
def whole_batch():
    """_run(1): the steps, metrics and eval sums without accumulation (two tests read it)."""
    return _run(1)


def test_a_new_objective_trains_with_exact_accumulation(whole_batch):
    steps, whole, sums = whole_batch
    _, split, _ = _run(4)
    # Per-feature shardings: rows over the data axes, positions replicated.
    assert steps.batch_shardings["tokens"].spec[1:] in ((), (None,))
    assert len(steps.batch_shardings["label"].spec) <= 1
    assert steps.abstract_batch(B, T)["label"].shape == (B,)
    assert set(whole[0]) == {"nll", "sequences", "grad_norm", "param_norm"}
    assert whole[0]["sequences"] == B  # the weight is reported as a sum, the rest divided by it
    assert whole[-1]["nll"] < whole[0]["nll"]  # it learns the labels
    for a, b in zip(whole, split):
        np.testing.assert_allclose([a["nll"], a["grad_norm"]], [b["nll"], b["grad_norm"]], 2e-5)
    assert set(sums) == {"nll", "sequences"} and sums["sequences"] == B


def test_steps_is_one_frozen_value(whole_batch):
    steps, _, _ = whole_batch
    with pytest.raises(dataclasses.FrozenInstanceError):
        steps.train = None
    abstract = jax.tree.leaves(steps.sharded_abstract_state())
    assert [a.sharding for a in abstract] == jax.tree.leaves(steps.state_shardings)


def test_objective_section_round_trips_and_is_validated():
    c = TrainConfig.defaults()
    c.objective.z_loss, c.objective.loss_chunk = 1e-4, 64
    cfg = TrainConfig.from_config_dict(c)
    assert cfg.objective == ObjectiveConfig(name="lm", z_loss=1e-4, loss_chunk=64)
    assert TrainConfig.from_config_dict(ml_collections.ConfigDict(cfg.to_dict())) == cfg
    c.objective.name = "ppo"
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        TrainConfig.from_config_dict(c)


def test_a_workdir_saved_before_the_objective_section_resumes_without_force():
    """Runs saved when z_loss / loss_chunk sat under `step` (and no `objective` section
    existed) compare equal to today's layout; a real change is still reported."""
    from qwen_jax.train.checkpointing import config_differences

    today = TrainConfig().to_dict()
    saved = json.loads(json.dumps(today))
    objective = saved.pop("objective")
    saved["step"]["z_loss"] = objective["z_loss"]
    saved["step"]["loss_chunk"] = objective["loss_chunk"]
    assert config_differences(saved, today) == []

    saved["step"]["z_loss"] = objective["z_loss"] + 1e-4
    diffs = config_differences(saved, today)
    assert len(diffs) == 1 and diffs[0].startswith("objective.z_loss"), diffs
