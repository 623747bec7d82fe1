"""Train-step math: chunked CE vs a numpy formula, exact gradient accumulation, the schedule,
the decay mask, and the same losses under every sharding preset (8 fake devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from qwen_jax import sharding
from qwen_jax.model import config as C
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.losses import chunked_cross_entropy
from qwen_jax.train.objectives import ObjectiveConfig
from qwen_jax.train.optim import OptimConfig, decay_mask, learning_rate
from qwen_jax.train.step import StepConfig, build_steps


def _np_ce(h, w, targets, weights, z_loss):
    logits = h.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (weights * (lse - picked)).sum(), (weights * z_loss * lse**2).sum(), weights.sum()


@pytest.mark.parametrize("t,chunk", [(16, 4), (13, 4), (8, 32)])
def test_chunked_cross_entropy_matches_numpy(t, chunk):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, t, 8)).astype(np.float32)
    w = rng.normal(size=(8, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=(3, t))
    weights = (rng.random((3, t)) > 0.3).astype(np.float32)
    got = chunked_cross_entropy(
        jnp.asarray(h),
        jnp.asarray(w),
        jnp.asarray(targets),
        jnp.asarray(weights),
        chunk=chunk,
        z_loss=1e-3,
    )
    want = _np_ce(h, w, targets, weights, 1e-3)
    np.testing.assert_allclose([float(x) for x in got], want, rtol=1e-5)


def test_chunked_cross_entropy_gradient_matches_unchunked():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 30)), jnp.float32)
    tg = jnp.asarray(rng.integers(0, 30, size=(2, 12)))
    wt = jnp.ones((2, 12))

    def full(h, w):
        logits = h @ w
        return jnp.sum(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tg[..., None], -1)[..., 0]
        )

    g_ref = jax.grad(full, argnums=(0, 1))(h, w)
    g = jax.grad(lambda h, w: chunked_cross_entropy(h, w, tg, wt, chunk=5)[0], argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_schedule_warmup_then_cosine_to_ten_percent():
    sched = learning_rate(OptimConfig(peak_lr=1.0, warmup_steps=10, total_steps=110))
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(sched(110)), 0.1, rtol=1e-5)
    flat = learning_rate(OptimConfig(peak_lr=1.0, warmup_steps=10, schedule="constant"))
    assert float(flat(1000)) == 1.0


def test_decay_mask_excludes_norms_and_biases():
    from qwen_jax.model.factory import abstract_model

    params = nnx.state(abstract_model(C.tiny()), nnx.Param)
    flat = {
        jax.tree_util.keystr(k): v
        for k, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    off = sorted(k for k, v in flat.items() if not v)
    assert off == sorted(f"['blocks']['{n}'].value" for n in ("bk", "bq", "bv", "ln_1", "ln_2")) + [
        "['ln_f'].value"
    ]


def _config(mesh: sharding.MeshConfig, microbatches: int = 1) -> TrainConfig:
    return TrainConfig(
        model_preset="tiny",
        model_overrides=(("num_kv_heads", 2), ("vocab_size", 128)),
        optim=OptimConfig(peak_lr=1e-2, warmup_steps=2, total_steps=10),
        step=StepConfig(microbatches=microbatches),
        objective=ObjectiveConfig(loss_chunk=8, z_loss=1e-4),
        mesh=mesh,
    )


def _batches(n_steps, b=8, t=16, vocab=128):
    """One fixed random batch repeated, so the loss must fall as the model memorises it."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(1):
        toks = rng.integers(1, vocab, size=(b, t + 1)).astype(np.int32)
        seg = np.ones((b, t), np.int32)
        seg[:, 10:] = 2
        pos = np.concatenate([np.arange(10), np.arange(t - 10)])[None].repeat(b, 0)
        out.append(
            {
                "decoder_input_tokens": toks[:, :-1],
                "decoder_target_tokens": toks[:, 1:],
                "decoder_loss_weights": (seg > 0).astype(np.int32),
                "decoder_segment_ids": seg,
                "decoder_positions": pos.astype(np.int32),
            }
        )
    return out * n_steps


def _losses(config: TrainConfig, devices, steps=4):
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    cfg = config.model_config()
    built = build_steps(config, cfg, mesh)
    losses = []
    with jax.set_mesh(mesh):
        state = built.init()
        for batch in _batches(steps):
            batch = {k: jax.device_put(v, built.batch_shardings[k]) for k, v in batch.items()}
            state, metrics = built.train(state, batch)
            losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.fixture(scope="module")
def single_device_losses():
    return _losses(_config(sharding.MeshConfig(1, 1, 1)), jax.devices()[:1])


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_sharding_presets_train_to_the_same_losses(single_device_losses, preset):
    losses = _losses(_config(sharding.MESH_PRESETS[preset]), jax.devices())
    assert losses[-1] < losses[0]  # it is actually training
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


def test_gradient_accumulation_is_exact(single_device_losses):
    losses = _losses(_config(sharding.MeshConfig(1, 1, 1), microbatches=4), jax.devices()[:1])
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.optim.peak_lr=fast", "peak_lr"),
        ("--config.optim.no_such_key=1", "no_such_key"),
        ("--config.model.num_heads=3", "multiple of num_kv_heads"),
        ("--config.model.preset=qwen_3b", "unknown model preset 'qwen_3b'"),
        ("--config.model.attention_impl=cuda", "attention_impl='cuda': expected one of"),
    ],
)
def test_invalid_overrides_fail_before_compiling(override, message, capsys, tmp_path):
    from qwen_jax import cli

    workdir = tmp_path / "run"
    argv = ["train", "--config=experiments/pretrain/tiny.py", override, f"--workdir={workdir}"]
    assert cli.main(argv) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qwen-jax train: error:") and message in err[0]
    assert not workdir.exists()


def test_config_round_trip_is_lossless():
    cfg = _config(sharding.MESH_PRESETS["fsdp_tp"])
    assert dataclasses.asdict(cfg.model_config())["num_kv_heads"] == 2
    assert TrainConfig.from_config_dict(ml_collections.ConfigDict(cfg.to_dict())) == cfg
