"""THE training loop: owns I/O, cadence, checkpoints and logging; the math is in step.py.

Data sharding. The global batch of each step is the concatenation, in shard order, of
`global_batch / num_shards` rows from each logical data shard's iterator (seqio reads shard s of
`num_shards`). Each process owns a contiguous block of shards. With `num_shards` fixed, the global
batch is therefore the same whatever the number of processes: one process with 8 devices and two
processes with 4 each train on identical batches. By default there is one shard per process.

Resume. Each checkpoint stores the state, every owned shard's iterator position and the resolved
config; restoring them makes the continued run see exactly the batches the uninterrupted run
would have seen. SIGTERM/SIGINT (TPU preemption) finishes the current step, saves, and exits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from qwen_jax.model.factory import abstract_model
from qwen_jax.sharding import logical_spec, make_mesh, tree_shardings
from qwen_jax.train.checkpointing import ConfigMismatchError, TrainCheckpointer, config_differences
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.metrics import MetricsWriter, peak_flops_per_device
from qwen_jax.train.optim import learning_rate, make_optimizer
from qwen_jax.train.step import init_state, make_eval_step, make_train_step

log = logging.getLogger(__name__)

FEATURES = (
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
    "decoder_segment_ids",
    "decoder_positions",
)


@dataclasses.dataclass
class RunResult:
    last_step: int
    history: list[dict[str, float]]  # every logged row (train and eval)
    preempted: bool = False


class _Preemption:
    """Turns SIGTERM/SIGINT into a flag checked between steps (then restores the handlers)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, _frame):
        log.warning("received signal %d: saving a checkpoint after this step", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def model_vocab_size(config: TrainConfig, tokenizer_vocab: int) -> int | None:
    """The tiny preset sizes its embedding to the tokenizer (rounded up to 128 rows)."""
    if config.model_preset == "tiny":
        return -(-tokenizer_vocab // 128) * 128
    return None


def _shards_of_process(num_shards: int) -> range:
    procs, pid = jax.process_count(), jax.process_index()
    if num_shards % procs:
        raise ValueError(f"data.num_shards={num_shards} must be a multiple of {procs} processes")
    per = num_shards // procs
    return range(pid * per, (pid + 1) * per)


class _Data:
    """The owned shard iterators of one split, concatenated into this process's rows."""

    def __init__(self, config: TrainConfig, mixture: str, split: str, vocab):
        from qwen_jax.data.pipeline import get_iterator

        d = config.data
        self.num_shards = d.num_shards or jax.process_count()
        if d.global_batch % self.num_shards:
            raise ValueError(
                f"data.global_batch={d.global_batch} must divide into {self.num_shards} shards"
            )
        self.rows = d.global_batch // self.num_shards
        self.iterators = [
            get_iterator(
                mixture,
                split=split,
                sequence_length=d.seq_len,
                batch_size=self.rows,
                seed=d.seed,
                shard_index=s,
                num_shards=self.num_shards,
                pack=d.pack,
                data_dir=d.data_dir or None,
                vocab=vocab,
            )
            for s in _shards_of_process(self.num_shards)
        ]

    def next_local(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in FEATURES}

    def get_state(self) -> list:
        return [it.get_state() for it in self.iterators]

    def set_state(self, states: list) -> None:
        if len(states) != len(self.iterators):
            raise ValueError(f"{len(states)} saved data shards, {len(self.iterators)} owned now")
        for it, s in zip(self.iterators, states):
            it.set_state(s)


def build_step_functions(config: TrainConfig, model_cfg, mesh):
    """Abstract state, its shardings, and the jitted init / train / eval functions."""
    model = abstract_model(model_cfg, seed=config.run.seed)
    graphdef, _ = nnx.split(model, nnx.Param)
    tx = make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: init_state(abstract_model(model_cfg), tx))
    state_shardings = tree_shardings(abstract, mesh)
    batch_sharding = NamedSharding(mesh, logical_spec("batch", None, mesh=mesh))

    def init():
        from qwen_jax.model.transformer import Qwen

        return init_state(Qwen(model_cfg, rngs=nnx.Rngs(config.run.seed)), tx)

    init_fn = jax.jit(init, out_shardings=state_shardings)
    train_fn = jax.jit(
        make_train_step(graphdef, tx, config.step),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(graphdef, config.step),
        in_shardings=(state_shardings["params"], batch_sharding),
    )
    return abstract, state_shardings, batch_sharding, init_fn, train_fn, eval_fn


def train(config: TrainConfig, workdir: str | Path, *, force: bool = False) -> RunResult:
    """Initialise or resume in `workdir`, train to config.run.steps, checkpoint, return history."""
    from qwen_jax.tokenizer import load_tokenizer

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model_config(model_vocab_size(config, tokenizer.vocab_size))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model_cfg.vocab_size} embedding rows"
        )
    resolved = {**config.to_dict(), "resolved_model": dataclasses.asdict(model_cfg)}

    ckpt = TrainCheckpointer(
        workdir / "checkpoints",
        keep=config.run.keep_checkpoints,
        async_save=config.run.async_checkpoints,
    )
    saved = ckpt.saved_config()
    if saved is not None:
        diffs = config_differences(saved, resolved)
        if diffs and not force:
            ckpt.close()
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config (use --force to override):\n  "
                + "\n  ".join(diffs)
            )
        for d in diffs:
            log.warning("config differs from the saved run (forced): %s", d)

    mesh = make_mesh(config.mesh)
    abstract, state_sh, batch_sh, init_fn, train_fn, eval_fn = build_step_functions(
        config, model_cfg, mesh
    )
    data = _Data(config, config.data.mixture, "train", tokenizer)

    restored = ckpt.restore_latest(
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
        )
    )
    with jax.set_mesh(mesh):
        if restored is None:
            state, start = init_fn(), 0
            if jax.process_index() == 0:
                (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        else:
            start, state, data_state = restored
            data.set_state(data_state)
            log.info("resumed from step %d", start)

    schedule = learning_rate(config.optim)
    tokens_per_step = config.data.global_batch * config.data.seq_len
    flops_per_step = model_cfg.flops_per_token(config.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device() * jax.device_count()
    writer = MetricsWriter(workdir, config.run.steps, start)
    history: list[dict[str, float]] = []
    run = config.run
    step = start
    preempted = False

    def save(at: int) -> None:
        if ckpt.latest_step() != at:  # the cadence may already have saved this step
            ckpt.save(at, state, data.get_state(), resolved, force=True)

    try:
        with _Preemption() as preemption, jax.set_mesh(mesh):
            window_start, window_steps = time.perf_counter(), 0
            while step < run.steps:
                local = data.next_local()
                batch = {
                    k: jax.make_array_from_process_local_data(batch_sh, local[k]) for k in FEATURES
                }
                state, metrics = train_fn(state, batch)
                step += 1
                window_steps += 1
                writer.advance()
                if step % run.log_every == 0 or step == run.steps:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - window_start
                    row = {k: float(v) for k, v in metrics.items()}
                    row["lr"] = float(schedule(step - 1))
                    row["tokens_per_s"] = window_steps * tokens_per_step / elapsed
                    row["mfu"] = window_steps * flops_per_step / elapsed / peak
                    # Identifies the batch this step trained on (resume/data-order checks).
                    row["data_crc32"] = zlib.crc32(local["decoder_input_tokens"].tobytes())
                    writer.write(step, row)
                    history.append({"step": step, **row})
                    window_start, window_steps = time.perf_counter(), 0
                if run.eval_every and config.data.eval_mixture and step % run.eval_every == 0:
                    row = {"eval_loss": evaluate(config, eval_fn, state, tokenizer, batch_sh)}
                    writer.write(step, row)
                    history.append({"step": step, **row})
                if run.checkpoint_every and step % run.checkpoint_every == 0:
                    save(step)
                if preemption.requested:
                    preempted = True
                    break
        save(step)
    finally:
        ckpt.close()
        writer.close()
    if preempted:
        log.warning("preempted: checkpoint written at step %d", step)
    return RunResult(last_step=step, history=history, preempted=preempted)


def evaluate(config: TrainConfig, eval_fn, state, vocab, batch_sh) -> float:
    """Held-out loss over the first `eval_batches` batches of the eval split (same every time)."""
    data = _Data(config, config.data.eval_mixture, config.data.eval_split, vocab)
    loss_sum = weight_sum = 0.0
    for _ in range(config.run.eval_batches):
        local = data.next_local()
        batch = {k: jax.make_array_from_process_local_data(batch_sh, local[k]) for k in FEATURES}
        out = jax.device_get(eval_fn(state["params"], batch))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    return loss_sum / max(weight_sum, 1.0) if weight_sum else math.nan


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """jax.distributed.initialize: automatic on Cloud TPU VMs, explicit elsewhere."""
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif _on_tpu_vm():
        jax.distributed.initialize()


def _on_tpu_vm() -> bool:
    import os

    return (
        bool(os.environ.get("TPU_WORKER_HOSTNAMES"))
        and os.environ.get("JAX_PLATFORMS", "") not in ("cpu",)
        and Path("/dev/accel0").exists()
    )


__all__: list[Any] = ["train", "RunResult", "init_distributed", "evaluate"]
