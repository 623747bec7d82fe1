"""Training objectives: what a step reads from a batch and what it minimises.

An `Objective` declares its batch features (name, dtype, per-token or per-example) and maps
(model, batch) to sums: (objective_sum, metric sums), where the metric sums hold the objective's
weight under `weight_name` (tokens for the LM loss; pairs or sequences for later objectives).
The one train step (step.py) differentiates objective_sum, accumulates every sum over
microbatches in fp32 and divides gradients and metrics by the total weight once, so gradient
accumulation is exact for every objective. Adding an objective = a subclass + an entry in
`OBJECTIVES` (+ its knobs in `ObjectiveConfig`); the step, the loop, AOT compile and the bench
need no change.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qwen_jax.model.transformer import Qwen
from qwen_jax.train.losses import chunked_cross_entropy

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Feature:
    """One batch feature: int32/fp32 [B, T] when `per_token`, else [B]."""

    name: str
    dtype: Any = jnp.int32
    per_token: bool = True

    def shape(self, batch: int, seq_len: int) -> tuple[int, ...]:
        return (batch, seq_len) if self.per_token else (batch,)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The `objective` config section. Each field names the objectives that read it."""

    name: str = "lm"  # a key of OBJECTIVES
    z_loss: float = 0.0  # lm: PaLM's z-loss coefficient on logsumexp^2
    loss_chunk: int = 256  # all: sequence positions per block through the vocabulary head


class Objective(abc.ABC):
    """Pure: no state beyond frozen hyperparameters; `loss_sums` is traced inside the step."""

    features: ClassVar[tuple[Feature, ...]]
    weight_name: ClassVar[str]  # the metric sum that normalises gradients and metrics

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def abstract_batch(self, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of a global batch (AOT compilation, benchmarks)."""
        return {
            f.name: jax.ShapeDtypeStruct(f.shape(batch, seq_len), f.dtype) for f in self.features
        }

    @abc.abstractmethod
    def loss_sums(self, model: Qwen, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(objective sum, {metric: sum} incl. `weight_name`) of one (micro)batch, fp32 scalars."""


# The seqio decoder features of packed or padded LM batches (qwen_jax.data.packing), int32 [B, T].
LM_FEATURES = (
    Feature("decoder_input_tokens"),
    Feature("decoder_target_tokens"),
    Feature("decoder_loss_weights"),
    Feature("decoder_segment_ids"),
    Feature("decoder_positions"),
)


@dataclasses.dataclass(frozen=True)
class LMObjective(Objective):
    """Next-token cross-entropy (+ z-loss), weighted by decoder_loss_weights.

    objective = sum_t w_t * (ce_t + z_loss * lse_t^2),  metrics: loss = sum w*ce,
    z_loss = sum w*z, tokens = sum w  (each divided by the total `tokens` by the step).
    """

    z_loss: float = 0.0
    chunk: int = 256  # positions per vocabulary-head block (train/losses.py)

    features: ClassVar[tuple[Feature, ...]] = LM_FEATURES
    weight_name: ClassVar[str] = "tokens"

    def loss_sums(self, model: Qwen, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        h_btd, _ = model(
            batch["decoder_input_tokens"],
            positions_bt=batch["decoder_positions"],
            segment_ids_bt=batch["decoder_segment_ids"],
            return_hidden=True,
        )
        ce, z, w = chunked_cross_entropy(
            h_btd,
            model.head_weight().astype(h_btd.dtype),
            batch["decoder_target_tokens"],
            batch["decoder_loss_weights"],
            chunk=self.chunk,
            z_loss=self.z_loss,
            matmul_impl=model.cfg.matmul_impl,
        )
        return ce + z, {"loss": ce, "z_loss": z, "tokens": w}


OBJECTIVES: dict[str, Callable[[ObjectiveConfig], Objective]] = {
    "lm": lambda c: LMObjective(z_loss=c.z_loss, chunk=c.loss_chunk),
}


def make_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)
