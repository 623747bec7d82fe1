"""The alignment stages through the training loop, from a (briefly) pretrained demo model: chat
SFT lowers the held-out chat loss, packing does not change a conversation's loss, LoRA trains
only its adapters (and holds optimizer state for them only), every stage's experiment file runs
in its `:runlocal` form, and a stopped-and-resumed run of each stage repeats the uninterrupted
losses bit for bit."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.checkpoint import save_params
from qwen_jax.sharding import make_mesh
from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import REPO
from qwen_jax.tokenizer import chatml, load_tokenizer
from qwen_jax.train import init_from
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.export import restore_model
from qwen_jax.train.loop import evaluate, model_vocab_size, train
from qwen_jax.train.objectives import LMObjective
from qwen_jax.train.step import build_steps

SFT = "experiments/sft/qwen_7b_chat.py"
LORA = "experiments/sft/qwen_7b_chat_lora.py"
RM = "experiments/rm/qwen_7b_rm.py"
DPO = "experiments/dpo/qwen_7b_chat_dpo.py"


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_cache_dir):
    """The run's persistent compilation cache (conftest.py; qwen_jax/testing/compile_cache.py)
    for this module's runs: each train() builds the same step again; only the first compiles
    it."""
    with persistent_compile_cache(xla_cache_dir) as env:
        yield env


def _set(c, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        c = c[p]
    c[last] = value


def stage_config(path: str, assets, base, **changes) -> TrainConfig:
    """The stage's `:runlocal` config on the test's demo assets, shrunk to the base model's
    architecture (tiny.py's runlocal shape) and started from `base`."""
    data_dir, spm = assets
    c = load_experiment(REPO / path, "runlocal")
    small = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    for key, value in small.model.items():
        if value is not None:
            c.model[key] = value
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.data.seq_len = 128
    c.init_from = str(base)
    c.run.log_every = 1
    for key, value in changes.items():
        _set(c, key, value)
    return TrainConfig.from_config_dict(c)


@pytest.fixture(scope="module")
def base(demo_assets, tmp_path_factory):
    """The tiny runlocal pretraining (20 steps) exported with its tokenizer: the stages' start."""
    data_dir, spm = demo_assets
    root = tmp_path_factory.mktemp("alignment_base")
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.run.eval_every = 0
    train(TrainConfig.from_config_dict(c), root / "run")
    _, model, _ = restore_model(root / "run")
    save_params(model, root / "export", tokenizer_files=[spm])
    return root / "export"


def _steps(config: TrainConfig):
    """(the run's model config, its steps, its tokenizer): no state, nothing compiled."""
    tok = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model_config(model_vocab_size(config, tok.vocab_size))
    return model_cfg, build_steps(config, model_cfg, make_mesh(config.mesh)), tok


def _start_state(config: TrainConfig):
    """(steps, the state a run starts from: init_from's weights at step 0, tokenizer)."""
    model_cfg, steps, tok = _steps(config)
    mesh = steps.mesh
    source = init_from.find_source(config.init_from)
    params = init_from.load_source_params(source, model_cfg, steps)
    with jax.set_mesh(mesh):
        return steps, steps.init_with(params), tok


@pytest.mark.slow
def test_chat_sft_lowers_the_heldout_chat_loss(demo_assets, base, tmp_path):
    changes = {"run.steps": 40, "run.eval_every": 40, "optim.peak_lr": 3e-3}
    config = stage_config(SFT, demo_assets, base, **changes)
    steps, state, tok = _start_state(config)
    with jax.set_mesh(steps.mesh):
        before = evaluate(config, steps, state, tok)["eval_loss"]
    result = train(config, tmp_path / "sft")
    after = [r for r in result.history if "eval_loss" in r][-1]["eval_loss"]
    # Same held-out conversations (the first eval_batches batches of the validation split):
    # at least 2 nats lower, a chat perplexity over 7x lower than the base model's (measured:
    # 6.31 -> 3.89 nats).
    assert after < before - 2.0, (before, after)


def test_packed_conversations_score_as_unpacked(demo_assets, base):
    """Per-conversation loss of three conversations packed into one row equals each one's loss
    alone (segment ids and restarted positions isolate them)."""
    _, spm = demo_assets
    tok = load_tokenizer(str(spm))
    convs = [
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5."}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Seven."},
            {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Eleven, and then thirteen."},
        ],
        [{"role": "user", "content": "Reverse 'abc'."}, {"role": "assistant", "content": "cba"}],
    ]
    examples = [chatml.sft_example(tok, m) for m in convs]
    _, model, _ = _load(base)
    objective = LMObjective()

    def batch_of(rows):
        t = 256
        out = {k: np.zeros((len(rows), t), np.int32) for k in objective.feature_names}
        for r, parts in enumerate(rows):
            at = 0
            for seg, (ids, w) in enumerate(parts, start=1):
                n = len(ids)
                out["decoder_input_tokens"][r, at : at + n] = [tok.eod_id, *ids[:-1]]
                out["decoder_target_tokens"][r, at : at + n] = ids
                out["decoder_loss_weights"][r, at : at + n] = w
                out["decoder_segment_ids"][r, at : at + n] = seg
                out["decoder_positions"][r, at : at + n] = np.arange(n)
                at += n
        return {k: jnp.asarray(v) for k, v in out.items()}

    def per_example(batch):
        h, _ = model(
            batch["decoder_input_tokens"],
            positions_bt=batch["decoder_positions"],
            segment_ids_bt=batch["decoder_segment_ids"],
            return_hidden=True,
        )
        logp, _ = model.token_logprobs(h, batch["decoder_target_tokens"])
        return np.asarray(-logp * batch["decoder_loss_weights"]), np.asarray(
            batch["decoder_segment_ids"]
        )

    packed, seg = per_example(batch_of([examples]))
    alone, _ = per_example(batch_of([[e] for e in examples]))
    for i in range(len(examples)):
        got = packed[0][seg[0] == i + 1].sum()
        want = alone[i].sum()
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"conversation {i}")


