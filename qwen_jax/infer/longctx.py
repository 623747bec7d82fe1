"""The paper's training-free long-context switches at inference (spec §2).

All three live in the model's config, so they follow the checkpoint by default and switch
independently:
  use_dynamic_ntk  NTK-aware RoPE base scaling. The alpha is chosen once per row at prefill from
                   that row's real (unpadded) length and held fixed while decoding, as the
                   reference does (spec §2.1); alpha = 1 while the length is <= seq_length.
  use_logn_attn    queries at positions p with p + 1 > seq_length scaled by ln(p+1)/ln(seq_length)
                   (spec §2.2), applied by the model from each token's position.
  attn_windows     one window per layer (0 = full attention); the paper gives lower layers the
                   shorter windows (spec §2.3).
The model implements the math (qwen_jax.model.rope / attention); this module decides the alpha
and builds a model view with the switches overridden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.model import rope
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen


def prefill_alpha(cfg: QwenConfig, lengths_b) -> jax.Array | None:
    """[B] fp32 dynamic-NTK alpha from each row's real prompt length; None when NTK is off."""
    if not cfg.use_dynamic_ntk:
        return None
    return rope.ntk_alpha(jnp.asarray(np.asarray(lengths_b), jnp.int32), cfg.seq_length)


def parse_windows(spec: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer windows from a CLI string.

    "off" or "" -> () (every layer full); "512" -> 512 for every layer; a comma list of
    `WINDOW` or `WINDOW*COUNT` items, lowest layer first, covering exactly num_layers layers:
    "256*2,512*2,0*4" = layers 0-1 window 256, layers 2-3 window 512, layers 4-7 full.
    """
    spec = spec.strip()
    if spec in ("", "off", "none"):
        return ()
    items: list[int] = []
    for part in spec.split(","):
        window, _, count = part.strip().partition("*")
        try:
            w, n = int(window), int(count or 1)
        except ValueError:
            raise ValueError(f"bad window item {part!r}: expected WINDOW or WINDOW*COUNT") from None
        if w < 0 or n < 1:
            raise ValueError(f"bad window item {part!r}: window >= 0 and count >= 1")
        items += [w] * n
    if len(items) == 1:
        items *= num_layers
    if len(items) != num_layers:
        raise ValueError(
            f"--window {spec!r} gives {len(items)} layers; the model has {num_layers} "
            "(use WINDOW*COUNT items that add up, or a single WINDOW for every layer)"
        )
    return tuple(items)


def long_context_config(
    cfg: QwenConfig,
    *,
    ntk: bool | None = None,
    logn: bool | None = None,
    windows: tuple[int, ...] | None = None,
) -> QwenConfig:
    """`cfg` with the switches that are not None replaced."""
    changes = {}
    if ntk is not None:
        changes["use_dynamic_ntk"] = ntk
    if logn is not None:
        changes["use_logn_attn"] = logn
    if windows is not None:
        changes["attn_windows"] = tuple(windows)
    return cfg.replace(**changes) if changes else cfg


def with_long_context(model: Qwen, **switches) -> Qwen:
    """A view of `model` (same parameter arrays) whose config has the switches replaced.

    Keyword arguments as in `long_context_config`.
    """
    cfg = long_context_config(model.cfg, **switches)
    if cfg == model.cfg:
        return model
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    view.cfg = cfg  # the config is static graph data: no parameter is copied
    return view
