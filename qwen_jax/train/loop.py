"""THE training loop: owns I/O, cadence, checkpoints and logging; the math is in step.py and
objectives.py, the per-process data in data_sharding.py.

Start. A workdir with a checkpoint resumes from it; otherwise the run starts from
`config.init_from` (init_from.py: weights only, fresh optimizer, step 0) or from a random
initialisation. A resume always wins over init_from.

Resume. Each checkpoint stores the state, every owned shard's iterator position and the resolved
config; restoring them makes the continued run see exactly the batches the uninterrupted run
would have seen. SIGTERM/SIGINT (TPU preemption) finishes the current step, saves, and exits.
A checkpoint that does not restore is moved aside (checkpointing.py) and the run resumes from
the one before; metrics.jsonl and TensorBoard drop what the resumed run logs again.

Workdir. Checked first (a writable directory, or creatable in one): a file, a read-only or full
disk is one WorkdirError line before anything loads; a full disk later is one too. A local
workdir is created only once the data names (`check_data`) and the init_from source check out:
a bad name leaves nothing behind. A URI workdir (gs://bucket/run) is an etils.epath path
(checkpointing.workdir_path): Orbax writes its checkpoints there, config.json is one object, and
metrics.py uploads metrics.jsonl and the TensorBoard events at each checkpoint and at the end
(an object store cannot append).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import signal
import tempfile
import time
import zlib
from pathlib import Path

import jax

from qwen_jax.sharding import make_mesh
from qwen_jax.train.checkpointing import (
    ConfigMismatchError,
    TrainCheckpointer,
    WorkdirError,
    config_differences,
    has_checkpoint,
    is_remote,
    workdir_path,
)
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.data_sharding import ShardedData
from qwen_jax.train.metrics import MetricsWriter, peak_flops_per_device
from qwen_jax.train.optim import learning_rate
from qwen_jax.train.step import Steps, build_steps

log = logging.getLogger(__name__)


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


def check_workdir(workdir: str | os.PathLike) -> None:
    """Raise WorkdirError unless `workdir` is a writable directory or can be made one (its
    nearest existing ancestor is one). Writability is tried, not asked (os.access says yes to
    root on a read-only mount): a small file written, synced and removed. Nothing is created
    locally; a URI workdir is created (`_check_remote_workdir`)."""
    workdir = workdir_path(workdir)
    if is_remote(workdir):
        _check_remote_workdir(workdir)
        return
    existing = workdir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == workdir else f" ({existing} is a file)"
        raise WorkdirError(f"workdir {workdir} is not a directory{where}")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".qwen-jax-write-test-")
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        reason = "no space left on device" if e.errno == errno.ENOSPC else e.strerror or str(e)
        raise WorkdirError(f"workdir {workdir} is not writable: {reason}") from e


def _check_remote_workdir(workdir) -> None:
    """A URI workdir cannot be checked for writability from here: it is created (a directory
    marker where the store has them) and a probe object written, read back and deleted. Any
    failure (no bucket, no credentials, no permission, `workdir` an object) is one WorkdirError."""
    probe = workdir / f".qwen-jax-write-test-{os.getpid()}"
    try:
        if workdir.exists() and not workdir.is_dir():
            raise WorkdirError(f"workdir {workdir} is not a directory (an object of that name)")
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"qwen-jax")
        ok = probe.read_bytes() == b"qwen-jax"
        probe.unlink()
    except WorkdirError:
        raise
    except Exception as e:  # noqa: BLE001 - gfile raises tf.errors (not OSError) as well
        lines = str(e).strip().splitlines()
        reason = lines[0][:300] if lines else type(e).__name__
        raise WorkdirError(f"workdir {workdir} is not writable: {reason}") from e
    if not ok:
        raise WorkdirError(f"workdir {workdir} is not writable: a probe object read back wrong")


def check_data(config: TrainConfig, tokenizer) -> None:
    """The train mixture, and the eval mixture when the run evaluates, each name a registered
    Task or Mixture or user files that exist (registering those, as ShardedData would): a bad
    name is one ValueError line here, before the workdir is created, not after it is left
    holding an empty checkpoints/."""
    from qwen_jax.data.user_files import dataset_name

    dataset_name(config.data.mixture, tokenizer)
    if config.run.eval_every and config.data.eval_mixture:
        dataset_name(config.data.eval_mixture, tokenizer)


def train(config: TrainConfig, workdir: str | Path, *, force: bool = False) -> RunResult:
    """Initialise or resume in `workdir` (a local path or a URI such as gs://bucket/run),
    train to config.run.steps, checkpoint, return history."""
    workdir = workdir_path(workdir)
    check_workdir(workdir)
    try:
        return _train(config, workdir, force)
    except OSError as e:
        if isinstance(e, WorkdirError) or e.errno != errno.ENOSPC:
            raise
        # metrics.jsonl, TensorBoard, config.json (checkpoints raise their own WorkdirError)
        raise WorkdirError(f"no space left on device while writing to {workdir}") from e


def _train(config: TrainConfig, workdir: Path, force: bool) -> RunResult:
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.train import init_from

    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model_config(model_vocab_size(config, tokenizer.vocab_size))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model_cfg.vocab_size} embedding rows"
        )
    check_data(config, tokenizer)
    source = None
    if config.init_from and not has_checkpoint(workdir / "checkpoints"):
        # Checked before anything is written: a bad source leaves the workdir untouched.
        source = init_from.find_source(config.init_from)
        init_from.check_source(source, model_cfg)
    workdir.mkdir(parents=True, exist_ok=True)
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
    steps = build_steps(config, model_cfg, mesh)
    features = steps.objective.feature_names
    data = ShardedData(config, config.data.mixture, "train", tokenizer, features)

    restored = ckpt.restore_latest(steps.sharded_abstract_state())
    params = None
    if restored is None and config.init_from:
        if source is None:  # the workdir held only checkpoints that do not restore
            source = init_from.find_source(config.init_from)
            init_from.check_source(source, model_cfg)
        # Outside set_mesh: the loaders build abstract models with logical-axis metadata.
        params = init_from.load_source_params(source, model_cfg, steps)
        log.info("initialising from %s %s", source.kind, source.path)
    with jax.set_mesh(mesh):
        if restored is None:
            state, start = (steps.init() if params is None else steps.init_with(params)), 0
            if jax.process_index() == 0:
                (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        else:
            start, state, data_state = restored
            data.set_state(data_state)
            log.info("resumed from step %d", start)

    schedule = learning_rate(config.optim)
    tokens_per_step = config.data.global_batch * config.data.seq_len
    flops_per_step = model_cfg.flops_per_token(config.data.seq_len) * tokens_per_step
    peak = peak_flops_per_device(model_cfg.compute_dtype) * jax.device_count()
    writer = MetricsWriter(workdir, config.run.steps, start)
    history: list[dict[str, float]] = []
    run = config.run
    step = start
    preempted = False

    def save(at: int) -> None:
        if ckpt.latest_step() != at:  # the cadence may already have saved this step
            ckpt.save(at, state, data.get_state(), resolved, force=True)
        writer.sync()  # a remote workdir's metrics and events go up with each checkpoint

    try:
        with _Preemption() as preemption, jax.set_mesh(mesh):
            window_start, window_steps = time.perf_counter(), 0
            while step < run.steps:
                local = data.next_local()
                state, metrics = steps.train(state, steps.device_batch(local))
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
                    row["data_crc32"] = zlib.crc32(local[features[0]].tobytes())
                    writer.write(step, row)
                    history.append({"step": step, **row})
                    window_start, window_steps = time.perf_counter(), 0
                if run.eval_every and config.data.eval_mixture and step % run.eval_every == 0:
                    row = evaluate(config, steps, state, tokenizer)
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


def evaluate(config: TrainConfig, steps: Steps, state, vocab) -> dict[str, float]:
    """Held-out metrics over the first `eval_batches` batches of the eval split (the same every
    time): {"eval_<metric>": sum / weight sum} for each of the objective's metrics (eval_loss
    for the LM objective)."""
    weight = steps.objective.weight_name
    data = ShardedData(
        config,
        config.data.eval_mixture,
        config.data.eval_split,
        vocab,
        steps.objective.feature_names,
    )
    sums: dict[str, float] = {}
    for _ in range(config.run.eval_batches):
        out = jax.device_get(steps.evaluate(state, steps.device_batch(data.next_local())))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    total = sums.get(weight, 0.0)
    return {
        f"eval_{k}": (v / max(total, 1.0) if total else math.nan)
        for k, v in sums.items()
        if k != weight
    }


__all__ = [
    "train",
    "RunResult",
    "WorkdirError",
    "check_data",
    "check_workdir",
    "evaluate",
    "model_vocab_size",
]