def _load(export):
    from qwen_jax.checkpoint import load_params

    cfg, model = load_params(export)
    return cfg, model, None


def _opt_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))


@pytest.mark.slow
def test_lora_trains_only_the_adapters(demo_assets, base, tmp_path):
    full = stage_config(SFT, demo_assets, base)
    lora = stage_config(LORA, demo_assets, base)
    _, full_steps, _ = _steps(full)  # its optimizer state's size only
    steps, state, tok = _start_state(lora)
    # Optimizer state for the adapters only: AdamW's two moments of each adapter weight.
    adapters = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    assert _opt_bytes(state) <= 2 * adapters + 64
    full_opt = sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(full_steps.abstract_state["opt_state"])
    )
    assert _opt_bytes(state) < full_opt / 5, (_opt_bytes(state), full_opt)
    paths = [
        jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state["params"])
    ]
    assert paths and all("_lora_" in p for p in paths), paths
    frozen = jax.tree.map(np.asarray, state["frozen"])
    before = jax.tree.map(np.asarray, state["params"])
    from qwen_jax.train.data_sharding import ShardedData

    data = ShardedData(lora, lora.data.mixture, "train", tok, steps.objective.feature_names)
    with jax.set_mesh(steps.mesh):
        for _ in range(3):
            state, metrics = steps.train(state, steps.device_batch(data.next_local()))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["frozen"]), frozen)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state["params"], before)
    assert any(jax.tree.leaves(moved)), "no adapter changed"
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_int8_base_lora_run_trains(demo_assets, base, tmp_path):
    config = stage_config(
        LORA,
        demo_assets,
        base,
        **{"model.lora_int8_base": True, "run.steps": 30, "run.eval_every": 0},
    )
    _, steps, _ = _steps(config)
    dtypes = {x.dtype for x in jax.tree.leaves(steps.abstract_state["frozen"])}
    assert np.dtype(np.int8) in dtypes, dtypes
    result = train(config, tmp_path / "qlora")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses


@pytest.mark.slow
@pytest.mark.parametrize("path", [SFT, LORA, RM, DPO], ids=lambda p: p.split("/")[-1][:-3])
def test_a_stopped_stage_resumes_bit_identically(demo_assets, base, tmp_path, path):
    """6 steps straight (checkpoints at 3 and 6) vs a run stopped after step 3: a new
    process-like start in a workdir holding only that run's step-3 checkpoint runs 3 more. The
    restore covers the frozen base (LoRA), the reference copy (DPO), the reward head and the
    pair data's position."""
    changes = {"run.steps": 6, "run.checkpoint_every": 3, "run.eval_every": 0}
    config = stage_config(path, demo_assets, base, **{**changes, "run.keep_checkpoints": 2})
    straight = train(config, tmp_path / "a")
    saved = (tmp_path / "a" / "checkpoints").iterdir()
    assert sorted(int(p.name) for p in saved if p.name.isdigit()) == [3, 6]
    # The stopped run's workdir is the straight one as it stood after step 3 (a 3-step run
    # would write the same step-3 checkpoint, one compilation later).
    shutil.copytree(
        tmp_path / "a",
        tmp_path / "b",
        ignore=lambda d, names: ["6"] if d.endswith("checkpoints") else [],
    )
    second = train(config, tmp_path / "b")
    want = [(r["step"], r["loss"]) for r in straight.history if "loss" in r and r["step"] > 3]
    got = [(r["step"], r["loss"]) for r in second.history if "loss" in r]
    assert got == want and [s for s, _ in got] == [4, 5, 6]
