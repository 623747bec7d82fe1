"""Params-only Orbax checkpoints: the inference export format.

Layout of a params directory:
  params/        Orbax PyTree checkpoint of the nnx.Param state (pure arrays)
  qwen_config.json   the QwenConfig fields
  tokenizer/     optional copy of the tokenizer files the model was trained with
Restore goes into the abstract tree of the config, resharded onto any mesh (or one device).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.checkpoint.hf import CheckpointError, check_output_dir, short_error
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import tree_shardings

CONFIG_FILE = "qwen_config.json"


def config_to_json(cfg: QwenConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def config_from_json(text: str) -> QwenConfig:
    fields = json.loads(text)
    if not isinstance(fields, dict):
        raise CheckpointError(f"{CONFIG_FILE} is not a JSON object")
    known = {f.name for f in dataclasses.fields(QwenConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{CONFIG_FILE} has unknown fields {unknown}")
    # JSON has no tuples: every list goes back to a tuple (the config is hashed by jit).
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return QwenConfig(**fields)


def is_params_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).exists() and (Path(path) / "params").exists()


def save_params(
    model: Qwen, out_dir: str | os.PathLike, *, tokenizer_files: Sequence[os.PathLike] = ()
) -> Path:
    """Write a params-only checkpoint to `out_dir` (must not exist; written atomically).

    `tokenizer_files` are copied into `tokenizer/` so the export is self-contained.
    """
    if hasattr(model.blocks, "wq_scale"):
        raise ValueError(
            "refusing to export an int8-quantized model (qwen_jax.model.quantize): exports hold "
            "the float weights; quantize after loading (load_engine(..., int8=True))"
        )
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent.absolute()))
    try:
        state = nnx.state(model, nnx.Param).to_pure_dict()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", state)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(config_to_json(model.cfg))
        if tokenizer_files:
            (tmp / "tokenizer").mkdir()
            for f in tokenizer_files:
                shutil.copy(f, tmp / "tokenizer" / Path(f).name)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, OSError | CheckpointError):
            # Orbax reports TensorStore write failures (ENOSPC among them) as pages of spec.
            raise CheckpointError(f"writing {out} failed: {short_error(e, root=True)}") from None
        raise
    return out


def load_config(path: str | os.PathLike) -> QwenConfig:
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: {path} is not a params checkpoint")
    try:
        return config_from_json(cfg_file.read_text())
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {short_error(e)}") from None


def load_params(
    path: str | os.PathLike, *, mesh: Mesh | None = None, cfg: QwenConfig | None = None
) -> tuple[QwenConfig, Qwen]:
    """Restore a params checkpoint into a model (sharded on `mesh` if given). A damaged
    export is a one-line CheckpointError naming it and the array TensorStore could not read.

    `cfg` may change non-architectural fields (dtype, remat, attention impl, long-context
    switches); shapes must match the saved ones.
    """
    cfg = cfg or load_config(path)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    params_abs, rest_abs = nnx.split_state(abstract_state, nnx.Param, ...)
    if mesh is not None:
        shardings = tree_shardings(params_abs, mesh)
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(
            lambda v: v.replace(sharding), params_abs, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        params_abs.to_pure_dict(),
        shardings.to_pure_dict(),
    )
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(Path(path).absolute() / "params", target)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore errors run to pages of spec
        raise CheckpointError(
            f"params export {path} is damaged: {short_error(e, root=True)}"
        ) from None
    params_abs.replace_by_pure_dict(restored)
    return cfg, nnx.merge(graphdef, params_abs, rest_abs)
