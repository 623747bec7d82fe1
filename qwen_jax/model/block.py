"""One decoder layer as named pure functions: `attention_block`, `mlp_block`, `layer`.

Legend: B batch, T query len, S kv len, D model, N heads, K kv heads, H head dim, F ffn.

Each function takes one layer's parameters as a dict (the names of `transformer.Blocks.stacked()`
without the layer axis, plus "<name>_scale" for weight-only int8, qwen_jax.model.quantize) and
runs under a `jax.named_scope`, so a layer can be called, tested and profiled alone. The same
functions serve the training layer scan (no cache) and the inference engine's unrolled loop
(per-layer KV buffers); which attention implementation runs is decided in
`qwen_jax.model.dispatch` only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.model import dispatch, rope
from qwen_jax.model.cache import write_rows
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import rms_norm, swiglu
from qwen_jax.sharding import shard


@dataclasses.dataclass(frozen=True)
class Context:
    """What every layer of one forward shares (built once per call, closed over by the loop).

    cos_bth / sin_bth: RoPE angles of the T new tokens; q_scale_bt: LogN query scale or None;
    q_slot_bt [B, T]: each query's slot (arange(T) without a cache, the cache slot with one).
    Without a cache: segment_ids_bt [B, T] (packing; 0 = padding). With a cache (K/V passed to
    the layer): starts_b [B] each row's first valid slot and lengths_b [B] its write slot
    (qwen_jax.model.cache).
    """

    cos_bth: jax.Array
    sin_bth: jax.Array
    q_scale_bt: jax.Array | None
    q_slot_bt: jax.Array
    segment_ids_bt: jax.Array | None = None
    starts_b: jax.Array | None = None
    lengths_b: jax.Array | None = None


def keep_dtype(name: str, value: jax.Array) -> bool:
    """int8 weights and their scales are not cast to the compute dtype (quantize.py)."""
    return value.dtype == jnp.int8 or name.endswith("_scale")


def cast_params(p: dict[str, jax.Array], dtype) -> dict[str, jax.Array]:
    """The layer's weights in the compute dtype (int8 weights and scales as they are)."""
    return {k: v if keep_dtype(k, v) else v.astype(dtype) for k, v in p.items()}


def attention_block(
    cfg: QwenConfig,
    p: dict[str, jax.Array],
    x_btd: jax.Array,
    ctx: Context,
    window: jax.Array | int = 0,
    kv: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x + o(attention(rope(q(ln_1 x)), rope(k(ln_1 x)), v(ln_1 x))): [B,T,D] -> [B,T,D].

    kv: this layer's cache buffers (k, v [B, S, K, H]) or None. With them, the T new keys and
    values are written at each row's slots [lengths_b, lengths_b + T) and the queries attend
    over the cache; the updated buffers are returned (else None).
    """
    with jax.named_scope("attention_block"):
        dt = cfg.compute_dtype
        p = cast_params(p, dt)
        mm = lambda spec, x, name: dispatch.matmul(  # noqa: E731
            spec, x, p[name], impl=cfg.matmul_impl, scale=p.get(f"{name}_scale")
        )
        h = rms_norm(x_btd, p["ln_1"], cfg.rms_eps)
        q = mm("btd,dnh->btnh", h, "wq")
        k = mm("btd,dkh->btkh", h, "wk")
        v = mm("btd,dkh->btkh", h, "wv")
        if cfg.qkv_bias:
            q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
        q, k = (
            rope.apply_rope(q, ctx.cos_bth, ctx.sin_bth),
            rope.apply_rope(k, ctx.cos_bth, ctx.sin_bth),
        )
        if ctx.q_scale_bt is not None:
            q = (q.astype(jnp.float32) * ctx.q_scale_bt[:, :, None, None]).astype(dt)
        q = checkpoint_name(shard(q, "batch", None, "act_heads", None), "q")
        k = checkpoint_name(k, "k")
        v = checkpoint_name(v, "v")
        if kv is None:
            o = dispatch.attention(
                q,
                k,
                v,
                impl=cfg.attention_impl,
                q_slot_bt=ctx.q_slot_bt,
                q_segment_bt=ctx.segment_ids_bt,
                kv_segment_bs=ctx.segment_ids_bt,
                window=window,
            )
        else:
            kv = write_rows(kv[0], k, ctx.lengths_b), write_rows(kv[1], v, ctx.lengths_b)
            o = dispatch.cache_attention(
                q,
                kv[0].astype(dt),
                kv[1].astype(dt),
                impl=cfg.attention_impl,
                q_slot_bt=ctx.q_slot_bt,
                starts_b=ctx.starts_b,
                window=window,
            )
        o = checkpoint_name(o, "attn_out")
        return x_btd + mm("btnh,nhd->btd", o, "wo"), kv


def mlp_block(cfg: QwenConfig, p: dict[str, jax.Array], x_btd: jax.Array) -> jax.Array:
    """x + swiglu(ln_2 x): [B,T,D] -> [B,T,D] (qwen_jax.model.layers.swiglu)."""
    with jax.named_scope("mlp_block"):
        p = cast_params(p, cfg.compute_dtype)
        h = rms_norm(x_btd, p["ln_2"], cfg.rms_eps)
        scales = tuple(p.get(f"{n}_scale") for n in ("w1", "w2", "c_proj"))
        y = swiglu(h, p["w1"], p["w2"], p["c_proj"], impl=cfg.matmul_impl, scales=scales)
        return x_btd + y


def layer(
    cfg: QwenConfig,
    p: dict[str, jax.Array],
    x_btd: jax.Array,
    ctx: Context,
    window: jax.Array | int = 0,
    kv: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder layer: `attention_block` then `mlp_block`; returns (x [B,T,D], kv)."""
    with jax.named_scope("layer"):
        x_btd, kv = attention_block(cfg, p, x_btd, ctx, window, kv)
        x_btd = mlp_block(cfg, p, x_btd)
        return shard(x_btd, "batch", "act_seq", "act_embed"), kv
