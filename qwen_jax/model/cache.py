"""The KV cache: one K and one V buffer per layer plus per-row write positions, as a pytree.

Legend: B batch (cache rows), T new tokens, S cache slots, K kv heads, H head dim, L layers.

Row b of the cache holds its tokens in slots [starts[b], lengths[b]):
  * slots before starts[b] are left padding (a ragged batch prefilled in one left-padded call);
  * lengths[b] is the next write slot: a forward with T new tokens writes row b's keys and
    values at [lengths[b], lengths[b] + T) and advances lengths[b] by T;
  * slots from lengths[b] on are free; they may hold stale values and are never visible.
A query at slot q of row b sees key slot s iff  starts[b] <= s <= q  (and q - s < window),
`qwen_jax.model.attention.cache_mask`; its RoPE position defaults to q - starts[b] (the number of
the row's tokens before it), so left padding shifts no position.

Rows advance independently: rows at different lengths decode in one batch, each writing at its
own slot and seeing only its own range, which is what continuous batching needs (a scheduler
`reset`s a finished row and `insert`s a request prefilled elsewhere into it).

Why per-row (starts, lengths) and not per-slot segment ids [B, S]: two [B] integers say all a
cache row can be (one contiguous run of one sequence), they are what the Pallas decode kernel
takes (it reads only [max(start, length - window), length) of each row), and a decode step
updates them without touching [B, S] state; a row is reset or moved by rewriting two numbers.
Packing several documents into one cache row is not a layout any caller needs (training and
scoring run without a cache, where packed segment ids still apply).

K/V are tuples of L separate arrays, not one [L, B, S, K, H] array: the engine's unrolled layer
loop updates each layer's buffer in place, where slicing a stacked cache copied the layer's
slice every step. Shardings come from the logical rules table (`cache_batch`, `cache_seq`,
`cache_kv_heads` in qwen_jax.sharding), never from the caller.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwen_jax.model.config import QwenConfig
from qwen_jax.sharding import shard, sharding_for

# Logical axes of a K/V buffer [B, S, K, H] and of a per-row vector [B].
KV_AXES = ("cache_batch", "cache_seq", "cache_kv_heads", None)
ROW_AXES = ("cache_batch",)


def write_rows(buf_bskh: jax.Array, new_btkh: jax.Array, at_b: jax.Array) -> jax.Array:
    """buf with row b's slots [at_b[b], at_b[b] + T) replaced by new[b] (cast to buf's dtype).

    A per-row dynamic_update_slice (one scatter). As with dynamic_update_slice, a write that
    would run past S is clamped to end at S: callers size the cache (the engine does).
    """

    def one(buf_skh, new_tkh, at):
        return jax.lax.dynamic_update_slice(buf_skh, new_tkh.astype(buf_skh.dtype), (at, 0, 0))

    return jax.vmap(one)(buf_bskh, new_btkh, at_b.astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer K/V buffers (L arrays [B, S, K, H]), starts [B] and lengths [B] int32.

    See the module docstring for the layout. Pure: every method returns a new cache.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    starts: jax.Array
    lengths: jax.Array

    @classmethod
    def init(
        cls,
        cfg: QwenConfig,
        batch: int,
        max_len: int,
        *,
        dtype: Any = None,
        starts_b: jax.Array | None = None,
    ) -> KVCache:
        """An empty cache of `max_len` slots per row (compute dtype unless `dtype`).

        starts_b: [B] left padding per row (the first slot a query may see); lengths start at
        0, so a left-padded prefill writes its padding too and lands every row at one length.
        Sharded by the rules table under an active mesh (call it inside jit to create it
        sharded in place).
        """
        dtype = dtype or cfg.compute_dtype
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        starts = jnp.zeros((batch,), jnp.int32) if starts_b is None else starts_b
        cache = cls(k, v, jnp.asarray(starts, jnp.int32), jnp.zeros((batch,), jnp.int32))
        return cache.constrain()

    # ----------------------------------------------------------------------------- shape

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    # -------------------------------------------------------------------------- sharding

    def constrain(self) -> KVCache:
        """The same cache with its sharding constrained by the rules (inside jit; a no-op
        outside a mesh)."""
        return KVCache(
            tuple(shard(x, *KV_AXES) for x in self.k),
            tuple(shard(x, *KV_AXES) for x in self.v),
            shard(self.starts, *ROW_AXES),
            shard(self.lengths, *ROW_AXES),
        )

    def shardings(self, mesh: Mesh) -> KVCache:
        """A KVCache-shaped tree of NamedShardings (for jit's out_shardings or device_put)."""
        kv = lambda x: sharding_for(KV_AXES, x.shape, mesh)  # noqa: E731
        row = sharding_for(ROW_AXES, self.starts.shape, mesh)
        return KVCache(tuple(map(kv, self.k)), tuple(map(kv, self.v)), row, row)

    # ------------------------------------------------------------------------ queries

    def query_slots(self, t: int) -> jax.Array:
        """[B, T] slots of T new tokens: lengths[b] + arange(T)."""
        return self.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]

    def positions(self, t: int) -> jax.Array:
        """[B, T] default RoPE positions of T new tokens: slot - start (0 inside padding)."""
        return jnp.maximum(self.query_slots(t) - self.starts[:, None], 0)

    # ------------------------------------------------------------------------- updates

    def advanced(self, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], t: int) -> KVCache:
        """The cache after a forward wrote T tokens per row into the layer buffers `k`, `v`."""
        return KVCache(tuple(k), tuple(v), self.starts, self.lengths + t)

    def reset(self, rows_b: jax.Array) -> KVCache:
        """Empty the rows where rows_b [B] bool is True (starts = lengths = 0). The buffers are
        untouched: their stale slots lie at or past the new length, so no query sees them."""
        zero = jnp.zeros_like(self.lengths)
        return KVCache(
            self.k,
            self.v,
            jnp.where(rows_b, zero, self.starts),
            jnp.where(rows_b, zero, self.lengths),
        )

    def insert(self, row: jax.Array | int, other: KVCache) -> KVCache:
        """Copy `other`'s R rows into rows [row, row + R) (slots [0, other.max_len), starts and
        lengths); other.max_len <= max_len. E.g. a request prefilled alone, moved into a free
        row of a running decode batch."""
        if other.num_layers != self.num_layers or other.max_len > self.max_len:
            raise ValueError(
                f"cannot insert a cache of {other.num_layers} layers x {other.max_len} slots "
                f"into one of {self.num_layers} layers x {self.max_len} slots"
            )
        row = jnp.asarray(row, jnp.int32)
        put = lambda buf, x: jax.lax.dynamic_update_slice(  # noqa: E731
            buf, x.astype(buf.dtype), (row, 0, 0, 0)
        )
        return KVCache(
            tuple(map(put, self.k, other.k)),
            tuple(map(put, self.v, other.v)),
            jax.lax.dynamic_update_slice(self.starts, other.starts, (row,)),
            jax.lax.dynamic_update_slice(self.lengths, other.lengths, (row,)),
        )
