"""The reward-model objective: a scalar head on Qwen, trained on preference pairs.

The reward r(x, y) is `Qwen.rewards` (the score head [D, 1]) applied to the final hidden state
at index length-1 of each sequence: the `<|im_end|>` that closes the assistant reply
(qwen_jax.tokenizer.chatml.preference_tokens). That is the report's "specific end token":
under causal attention it is the first position that has seen the whole reply, its token is the
same in every sequence (so the head reads a fixed, learned summary slot instead of whatever the
reply's last word happened to be), and it is where transformers' Qwen2ForSequenceClassification
pools as well (the last non-pad token), so an exported head scores the same sequences alike.

Pair batches (qwen_jax.data.pipeline, preference tasks): chosen/rejected token rows [B, T],
their lengths [B] and the shared prompt length [B]; a row with chosen_lengths == 0 is padding.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from qwen_jax.model.transformer import Qwen
from qwen_jax.train.objectives import Batch, Feature, Objective, StepContext

# What a preference pipeline yields (qwen_jax.data.pipeline `_pair_batch`).
PAIR_FEATURES = (
    Feature("chosen_tokens"),
    Feature("rejected_tokens"),
    Feature("chosen_lengths", per_token=False),
    Feature("rejected_lengths", per_token=False),
    Feature("prompt_lengths", per_token=False),
)


def pair_rows(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens [2B, T]: chosen rows then rejected rows, lengths [2B], pair weights fp32 [B]).

    Chosen and rejected run as one forward (one launch per layer instead of two). A pair's
    weight is 1 for a real pair and 0 for a padding row (chosen_lengths == 0)."""
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    lengths = jnp.concatenate([batch["chosen_lengths"], batch["rejected_lengths"]], axis=0)
    weights_b = (batch["chosen_lengths"] > 0).astype(jnp.float32)
    return tokens, lengths, weights_b


def sequence_rewards(
    model: Qwen, tokens_bt: jax.Array, lengths_b: jax.Array, *, rng: jax.Array | None = None
) -> jax.Array:
    """fp32 [B]: the score head at each row's last token (index length-1; 0 for an empty row).

    Rows are right-padded; causal attention keeps the padding out of every real position, so
    no mask is needed. `rng` is the dropout key (None: no dropout)."""
    h_btd, _ = model(tokens_bt, return_hidden=True, dropout_rng=rng)
    return model.rewards(h_btd, jnp.maximum(lengths_b - 1, 0))


@dataclasses.dataclass(frozen=True)
class RewardObjective(Objective):
    """Pairwise ranking loss of a reward model (InstructGPT / the Qwen report, with an optional
    margin as Llama 2's):

      loss_b = -log sigmoid(r_chosen_b - r_rejected_b - margin)

    Sums over real pairs: objective = sum_b w_b loss_b; metrics loss, accuracy
    (r_chosen > r_rejected), reward_chosen, reward_rejected, margin_mean (r_chosen - r_rejected)
    and the weight `pairs` = sum_b w_b (the step divides the others by it).
    """

    margin: float = 0.0

    features: ClassVar[tuple[Feature, ...]] = PAIR_FEATURES
    weight_name: ClassVar[str] = "pairs"

    def loss_sums(
        self, model: Qwen, batch: Batch, ctx: StepContext
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        tokens, lengths, w_b = pair_rows(batch)
        r_chosen, r_rejected = jnp.split(sequence_rewards(model, tokens, lengths, rng=ctx.rng), 2)
        diff_b = r_chosen - r_rejected
        loss = jnp.sum(w_b * -jax.nn.log_sigmoid(diff_b - self.margin))
        metrics = {
            "loss": loss,
            "accuracy": jnp.sum(w_b * (diff_b > 0)),
            "reward_chosen": jnp.sum(w_b * r_chosen),
            "reward_rejected": jnp.sum(w_b * r_rejected),
            "margin_mean": jnp.sum(w_b * diff_b),
            "pairs": jnp.sum(w_b),
        }
        return loss, metrics
