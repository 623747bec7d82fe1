"""`TrainConfig.init_from`: start a new run from existing weights (continued pretraining, SFT on
a base model). The optimizer state and the step start fresh; the data starts at its beginning.

Sources, told apart by their files:
  params export   qwen_config.json + params/            (`qwen-jax export`, checkpoint/params.py)
  training run    config.json + checkpoints/, or that checkpoints/ directory itself: the newest
                  step that restores (damaged steps are skipped, as on resume)
  Hugging Face    config.json + *.safetensors           (Qwen v1 or Qwen2 names, checkpoint/hf.py)
A training run may be on object storage (gs://bucket/run, read through etils.epath and Orbax);
an export or HF directory there is refused by name (its loaders read local files).

`check_source` runs before anything is written: the source's vocabulary and every parameter
shape must equal the run's model, or one `InitFromError` names the mismatch. Non-shape fields
(dtypes, remat, rope base, ...) may differ: the run's config applies, and the weights are cast
to its param dtype.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
from flax import nnx

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.factory import abstract_model
from qwen_jax.train.step import base_config

log = logging.getLogger(__name__)

KINDS = ("params", "train", "hf")


class InitFromError(ValueError):
    """init_from names no usable source, or one that does not fit the run's model."""


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    # the params export, the checkpoints directory, or the HF directory (a training run's
    # checkpoints may be a URI: an etils.epath path)
    path: Path
    model_cfg: QwenConfig  # the architecture the source was saved with


def find_source(init_from: str) -> Source:
    """Identify `init_from` and read its architecture (no weights are read).

    A URI (gs://bucket/run) is an etils.epath path, as a workdir is (checkpointing.workdir_path):
    pathlib would read gs://b/x as the local folder gs:/b/x. On object storage a training run
    (or its checkpoints/) restores through Orbax; a params export or Hugging Face directory is
    named (their loaders read local files) so the error comes before anything is written.
    """
    from qwen_jax.checkpoint import checkpoint_config
    from qwen_jax.checkpoint.params import CONFIG_FILE
    from qwen_jax.train.checkpointing import is_remote, workdir_path
    from qwen_jax.train.export import run_model_config

    try:
        path = workdir_path(init_from)
    except ValueError as e:
        raise InitFromError(f"init_from={init_from!r}: {e}") from None
    if not path.is_dir():
        raise InitFromError(f"init_from={init_from!r}: no such directory")

    def local_only(what: str) -> InitFromError:
        return InitFromError(
            f"init_from={init_from!r} is {what} on object storage, which is read from local "
            "disk only: copy it to a local directory first (gcloud storage cp -r), or start "
            "from the training workdir it came from"
        )

    # checkpoint.params.is_params_dir's test, on a path that may be a URI
    if (path / CONFIG_FILE).exists() and (path / "params").exists():
        if is_remote(path):
            raise local_only("a params export")
        return Source("params", path, checkpoint_config(path))
    run_dir = path if (path / "checkpoints").is_dir() else path.parent
    if (run_dir / "checkpoints").is_dir() and (run_dir / "config.json").exists():
        model_cfg, _ = run_model_config(run_dir)
        return Source("train", run_dir / "checkpoints", model_cfg)
    has_safetensors = (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    )
    if has_safetensors and (path / "config.json").exists():
        if is_remote(path):
            raise local_only("a Hugging Face directory")
        return Source("hf", path, checkpoint_config(path))
    raise InitFromError(
        f"init_from={init_from!r} is none of: a params export (qwen_config.json + params/), a "
        "training workdir (config.json + checkpoints/) or its checkpoints/ directory, a Hugging "
        "Face directory (config.json + *.safetensors)"
    )


def _param_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    params = nnx.state(abstract_model(cfg), nnx.Param)
    return {
        jax.tree_util.keystr(k): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }


def check_source(source: Source, model_cfg: QwenConfig) -> None:
    """Raise InitFromError naming the first mismatch (vocabulary first, then each parameter)."""
    src = source.model_cfg
    where = f"init_from {source.kind} {source.path}"
    if src.vocab_size != model_cfg.vocab_size:
        raise InitFromError(
            f"{where}: vocabulary mismatch: the source has {src.vocab_size} embedding rows, the "
            f"run's model {model_cfg.vocab_size} (set by the tokenizer or model.vocab_size)"
        )
    if source.kind == "train" and src.lora_rank:
        raise InitFromError(
            f"{where}: a LoRA run's checkpoints hold adapters, not a model; export it merged "
            "first (`qwen-jax export`) and start from the export"
        )
    # Adapters and a reward head start fresh: only the base weights come from the source.
    want, got = _param_shapes(base_config(model_cfg)), _param_shapes(base_config(src))
    problems = [f"{k} missing from the source" for k in sorted(set(want) - set(got))]
    problems += [
        f"{k} in the source is not in the run's model" for k in sorted(set(got) - set(want))
    ]
    problems += [
        f"{k} has shape {got[k]} in the source, {want[k]} in the run's model"
        for k in sorted(set(want) & set(got))
        if got[k] != want[k]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InitFromError(f"{where}: parameter mismatch: {problems[0]}{more}")
    changed = {
        f.name: (getattr(src, f.name), getattr(model_cfg, f.name))
        for f in dataclasses.fields(QwenConfig)
        if getattr(src, f.name) != getattr(model_cfg, f.name)
    }
    if changed:
        log.info("init_from: the run's model differs from the source in %s", json.dumps(changed))


def load_source_params(source: Source, model_cfg: QwenConfig, steps) -> nnx.State:
    """The source's parameters, restored directly into `steps.state_shardings["params"]` (the
    run's param dtype); call `check_source` first."""
    target = steps.base_params
    if source.kind == "train":
        from qwen_jax.train.checkpointing import restore_params

        found = restore_params(source.path, target)
        if found is None:
            raise InitFromError(f"init_from {source.path}: no checkpoint step restores")
        step, params = found
        log.info("init_from: params of step %d of %s", step, source.path)
        return params
    from qwen_jax.checkpoint import load_hf, load_params

    load = load_params if source.kind == "params" else load_hf
    _, model = load(source.path, mesh=steps.mesh, cfg=base_config(model_cfg))
    # Same rules table, same shardings: device_put is a no-op unless a layout differs.
    return jax.device_put(nnx.state(model, nnx.Param), jax.tree.map(lambda a: a.sharding, target))
