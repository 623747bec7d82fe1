"""Running mean and variance of raw rewards: the report's reward normalisation ("a running mean"
of the reward model's scores, with the variance as well), as a pytree of fp32 scalars so it lives
in the jitted step and in the Orbax checkpoint next to the models.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RunningMoments:
    """count, mean and m2 (sum of squared deviations from the mean) of every value seen.

    `update(x)` merges a batch with Chan et al.'s parallel formula, so merging batches one by one
    gives the mean / variance of their concatenation (up to fp32 rounding) without keeping them:

      n = n_a + n_b,  d = mean_b - mean_a,
      mean = mean_a + d n_b / n,  m2 = m2_a + m2_b + d^2 n_a n_b / n

    var = m2 / (n - 1) (unbiased), std = sqrt(var). Every field is an fp32 scalar array.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array

    @classmethod
    def create(cls) -> RunningMoments:
        """Nothing seen yet."""
        zero = jnp.zeros((), jnp.float32)
        return cls(count=zero, mean=zero, m2=zero)

    @property
    def var(self) -> jax.Array:
        """Unbiased variance m2 / (n - 1); 0 before two values were seen."""
        return self.m2 / jnp.maximum(self.count - 1.0, 1.0)

    @property
    def std(self) -> jax.Array:
        return jnp.sqrt(self.var)

    def update(self, x: jax.Array) -> RunningMoments:
        """A new RunningMoments that has also seen every element of x (any shape, not empty)."""
        x = jnp.asarray(x, jnp.float32).reshape(-1)
        n_b = jnp.float32(x.shape[0])
        mean_b = jnp.mean(x)
        m2_b = jnp.sum(jnp.square(x - mean_b))
        n = self.count + n_b
        delta = mean_b - self.mean
        return RunningMoments(
            count=n,
            mean=self.mean + delta * n_b / n,
            m2=self.m2 + m2_b + jnp.square(delta) * self.count * n_b / n,
        )

    def normalize(self, x: jax.Array, shift_mean: bool = True, eps: float = 1e-4) -> jax.Array:
        """(x - mean) / std, or x / std with shift_mean=False (scale only: keeps a reward's
        sign). std is floored at eps, and is taken as 1 before two values were seen, so the
        first batches are not blown up by a near-zero spread. Call `update` with the batch
        first so its own spread counts."""
        std = jnp.where(self.count > 1, jnp.maximum(self.std, eps), 1.0)
        centre = self.mean if shift_mean else 0.0
        return (jnp.asarray(x, jnp.float32) - centre) / std

    def to_dict(self) -> dict[str, float]:
        """Plain floats (a checkpoint's JSON metadata, logs)."""
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> RunningMoments:
        return cls(**{f.name: jnp.asarray(d[f.name], jnp.float32) for f in dataclasses.fields(cls)})
