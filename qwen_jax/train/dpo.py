"""Direct Preference Optimization (Rafailov et al. 2023) and IPO, on preference pairs.

Legend: B pairs, T positions. A response's log-prob is
  logp(y | x) = sum_{t in [prompt_len, length)} log p(tokens[t] | tokens[<t]),
i.e. the reply's tokens and the `<|im_end|>` closing it (qwen_jax.tokenizer.chatml
preference_tokens). The reference log-probs come from a frozen copy of the starting policy, run
on every batch (`reference="model"`, StepContext.reference), or from batch features computed
once over the dataset (`reference="precomputed"`, `precompute_reference_logps`), as TRL's
`precompute_ref_log_probs` switch.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from qwen_jax.model.transformer import Qwen
from qwen_jax.train.objectives import Batch, Feature, Objective, StepContext
from qwen_jax.train.reward import PAIR_FEATURES, pair_rows

LOSS_TYPES = ("sigmoid", "ipo")
REFERENCES = ("model", "precomputed")
REF_FEATURES = (
    Feature("ref_chosen_logps", jnp.float32, per_token=False),
    Feature("ref_rejected_logps", jnp.float32, per_token=False),
)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_counts: jax.Array | None = None,
    rejected_counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-pair DPO / IPO losses and implicit rewards, all fp32 [B].

    With the log-ratios  c = pc - rc,  r = pr - rr  (policy minus reference, per response):
      sigmoid (DPO; conservative DPO when label_smoothing = ls > 0, Mitchell 2023):
        loss = -(1 - ls) log sigmoid(beta (c - r)) - ls log sigmoid(-beta (c - r))
        (TRL 1.16's "sigmoid" ignores label_smoothing; this is the cDPO note's loss, which
        older TRL applied under "sigmoid" and TRL 1.16 computes in its "aot" loss per pair)
      ipo (Azar et al. 2023, eq. 17, beta = tau):
        loss = (c / n_c - r / n_r - 1 / (2 beta))^2
      with n_c, n_r the response token counts (chosen_counts / rejected_counts, >= 1) as TRL
      normalises IPO's log-ratios per token; without counts n = 1 (the paper's sequence form).
    Implicit rewards: beta * c and beta * r, under stop_gradient (metrics, as TRL detaches them).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose from {LOSS_TYPES}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(z)
        if label_smoothing:
            losses = losses - label_smoothing * jax.nn.log_sigmoid(-z)
    else:
        if label_smoothing:
            raise ValueError(
                "label_smoothing is conservative DPO's: use it with loss_type='sigmoid'"
            )

        def per_token(x, n):
            return x if n is None else x / jnp.maximum(n, 1).astype(x.dtype)

        delta = per_token(chosen_ratio, chosen_counts) - per_token(rejected_ratio, rejected_counts)
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_ratio)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_ratio)
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(
    model: Qwen,
    tokens_bt: jax.Array,
    lengths_b: jax.Array,
    prompt_lengths_b: jax.Array,
    *,
    chunk: int = 256,
    rng: jax.Array | None = None,
) -> jax.Array:
    """fp32 [B]: sum_{t in [prompt_len, length)} log p(tokens[t] | tokens[<t]) under `model`.

    Position t-1 predicts token t, so the targets are the tokens shifted left by one and the
    positions summed are [prompt_len - 1, length - 1). Rows are right-padded: causal attention
    keeps the padding out of every summed position, so no attention mask is needed. An empty
    row (length 0) gives 0. `rng` is the dropout key (None: no dropout).
    """
    _, t = tokens_bt.shape
    h_btd, _ = model(tokens_bt, return_hidden=True, dropout_rng=rng)
    targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
    logp_bt, _ = model.token_logprobs(h_btd, targets_bt, chunk=chunk)
    pos_t = jnp.arange(t)
    mask_bt = (pos_t >= prompt_lengths_b[:, None] - 1) & (pos_t < lengths_b[:, None] - 1)
    return jnp.sum(jnp.where(mask_bt, logp_bt, 0.0), axis=-1)


def pair_logps(
    model: Qwen, batch: Batch, *, chunk: int = 256, rng: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) response log-probs fp32 [B] of a pair batch, in one forward over the
    [2B, T] concatenation (as TRL: one launch per layer instead of two)."""
    tokens, lengths, _ = pair_rows(batch)
    prompts = jnp.concatenate([batch["prompt_lengths"]] * 2, axis=0)
    logps = sequence_logps(model, tokens, lengths, prompts, chunk=chunk, rng=rng)
    chosen, rejected = jnp.split(logps, 2)
    return chosen, rejected


