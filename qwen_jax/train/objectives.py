"""Training objectives: what a step reads from a batch and what it minimises.

An `Objective` declares its batch features (name, dtype, per-token or per-example) and maps
(model, batch, StepContext) to sums: (objective_sum, metric sums), where the metric sums hold
the objective's weight under `weight_name` (tokens for the LM loss; pairs for the preference
objectives).
The one train step (step.py) differentiates objective_sum, accumulates every sum over
microbatches in fp32 and divides gradients and metrics by the total weight once, so gradient
accumulation is exact for every objective. Adding an objective = a subclass + an entry in
`OBJECTIVES` (+ its knobs in `ObjectiveConfig`); the step, the loop, AOT compile and the bench
need no change. Objectives: "lm" (pretraining, and chat SFT: SFT batches carry the same decoder
features with the ChatML loss mask as weights), "reward" (train/reward.py), "dpo" (train/dpo.py).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qwen_jax.model.transformer import Qwen
from qwen_jax.train.chunked_loss import fused_cross_entropy
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
    # lm: the head + cross-entropy with each block's gradient taken in the forward pass
    # (train/chunked_loss.py: 3 head matmuls per token instead of 4; XLA dots only). Off until
    # the GPU run (scripts/gpu_perf.py) measures it against the default path.
    fused_loss: bool = False
    beta: float = 0.1  # dpo: strength of the implicit KL penalty
    dpo_loss: str = "sigmoid"  # dpo: "sigmoid" (DPO) | "ipo"
    label_smoothing: float = 0.0  # dpo: conservative DPO's label noise (sigmoid only)
    # dpo: where the reference log-probs come from: "model" (a frozen copy of the starting
    # weights, run on every batch) or "precomputed" (batch features ref_{chosen,rejected}_logps).
    reference: str = "model"
    margin: float = 0.0  # reward: m in -log sigmoid(r_chosen - r_rejected - m)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the step hands an objective besides the model and batch.

    rng: the dropout key of this (micro)batch, None when no dropout is configured and always in
    evaluation. reference: the frozen reference model of objectives with `needs_reference`
    (DPO), else None.
    """

    rng: jax.Array | None = None
    reference: Qwen | None = None


class Objective(abc.ABC):
    """Pure: no state beyond frozen hyperparameters; `loss_sums` is traced inside the step."""

    features: ClassVar[tuple[Feature, ...]]
    weight_name: ClassVar[str]  # the metric sum that normalises gradients and metrics
    needs_reference: ClassVar[bool] = False  # the step passes StepContext.reference

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def abstract_batch(self, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """ShapeDtypeStructs of a global batch (AOT compilation, benchmarks)."""
        return {
            f.name: jax.ShapeDtypeStruct(f.shape(batch, seq_len), f.dtype) for f in self.features
        }

    @abc.abstractmethod
    def loss_sums(
        self, model: Qwen, batch: Batch, ctx: StepContext
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
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
    fused: bool = False  # train/chunked_loss.py (XLA dots: no pallas / int8 head)

    features: ClassVar[tuple[Feature, ...]] = LM_FEATURES
    weight_name: ClassVar[str] = "tokens"

    def loss_sums(
        self, model: Qwen, batch: Batch, ctx: StepContext
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        h_btd, _ = model(
            batch["decoder_input_tokens"],
            positions_bt=batch["decoder_positions"],
            segment_ids_bt=batch["decoder_segment_ids"],
            return_hidden=True,
            dropout_rng=ctx.rng,
        )
        w_dv = model.head_weight().astype(h_btd.dtype)
        tgt, wt = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        if self.fused:
            if model.cfg.matmul_impl != "xla":
                raise ValueError("objective.fused_loss needs model.matmul_impl='xla'")
            obj, ce, z, w = fused_cross_entropy(
                h_btd, w_dv, tgt, wt, chunk=self.chunk, z_loss=self.z_loss
            )
            return obj, {"loss": ce, "z_loss": z, "tokens": w}
        ce, z, w = chunked_cross_entropy(
            h_btd, w_dv, tgt, wt, chunk=self.chunk, z_loss=self.z_loss,
            matmul_impl=model.cfg.matmul_impl,
        )  # fmt: skip
        return ce + z, {"loss": ce, "z_loss": z, "tokens": w}


def _reward(c: ObjectiveConfig) -> Objective:
    from qwen_jax.train.reward import RewardObjective

    return RewardObjective(margin=c.margin)


def _dpo(c: ObjectiveConfig) -> Objective:
    from qwen_jax.train.dpo import DPOObjective

    return DPOObjective(
        beta=c.beta,
        loss_type=c.dpo_loss,
        label_smoothing=c.label_smoothing,
        reference=c.reference,
        chunk=c.loss_chunk,
    )


# The preference objectives import lazily: their modules import this one.
OBJECTIVES: dict[str, Callable[[ObjectiveConfig], Objective]] = {
    "lm": lambda c: LMObjective(z_loss=c.z_loss, chunk=c.loss_chunk, fused=c.fused_loss),
    "reward": _reward,
    "dpo": _dpo,
}


def make_objective(cfg: ObjectiveConfig) -> Objective:
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.name!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)
