"""Optimizer: AdamW with a warmup (linear or half-cosine) then cosine decay or constant,
global-norm clipping, masked decay."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

WarmupShape = Literal["linear", "cosine"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Spec §4.2 defaults: AdamW(0.9, 0.95, 1e-8), decay 0.1, clip 1.0, cosine to 10% of peak."""

    peak_lr: float = 3e-4
    warmup_steps: int = 2000
    total_steps: int = 100_000
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    decay_norms_and_biases: bool = False
    # "cosine" (pretraining) or "constant" (warmup then flat: Code-Qwen, spec §7.1)
    schedule: str = "cosine"
    # The warmup's shape: "linear" (spec §4.2) or "cosine", a half-cosine from 0 to the peak
    # (Code-Qwen-Chat, spec §7.1: "cosine warmup over 3% then constant"). A Literal, so a bad
    # name is a config-load error (train/config.py checks Literal fields against their values).
    warmup_shape: WarmupShape = "linear"


def warmup(cfg: OptimConfig) -> optax.Schedule:
    """0 -> peak over `warmup_steps`: linear, lr(s) = peak * s / warmup; or half-cosine,
    lr(s) = peak * (1 - cos(pi * s / warmup)) / 2 (flat start and end: no jump into the peak)."""
    steps = max(cfg.warmup_steps, 1)
    if cfg.warmup_shape == "linear":
        return optax.linear_schedule(0.0, cfg.peak_lr, steps)
    if cfg.warmup_shape == "cosine":
        peak = cfg.peak_lr

        def half_cosine(step):
            frac = jnp.clip(step / steps, 0.0, 1.0)
            return peak * (1.0 - jnp.cos(jnp.pi * frac)) / 2.0

        return half_cosine
    raise ValueError(
        f"unknown warmup_shape {cfg.warmup_shape!r}; expected one of {typing.get_args(WarmupShape)}"
    )


def learning_rate(cfg: OptimConfig) -> optax.Schedule:
    """`warmup(cfg)` for s < warmup_steps; then cosine from peak to peak * final_fraction over
    the remaining steps (or flat at peak for schedule="constant")."""
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.peak_lr)
    elif cfg.schedule == "cosine":
        decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
        after = optax.cosine_decay_schedule(cfg.peak_lr, decay_steps, alpha=cfg.final_lr_fraction)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected 'cosine' or 'constant'")
    return optax.join_schedules([warmup(cfg), after], [cfg.warmup_steps])


def decay_mask(params: nnx.State, include_norms_and_biases: bool = False):
    """True for matrices (embeddings, projections); False for RMSNorm weights and biases.

    Per layer a norm is [L, D] and a bias [L, heads, H], so the test is on the parameter name,
    not its rank.
    """

    def one(path, _):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return include_norms_and_biases or not name.startswith(("ln_", "bq", "bk", "bv"))

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) -> AdamW(lr schedule, masked weight decay)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(
            learning_rate(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.decay_norms_and_biases),
        ),
    )
