"""Token sampling: greedy, temperature, top-k, top-p (nucleus), repetition penalty, seeded.

Processing order follows transformers' `generate` (the convention Qwen's released generation
config relies on): repetition penalty on the raw logits, then temperature, then top-k, then top-p,
then one categorical draw. The reported log-probability of a token is always the *raw* model
distribution's (log_softmax of the unprocessed logits), so it is comparable across samplers.

`SamplingParams` is what callers build. Inside jit it splits into a hashable `SamplerSpec` (the
structure: greedy or not, k, which filters are on — a new structure compiles once) and a small
array of knob values (temperature, top-p, penalty — changing them never recompiles).

Serving batches mix requests with different settings: `sample_rows` takes one knob row per
request (`row_knobs`: temperature 0 = greedy, top_k a per-row value) and one key per request
(`row_key`), so any mix is one compiled program and a row's draws never depend on its
neighbours.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    repetition_penalty: CTRL-style penalty on every token already in the prompt or output:
      a positive logit is divided by it, a negative one multiplied (1 = off).
    seed: PRNG seed; the same seed, prompts and params give the same tokens.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def spec(self) -> SamplerSpec:
        greedy = self.greedy
        return SamplerSpec(
            greedy=greedy,
            top_k=0 if greedy else self.top_k,
            top_p=not greedy and self.top_p < 1.0,
            penalty=self.repetition_penalty != 1.0,
        )

    def knobs(self) -> jax.Array:
        """[3] fp32: temperature, top_p, repetition_penalty (traced values, no recompiles)."""
        temperature = self.temperature if self.temperature > 0 else 1.0
        return jnp.asarray([temperature, self.top_p, self.repetition_penalty], jnp.float32)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The static structure of a sampler (a jit static argument)."""

    greedy: bool
    top_k: int
    top_p: bool
    penalty: bool


def seen_tokens(tokens_bt: jax.Array, mask_bt: jax.Array, vocab: int) -> jax.Array:
    """[B, V] bool: which ids occur in each row's real (mask = 1) tokens."""
    b = tokens_bt.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], tokens_bt.shape)
    cols = jnp.where(mask_bt.astype(bool), tokens_bt, vocab)  # padding -> out of range, dropped
    return jnp.zeros((b, vocab), bool).at[rows, cols].set(True, mode="drop")


def apply_repetition_penalty(
    logits_bv: jax.Array, seen_bv: jax.Array, penalty: jax.Array
) -> jax.Array:
    """Divide positive / multiply negative logits of already-seen tokens by `penalty`."""
    penalized = jnp.where(logits_bv > 0, logits_bv / penalty, logits_bv * penalty)
    return jnp.where(seen_bv, penalized, logits_bv)


def nucleus_mask(sorted_logits_bk: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, K] bool over logits sorted descending: the smallest prefix whose mass reaches top_p.

    A token is kept when the probability mass strictly before it is below top_p, so the most
    likely token is always kept.
    """
    probs = jax.nn.softmax(sorted_logits_bk, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p


def sample(
    logits_bv: jax.Array,
    key: jax.Array,
    knobs: jax.Array,
    spec: SamplerSpec,
    seen_bv: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row.

    Args:
      logits_bv: [B, V] fp32 next-token logits.
      key: PRNG key (unused when greedy).
      knobs: [3] from `SamplingParams.knobs()`.
      spec: `SamplingParams.spec()`.
      seen_bv: [B, V] bool of tokens already seen (needed when spec.penalty).

    Returns:
      (tokens [B] int32, raw log-probabilities of those tokens [B] fp32)
    """
    logits_bv = logits_bv.astype(jnp.float32)
    raw_logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    temperature, top_p, penalty = knobs[0], knobs[1], knobs[2]
    x_bv = logits_bv
    if spec.penalty:
        x_bv = apply_repetition_penalty(x_bv, seen_bv, penalty)
    if spec.greedy:
        tokens_b = jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
    else:
        x_bv = x_bv / temperature
        if spec.top_k or spec.top_p:
            # Candidates sorted descending: the k best, or the whole vocabulary for top-p alone.
            k = spec.top_k or x_bv.shape[-1]
            vals_bk, ids_bk = jax.lax.top_k(x_bv, k)
            if spec.top_p:
                vals_bk = jnp.where(nucleus_mask(vals_bk, top_p), vals_bk, -jnp.inf)
            choice_b = jax.random.categorical(key, vals_bk, axis=-1)
            tokens_b = jnp.take_along_axis(ids_bk, choice_b[:, None], axis=-1)[:, 0]
        else:
            tokens_b = jax.random.categorical(key, x_bv, axis=-1)
        tokens_b = tokens_b.astype(jnp.int32)
    logp_b = jnp.take_along_axis(raw_logp_bv, tokens_b[:, None], axis=-1)[:, 0]
    return tokens_b, logp_b


# ------------------------------------------------------------------ per-row sampling (serving)

