"""THE RL run loop (PPO / GRPO): owns I/O, cadence, checkpoints and logging; one iteration's
math (rollout, scoring, update) is algo.py's `RL.iteration`.

Start. `qwen-jax train` comes here when config.rl.algorithm is set. Everything a user can get
wrong is checked before anything is compiled or written (`preflight`: one UsageError line,
exit 2): the workdir, the policy source (init_from) and the reward model (its vocabulary must
be the policy's), the config against a saved run's, and every prompt of the train split
against rl.max_prompt_len (prompts.py). Then `build_rl` builds the four models on one mesh.
A workdir with a checkpoint resumes from it; otherwise the policy (and the reference) start from
config.init_from.

Checkpoints (train/checkpointing.py's TrainCheckpointer, one step per completed iteration):
the RLState (policy and value params and optimizer states, running reward statistics,
iteration, rng), the prompt position (+ the ptx iterator's when PPO-ptx is on) and the resolved
config. The reference and reward models are NOT saved: they are the run's fixed sources, read
again on resume. The resolved config records them (`rl_sources`: kind, path and a fingerprint
of the files' names, sizes and mtimes), so a resume whose reference or reward model changed is
refused as any config change is (--force overrides). Resume is exact: the continued run logs
the metrics an uninterrupted one would have.

Stops. SIGTERM/SIGINT finishes the iteration, saves and exits (as the trainer does). A NaN or
inf in a reward or a loss stops the run with nothing saved at that iteration (the last
checkpoint is the last good state) and one line naming the iteration 1-based, as
metrics.jsonl and the checkpoints number them, and the quantity: "stopped at iteration 3
(reward_raw is nan); ...".
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import time
import zlib
from pathlib import Path

import jax

from qwen_jax.cli import UsageError
from qwen_jax.sharding import make_mesh
from qwen_jax.train.checkpointing import (
    ConfigMismatchError,
    TrainCheckpointer,
    WorkdirError,
    config_differences,
    is_remote,
    workdir_path,
)
from qwen_jax.train.config import TrainConfig
from qwen_jax.train.loop import RunResult, _Preemption, check_workdir, model_vocab_size

log = logging.getLogger(__name__)


# algo.RLNumericsError's own "iteration N: " prefix: the loop's message names the iteration
# itself (1-based, as algo's) beside the last checkpoint.
_ITERATION_PREFIX = re.compile(r"^iteration \d+: ")


class RLInputError(UsageError):
    """A source, prompt or setting the RL run cannot use (one line, exit 2)."""


def _source_id(spec: str) -> dict | None:
    """What identifies a fixed model source: its kind and path, and a digest of its files'
    relative names, sizes and mtimes (a retrained or replaced model at the same path differs)."""
    if not spec:
        return None
    if is_remote(spec):
        return {"kind": "uri", "path": spec, "files": ""}
    from qwen_jax.train import init_from

    source = init_from.find_source(spec)
    root = Path(source.path).resolve()
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"kind": source.kind, "path": str(root), "files": digest.hexdigest()[:16]}


def preflight(config: TrainConfig, tokenizer, model_cfg) -> dict:
    """Check what a user can get wrong before anything compiles (module docstring); returns
    `rl_sources` for the resolved config. Raises RLInputError (UsageError: exit 2)."""
    from qwen_jax.rl.config import check as check_rl
    from qwen_jax.rl.prompts import check_prompts
    from qwen_jax.train import init_from

    rl = config.rl
    if not config.init_from:
        raise RLInputError(
            "an RL run starts from a policy: set init_from (the SFT model's export or workdir)"
        )
    try:
        init_from.check_source(init_from.find_source(config.init_from), model_cfg)
        # The RL section with its sources: the reward model's vocabulary is the policy's, ...
        check_rl(rl, config, model_cfg.vocab_size)
    except UsageError:
        raise
    except ValueError as e:  # InitFromError, rl.config.check's errors
        raise RLInputError(str(e)) from None
    try:
        n = check_prompts(config, tokenizer)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise RLInputError(f"RL prompts {config.data.mixture!r}: {e}") from None
    log.info("%d prompts, all within rl.max_prompt_len=%d", n, rl.max_prompt_len)
    return {"init_from": _source_id(config.init_from), "reward_model": _source_id(rl.reward_model)}


def train_rl(config: TrainConfig, workdir: str | Path, *, force: bool = False) -> RunResult:
    """Initialise or resume the RL run in `workdir` (local or gs://), run to config.run.steps
    iterations, checkpoint, return the logged rows."""
    workdir = workdir_path(workdir)
    check_workdir(workdir)
    try:
        return _train_rl(config, workdir, force)
    except OSError as e:
        if isinstance(e, WorkdirError) or e.errno != errno.ENOSPC:
            raise
        raise WorkdirError(f"no space left on device while writing to {workdir}") from e


def _prompt_crc(prompts: list[list[int]]) -> int:
    """Identifies an iteration's prompts (resume / data-order checks)."""
    return zlib.crc32(json.dumps(prompts).encode())


def _train_rl(config: TrainConfig, workdir, force: bool) -> RunResult:
    from qwen_jax.rl.algo import RLNumericsError, build_rl
    from qwen_jax.rl.prompts import PromptStream
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.train.metrics import MetricsWriter

    tokenizer = load_tokenizer(config.data.tokenizer)
    model_cfg = config.model_config(model_vocab_size(config, tokenizer.vocab_size))
    sources = preflight(config, tokenizer, model_cfg)
    resolved = {
        **config.to_dict(),
        "resolved_model": dataclasses.asdict(model_cfg),
        "rl_sources": sources,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    run = config.run
    ckpt = TrainCheckpointer(
        workdir / "checkpoints", keep=run.keep_checkpoints, async_save=run.async_checkpoints
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
    try:
        rl = build_rl(config, tokenizer, mesh)
        prompts = PromptStream(config, tokenizer)
        ptx = None
        if config.rl.ptx_coef > 0:  # PPO-ptx: LM batches of data.global_batch x data.seq_len
            from qwen_jax.train.data_sharding import ShardedData
            from qwen_jax.train.objectives import LMObjective

            features = LMObjective().feature_names
            ptx = ShardedData(config, config.rl.ptx_mixture, "train", tokenizer, features)
        restored = ckpt.restore_latest(rl.abstract_state())
    except BaseException:
        ckpt.close()
        raise
    with jax.set_mesh(mesh):
        if restored is None:
            state, start = rl.init_state(), 0
            if jax.process_index() == 0:
                (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        else:
            start, state, data_state = restored
            prompts.set_state(data_state["prompts"])
            if ptx is not None:
                ptx.set_state(data_state["ptx"])
            log.info("resumed from iteration %d", start)

    def data_state() -> dict:
        return {"prompts": prompts.get_state(), "ptx": None if ptx is None else ptx.get_state()}

    writer = MetricsWriter(workdir, run.steps, start)
    history: list[dict[str, float]] = []
    step, preempted = start, False

    def save(at: int) -> None:
        if ckpt.latest_step() != at:  # the cadence may already have saved this iteration
            ckpt.save(at, state, data_state(), resolved, force=True)
        writer.sync()

    try:
        with _Preemption() as preemption, jax.set_mesh(mesh):
            while step < run.steps:
                batch = prompts.next()
                ptx_batch = None if ptx is None else ptx.next_local()
                started = time.perf_counter()
                try:
                    state, metrics = rl.iteration(state, batch.prompts, batch.records, ptx_batch)
                except RLNumericsError as e:
                    # Nothing is saved at this iteration: the last checkpoint stays the last
                    # good state. One line, non-zero exit (qwen_jax.cli). Iterations are
                    # numbered 1-based, as metrics.jsonl's "step" and the checkpoints are.
                    last = ckpt.latest_step()
                    quantity = _ITERATION_PREFIX.sub("", str(e)).replace("\n", " ")
                    raise RLNumericsError(
                        f"stopped at iteration {step + 1} ({quantity}); nothing saved for it, "
                        f"the last checkpoint is iteration {last if last is not None else 'none'}"
                    ) from None
                step += 1
                writer.advance()
                if step % run.log_every == 0 or step == run.steps:
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row["time_iteration_s"] = time.perf_counter() - started
                    row["data_crc32"] = _prompt_crc(batch.prompts)
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
        prompts.close()
    if preempted:
        log.warning("preempted: checkpoint written at iteration %d", step)
    return RunResult(last_step=step, history=history, preempted=preempted)


__all__ = ["train_rl", "preflight", "RLInputError"]
