"""Checkpoint formats: HF safetensors (import/export) and params-only Orbax (inference export).

Training-state checkpoints (params + optimizer + data position) live in qwen_jax.train.
"""

from __future__ import annotations

import os
from typing import Any

from jax.sharding import Mesh

from qwen_jax.checkpoint.hf import (
    CheckpointError,
    check_output_dir,
    load_hf,
    read_config,
    save_hf,
)
from qwen_jax.checkpoint.params import is_params_dir, load_config, load_params, save_params
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen

__all__ = [
    "CheckpointError",
    "check_output_dir",
    "load_hf",
    "save_hf",
    "load_params",
    "save_params",
    "load_model",
    "checkpoint_config",
]


def checkpoint_config(path: str | os.PathLike) -> QwenConfig:
    """The architecture of a params directory or an HF directory, read without loading weights."""
    return load_config(path) if is_params_dir(path) else read_config(path)


def load_model(
    path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides: Any
) -> tuple[QwenConfig, Qwen]:
    """Load a params checkpoint or an HF directory; `overrides` replace config fields."""
    cfg = checkpoint_config(path)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if is_params_dir(path):
        return load_params(path, mesh=mesh, cfg=cfg)
    return load_hf(path, mesh=mesh, cfg=cfg)