def precompute_reference_logps(reference: Qwen, batch: Batch, *, chunk: int = 256) -> Batch:
    """The `reference="precomputed"` features of a pair batch: {"ref_chosen_logps",
    "ref_rejected_logps"} fp32 [B] under `reference` (no dropout). Pure; jit it with the model
    split (nnx.split / merge) to run it over a dataset once before training."""
    chosen, rejected = pair_logps(reference, batch, chunk=chunk)
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


@dataclasses.dataclass(frozen=True)
class DPOObjective(Objective):
    """DPO / IPO / conservative DPO on pair batches (loss formulas: `dpo_loss`).

    objective = sum_b w_b loss_b over real pairs (w_b = chosen_lengths_b > 0). Metrics (sums,
    the step divides them by `pairs`): loss, rewards_chosen, rewards_rejected (beta * log-ratio),
    reward_accuracy (rewards_chosen > rewards_rejected), reward_margin (their difference),
    logps_chosen, logps_rejected (the policy's) and pairs = sum_b w_b.

    The policy forward takes the step's dropout key; the reference runs without dropout and
    under stop_gradient.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "model"  # "model": StepContext.reference | "precomputed": batch features
    chunk: int = 256  # positions per vocabulary-head block (qwen_jax.model.logprobs)

    weight_name: ClassVar[str] = "pairs"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"objective.dpo_loss={self.loss_type!r}: choose from {LOSS_TYPES}")
        if self.reference not in REFERENCES:
            raise ValueError(f"objective.reference={self.reference!r}: choose from {REFERENCES}")
        if self.beta <= 0:
            raise ValueError(f"objective.beta={self.beta} must be > 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing={self.label_smoothing} not in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("objective.label_smoothing is conservative DPO's: dpo_loss='sigmoid'")

    @property
    def features(self) -> tuple[Feature, ...]:  # type: ignore[override]
        """The pair batch, plus the reference log-probs when they are precomputed."""
        return PAIR_FEATURES + (REF_FEATURES if self.reference == "precomputed" else ())

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.reference == "model"

    def loss_sums(
        self, model: Qwen, batch: Batch, ctx: StepContext
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        w_b = (batch["chosen_lengths"] > 0).astype(jnp.float32)
        chosen, rejected = pair_logps(model, batch, chunk=self.chunk, rng=ctx.rng)
        if self.reference == "model":
            if ctx.reference is None:
                raise ValueError("DPO with reference='model' needs StepContext.reference")
            ref_chosen, ref_rejected = jax.lax.stop_gradient(
                pair_logps(ctx.reference, batch, chunk=self.chunk)
            )
        else:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        losses, r_chosen, r_rejected = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_counts=batch["chosen_lengths"] - batch["prompt_lengths"],
            rejected_counts=batch["rejected_lengths"] - batch["prompt_lengths"],
        )
        loss = jnp.sum(w_b * losses)

        def total(x):
            return jnp.sum(w_b * x)

        metrics = {
            "loss": loss,
            "rewards_chosen": total(r_chosen),
            "rewards_rejected": total(r_rejected),
            "reward_accuracy": total(r_chosen > r_rejected),
            "reward_margin": total(r_chosen - r_rejected),
            "logps_chosen": total(jax.lax.stop_gradient(chosen)),
            "logps_rejected": total(jax.lax.stop_gradient(rejected)),
            "pairs": jnp.sum(w_b),
        }
        return loss, metrics
