"""Per-token quantities of rollouts under the policy, value, reference and reward models: pure,
differentiable functions of an nnx `Qwen`, used to build the experience (outside grad) and
inside the PPO / GRPO losses (under nnx.grad, jit, a mesh).

Shapes: B rows, T positions, D model width. tokens_bt int32 [B, T] are right-padded sequences
(prompt + response) of lengths_b [B] real tokens. Every [B, T] result is token-aligned with the
sequence (qwen_jax.rl's convention): position t holds the quantity of token tokens[t] predicted
from tokens[<t], so it is computed from the hidden state h[t - 1]; position 0 (no prediction)
and the padding t >= length hold 0.

Attention uses segment_ids_bt = (t < length): padding is never attended, so a row's numbers do
not depend on how far it is padded or on its neighbours. The forward is the training forward
(the layer scan, no dynamic NTK or LogN): the same function scores the rollouts and is
differentiated by the loss. The vocabulary head runs through `Qwen.token_logprobs` (chunked,
no [B, T, V] logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_jax.model.transformer import Qwen


def valid_mask(tokens_bt: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """int32 [B, T]: 1 at t < length (the attention segment ids of a right-padded batch)."""
    t = jnp.arange(tokens_bt.shape[1], dtype=jnp.int32)
    return (t[None, :] < lengths_b[:, None]).astype(jnp.int32)


def hidden_states(
    model: Qwen, tokens_bt: jax.Array, lengths_b: jax.Array, dropout_rng: jax.Array | None = None
) -> jax.Array:
    """The final-norm hidden states [B, T, D] (compute dtype) with padding masked out."""
    h_btd, _ = model(
        tokens_bt,
        segment_ids_bt=valid_mask(tokens_bt, lengths_b),
        return_hidden=True,
        dropout_rng=dropout_rng,
    )
    return h_btd


def _predicted(x_bt: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """x_bt [B, T] computed at the predicting position t - 1 -> token-aligned [B, T]: shifted
    right by one, 0 at t = 0 and t >= length."""
    shifted_bt = jnp.pad(x_bt[:, :-1], ((0, 0), (1, 0)))
    t = jnp.arange(x_bt.shape[1], dtype=jnp.int32)
    keep_bt = (t[None, :] >= 1) & (t[None, :] < lengths_b[:, None])
    return jnp.where(keep_bt, shifted_bt, 0.0)


def sequence_logprobs(
    model: Qwen,
    tokens_bt: jax.Array,
    lengths_b: jax.Array,
    *,
    with_entropy: bool = False,
    dropout_rng: jax.Array | None = None,
    chunk: int = 256,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """logp_bt fp32 [B, T]: logp[b, t] = log p(tokens[b, t] | tokens[b, <t]) for 1 <= t <
    length, 0 elsewhere; with `with_entropy` also entropy_bt fp32 [B, T], the entropy of the
    distribution predicting position t (same zeros).

    The head reads h[t] with target tokens[t + 1] (the last column's target is a dummy) and
    the result is shifted right by one; `chunk` positions per head block. `dropout_rng` turns
    on dropout (the policy's training forward); None for experience and references.
    """
    h_btd = hidden_states(model, tokens_bt, lengths_b, dropout_rng)
    targets_bt = jnp.pad(tokens_bt[:, 1:], ((0, 0), (0, 1)))
    if not with_entropy:
        logp_bt, _ = model.token_logprobs(h_btd, targets_bt, chunk=chunk)
        return _predicted(logp_bt, lengths_b)
    logp_bt, _, entropy_bt = model.token_logprobs(h_btd, targets_bt, chunk=chunk, with_entropy=True)
    return _predicted(logp_bt, lengths_b), _predicted(entropy_bt, lengths_b)


def _score_weight(model: Qwen) -> jax.Array:
    if not hasattr(model, "score"):
        raise ValueError(
            "value and reward models need the score head (QwenConfig.reward_head=True)"
        )
    return model.score[...][:, 0].astype(jnp.float32)


def token_values(
    value_model: Qwen,
    tokens_bt: jax.Array,
    lengths_b: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """values_bt fp32 [B, T]: values[b, t] = score . h[b, t - 1], the value of the state before
    token t (what GAE needs at each response token), for 1 <= t < length; 0 elsewhere.

    The score head [D, 1] is `Qwen.rewards`' (read in fp32 at every position instead of one),
    so a value model initialised from the reward model starts at the RM's per-prefix scores.
    """
    w_d = _score_weight(value_model)
    h_btd = hidden_states(value_model, tokens_bt, lengths_b, dropout_rng)
    v_bt = jnp.einsum(
        "btd,d->bt", h_btd.astype(jnp.float32), w_d, precision=jax.lax.Precision.HIGHEST
    )
    return _predicted(v_bt, lengths_b)


def sequence_scores(reward_model: Qwen, tokens_bt: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """fp32 [B]: `Qwen.rewards` at index length - 1, the response's last token (its
    `<|im_end|>` when it finished): where the reward model was trained to read
    (qwen_jax.train.reward). A row that ran out of tokens is read at its last sampled token."""
    _score_weight(reward_model)
    h_btd = hidden_states(reward_model, tokens_bt, lengths_b)
    return reward_model.rewards(h_btd, jnp.maximum(lengths_b - 1, 0))
