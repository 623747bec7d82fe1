"""The RL math as pure jnp functions (jit-able, no Python control flow on values).

Conventions (qwen_jax/rl): every [B, T] array is aligned with the token sequence: position t
holds the quantity of token tokens[b, t] predicted from tokens[b, <t]. `mask_bt` is float32, 1 on
response tokens only (one contiguous run per row, followed by padding). Losses return SUMS over
the masked tokens; the step divides once by what it chooses (tokens, rows, a fixed constant).
Functions with "mean" / "var" in their name reduce themselves.

KL estimators (Schulman, "Approximating KL divergence", 2020), per token, with x = ref - logp
evaluated on tokens sampled from the policy (so E[.] is under the policy):
  k1 = -x = logp - ref           unbiased for KL(policy || ref); high variance, often negative
                                 per token (its sum is the sequence log-ratio)
  k2 = x^2 / 2                   biased (exact to second order as the policies get close);
                                 low variance, always >= 0
  k3 = exp(x) - 1 - x            unbiased and always >= 0; low variance while the policies are
                                 close, heavy-tailed when ref >> logp. TRL's GRPOTrainer uses k3
                                 in its loss; the report's PPO penalty is the k1 reward term.

Where TRL 1.16 holds the same quantity only inline in a trainer method (GRPO's k3 KL, its
clipped surrogate, its group advantages; TRL 1.16 no longer ships a PPO trainer, GAE or value
loss), tests compare against straightforward numpy loops; entropy and the unbiased std are
compared with TRL's own functions (trl.trainer.utils.entropy_from_logits / nanstd).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp_bt: jax.Array, ref_logp_bt: jax.Array, kind: str) -> jax.Array:
    """Per-token KL(policy || ref) estimate [B, T] from sampled tokens' log-probs (see module
    docstring for k1 / k2 / k3). Not masked: multiply by the mask where it matters."""
    log_ratio = logp_bt - ref_logp_bt
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        # x = ref - logp; exp(x) - 1 - x, written with expm1 for small |x|.
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (expected one of {', '.join(KL_ESTIMATORS)})")


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * mask, axis) / sum(mask, axis) for a 0/1 mask; 0 where the mask is empty (never a
    0/0 NaN: the count is floored at 1)."""
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of the masked entries of x (scalar): mean of squared deviations, times
    n / (n - 1) when unbiased (Bessel; torch's default). 0 for n <= 1."""
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (unbiased var), 0 outside the mask;
    shift_mean=False adds the mean back (scales only, keeps the sign of a mean reward)."""
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's response positions.

      delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
      A_t     = (delta_t + gamma * lam * m_{t+1} * A_{t+1}) * m_t,   A_T = 0
      R_t     = (A_t + V_t) * m_t

    with m the mask: the value after the last response token bootstraps to 0 (the episode
    ends there), and everything outside the mask is 0. Returns (advantages, returns), fp32
    [B, T]. A reverse scan over T: O(T) sequential steps of [B] work.
    """
    rewards_bt, values_bt, mask_bt = (
        a.astype(jnp.float32) for a in (rewards_bt, values_bt, mask_bt)
    )
    next_v_bt = jnp.pad(values_bt[:, 1:] * mask_bt[:, 1:], ((0, 0), (0, 1)))
    next_m_bt = jnp.pad(mask_bt[:, 1:], ((0, 0), (0, 1)))
    delta_bt = rewards_bt + gamma * next_v_bt - values_bt

    def back(adv_next_b, xs):
        delta_b, next_m_b, m_b = xs
        adv_b = (delta_b + gamma * lam * next_m_b * adv_next_b) * m_b
        return adv_b, adv_b

    xs = (delta_bt.T, next_m_bt.T, mask_bt.T)  # [T, B]: scan over time, last position first
    _, adv_tb = jax.lax.scan(back, jnp.zeros_like(rewards_bt[:, 0]), xs, reverse=True)
    adv_bt = adv_tb.T
    return adv_bt, (adv_bt + values_bt) * mask_bt


def last_index(mask_bt: jax.Array) -> jax.Array:
    """Index [B] of each row's last masked position (0 for an empty row)."""
    t = mask_bt.shape[1]
    positions = jnp.arange(t)
    return jnp.max(jnp.where(mask_bt > 0, positions, 0), axis=1)


def ppo_token_rewards(
    scores_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, kl_coef: float
) -> jax.Array:
    """Per-token PPO rewards [B, T]: -kl_coef * kl at every response token, plus the sequence
    score at the row's last response token (the reward model scores the finished reply)."""
    t = mask_bt.shape[1]
    at_last_bt = jax.nn.one_hot(last_index(mask_bt), t, dtype=jnp.float32)
    has_response_b = jnp.any(mask_bt > 0, axis=1)
    score_bt = at_last_bt * jnp.where(has_response_b, scores_b, 0.0)[:, None]
    return (-kl_coef * kl_bt + score_bt) * mask_bt


def policy_loss_sums(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    adv_bt: jax.Array,
    mask_bt: jax.Array,
    clip_eps: float,
) -> dict[str, jax.Array]:
    """PPO's clipped surrogate, summed over masked tokens (scalars).

      r = exp(logp - old_logp)
      policy_loss = sum(max(-A r, -A clip(r, 1 - eps, 1 + eps)) * mask)
      clipfrac    = sum([-A clip(r) > -A r] * mask)          (tokens where the clip binds)
      approx_kl   = sum(0.5 (logp - old_logp)^2 * mask)       (k2 of old -> new, a diagnostic)

    Gradients flow through logp only; old_logp and A are constants of the update.
    """
    log_ratio = logp_bt - old_logp_bt
    ratio = jnp.exp(log_ratio)
    loss_unclipped = -adv_bt * ratio
    loss_clipped = -adv_bt * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return {
        "policy_loss": jnp.sum(jnp.maximum(loss_unclipped, loss_clipped) * mask_bt),
        "clipfrac": jnp.sum((loss_clipped > loss_unclipped).astype(jnp.float32) * mask_bt),
        "approx_kl": jnp.sum(0.5 * jnp.square(log_ratio) * mask_bt),
    }


def value_loss_sum(
    values_bt: jax.Array,
    old_values_bt: jax.Array,
    returns_bt: jax.Array,
    mask_bt: jax.Array,
    clip: float,
) -> jax.Array:
    """Clipped value loss (scalar): the new value may move at most `clip` from the rollout's
    value before the clipped branch takes over (the report's value-loss clipping, 0.15).

      sum(0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2) * mask)
    """
    clipped = jnp.clip(values_bt, old_values_bt - clip, old_values_bt + clip)
    worst = jnp.maximum(jnp.square(values_bt - returns_bt), jnp.square(clipped - returns_bt))
    return jnp.sum(0.5 * worst * mask_bt)


def explained_variance(
    values_bt: jax.Array, returns_bt: jax.Array, mask_bt: jax.Array
) -> jax.Array:
    """1 - var(R - v) / var(R) over masked tokens (scalar): 1 is a perfect value model, 0 no
    better than a constant, < 0 worse. 0 when var(R) = 0 (nothing to explain; a NaN there would
    trip the NaN guard on a healthy run)."""
    var_r = masked_var(returns_bt, mask_bt)
    var_err = masked_var(returns_bt - values_bt, mask_bt)
    return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def group_advantages(rewards_pg: jax.Array, *, scale: bool = True, eps: float = 1e-4) -> jax.Array:
    """GRPO's group-relative advantages [P, G] from rewards of G responses per prompt [P, G].

      scale=True:  (r - mean_g) / (std_g + eps), std unbiased (ddof 1, as torch's default and
                   TRL's GRPOTrainer); G >= 2
      scale=False: r - mean_g (Dr. GRPO: no per-group scaling, no difficulty bias)

    A group whose rewards are all equal gets 0 advantage (no signal), either way.
    """
    rewards_pg = rewards_pg.astype(jnp.float32)
    centred = rewards_pg - jnp.mean(rewards_pg, axis=1, keepdims=True)
    if not scale:
        return centred
    std = jnp.std(rewards_pg, axis=1, keepdims=True, ddof=1)
    return centred / (std + eps)