# Columns of a row's knobs (`SamplingParams.row_knobs`): a batch of requests with different
# settings is one [B, ROW_KNOBS] array, so any mix runs in one compiled program.
ROW_KNOBS = ("temperature", "top_p", "top_k", "repetition_penalty")
TOP_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's top_logprobs limit)


def row_knobs(params: SamplingParams) -> np.ndarray:
    """[len(ROW_KNOBS)] fp32 of one request; temperature 0 marks a greedy row, top_k 0 = off."""
    return np.asarray(
        [params.temperature, params.top_p, params.top_k, params.repetition_penalty], np.float32
    )


def row_key(seed: int) -> np.ndarray:
    """The raw data of jax.random.key(seed) (uint32), to stack into a [B, ...] array of keys."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)))


def sample_rows(
    logits_bv: jax.Array,
    knobs_bk: jax.Array,
    keys_b: jax.Array,
    steps_b: jax.Array,
    seen_bv: jax.Array,
    want_top: jax.Array | bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Pick one token per row, each row with its own settings and random stream.

    The order is `sample`'s (repetition penalty, temperature, top-k, top-p, one draw); row b
    draws with key fold_in(key(seed_b), steps_b[b]) (steps_b = tokens the row has generated so
    far), so its tokens depend on its own seed, prompt and settings only, never on which other
    rows share the batch. Greedy rows (temperature 0) take the argmax; rows that sample with no
    filter draw from the whole tempered distribution (no sort); rows with a top-k or top-p
    filter draw from the vocabulary sorted once per step (top_k a per-row value, static cap V,
    so no setting recompiles). Each row's path follows from its own settings alone, and the
    costly parts run only when some row needs them (`lax.cond`): the draw when a row samples,
    the sort when a row filters, the TOP_LOGPROBS ranking when `want_top`.

    Args:
      logits_bv: [B, V] next-token logits.
      knobs_bk: [B, len(ROW_KNOBS)] fp32 rows of `row_knobs`.
      keys_b: [B, ...] uint32 key data (`row_key`).
      steps_b: [B] int32 draw index of each row.
      seen_bv: [B, V] bool tokens already in each row's prompt or output (the penalty's set).
      want_top: scalar bool: some row asked for top log-probs (else those outputs are zeros).

    Returns:
      (tokens [B] int32, their raw log-probabilities [B] fp32, and the TOP_LOGPROBS most likely
      tokens of the raw distribution: ids [B, TOP_LOGPROBS] int32, log-probs [B, TOP_LOGPROBS])
    """
    logits_bv = logits_bv.astype(jnp.float32)
    b, v = logits_bv.shape
    raw_logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    temperature_b, top_p_b, top_k_b, penalty_b = (knobs_bk[:, i] for i in range(4))
    x_bv = apply_repetition_penalty(logits_bv, seen_bv, penalty_b[:, None])  # exact when 1
    greedy_b = jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
    sampling_b = temperature_b > 0
    filtered_b = sampling_b & ((top_k_b > 0) | (top_p_b < 1.0))

    def draw(x_bv):
        x_bv = x_bv / jnp.where(sampling_b, temperature_b, 1.0)[:, None]
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys_b), steps_b)
        plain_b = jax.vmap(jax.random.categorical)(keys, x_bv).astype(jnp.int32)

        def draw_filtered(x_bv):
            ids_bv = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
            neg_bv, ids_bv = jax.lax.sort((-x_bv, ids_bv), dimension=1, num_keys=1)
            vals_bv = -neg_bv  # descending
            k_b = jnp.where(top_k_b > 0, top_k_b, v)
            vals_bv = jnp.where(jnp.arange(v)[None, :] < k_b[:, None], vals_bv, -jnp.inf)
            vals_bv = jnp.where(nucleus_mask(vals_bv, top_p_b[:, None]), vals_bv, -jnp.inf)
            choice_b = jax.vmap(jax.random.categorical)(keys, vals_bv)
            return jnp.take_along_axis(ids_bv, choice_b[:, None], axis=-1)[:, 0].astype(jnp.int32)

        filtered = jax.lax.cond(jnp.any(filtered_b), draw_filtered, lambda _: plain_b, x_bv)
        return jnp.where(sampling_b, jnp.where(filtered_b, filtered, plain_b), greedy_b)

    tokens_b = jax.lax.cond(jnp.any(sampling_b), draw, lambda _: greedy_b, x_bv)
    logp_b = jnp.take_along_axis(raw_logp_bv, tokens_b[:, None], axis=-1)[:, 0]
    k = min(TOP_LOGPROBS, v)

    def top(logp_bv):
        logp_bk, ids_bk = jax.lax.top_k(logp_bv, k)
        return ids_bk.astype(jnp.int32), logp_bk

    def no_top(logp_bv):
        return jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), logp_bv.dtype)

    top_ids_bk, top_logp_bk = jax.lax.cond(want_top, top, no_top, raw_logp_bv)
    return tokens_b, logp_b, top_ids_bk, top_logp_bk
