"""One decoder layer as named pure functions: `attention_block`, `mlp_block`, `layer`.

Legend: B batch, T query len, S kv len, D model, N heads, K kv heads, H head dim, F ffn.

Each function takes one layer's parameters as a dict (the names of `transformer.Blocks.stacked()`
without the layer axis: "<name>_scale" for weight-only int8, qwen_jax.model.quantize, and
"<name>_lora_a" / "<name>_lora_b" for LoRA adapters, qwen_jax.model.lora) and runs under a
`jax.named_scope`, so a layer can be called, tested and profiled alone. The same
functions serve the training layer scan (no cache) and the inference engine's unrolled loop
(per-layer KV buffers); which attention implementation runs is decided in
`qwen_jax.model.dispatch` only.

Dropout (training only): with a layer key `rng`, each dropout site of the layer draws its mask
from fold_in(rng, site) (`SITES`): the attention and MLP outputs (rate cfg.dropout) and each
adapter's input (cfg.lora_dropout, one mask per projection as PEFT's per-module dropout). With
rng=None (every inference path) no dropout op exists.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.model import dispatch, rope
from qwen_jax.model.cache import write_rows
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import dropout, lora_delta, rms_norm, swiglu
from qwen_jax.sharding import shard

# Per-layer dense projections -> number of contracted (input) axes after the layer axis: the
# weights quantize.py holds int8 and LoRA may adapt (w [*in, *out]).
DENSE = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w1": 1, "w2": 1, "c_proj": 1}
# Dropout sites of one layer -> the fold_in index of their key (module docstring).
SITES = {name: i for i, name in enumerate(("attn_out", "mlp_out", *DENSE))}


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


def site_key(rng: jax.Array | None, site: str) -> jax.Array | None:
    """The dropout key of one site of a layer (None without a layer key)."""
    return None if rng is None else jax.random.fold_in(rng, SITES[site])


def projector(cfg: QwenConfig, p: dict[str, jax.Array], rng: jax.Array | None = None):
    """project(spec, x, name): x through the layer's dense weight `name`.

    The base weight goes through dispatch.matmul (matmul_impl, its int8 scale if any); an
    adapted weight adds the LoRA term on the adapter-dropped input (layers.lora_delta). p must
    be in the compute dtype already (`cast_params`).
    """

    def project(spec: str, x: jax.Array, name: str) -> jax.Array:
        y = dispatch.matmul(spec, x, p[name], impl=cfg.matmul_impl, scale=p.get(f"{name}_scale"))
        if f"{name}_lora_a" not in p:
            return y
        x = dropout(x, cfg.lora_dropout, site_key(rng, name))
        scaling = cfg.lora_alpha / cfg.lora_rank
        return y + lora_delta(spec, x, p[f"{name}_lora_a"], p[f"{name}_lora_b"], scaling)

    return project


def attention_block(
    cfg: QwenConfig,
    p: dict[str, jax.Array],
    x_btd: jax.Array,
    ctx: Context,
    window: jax.Array | int = 0,
    kv: tuple[jax.Array, jax.Array] | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x + drop(o(attention(rope(q(ln_1 x)), rope(k(ln_1 x)), v(ln_1 x)))): [B,T,D] -> [B,T,D].

    kv: this layer's cache buffers (k, v [B, S, K, H]) or None. With them, the T new keys and
    values are written at each row's slots [lengths_b, lengths_b + T) and the queries attend
    over the cache; the updated buffers are returned (else None). rng: the layer's dropout key
    (module docstring) or None.
    """
    with jax.named_scope("attention_block"):
        dt = cfg.compute_dtype
        p = cast_params(p, dt)
        mm = projector(cfg, p, rng)
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
        o_btd = mm("btnh,nhd->btd", o, "wo")
        return x_btd + dropout(o_btd, cfg.dropout, site_key(rng, "attn_out")), kv


def mlp_block(
    cfg: QwenConfig, p: dict[str, jax.Array], x_btd: jax.Array, rng: jax.Array | None = None
) -> jax.Array:
    """x + drop(swiglu(ln_2 x)): [B,T,D] -> [B,T,D] (qwen_jax.model.layers.swiglu)."""
    with jax.named_scope("mlp_block"):
        p = cast_params(p, cfg.compute_dtype)
        h = rms_norm(x_btd, p["ln_2"], cfg.rms_eps)
        y = swiglu(h, projector(cfg, p, rng))
        return x_btd + dropout(y, cfg.dropout, site_key(rng, "mlp_out"))


def layer(
    cfg: QwenConfig,
    p: dict[str, jax.Array],
    x_btd: jax.Array,
    ctx: Context,
    window: jax.Array | int = 0,
    kv: tuple[jax.Array, jax.Array] | None = None,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder layer: `attention_block` then `mlp_block`; returns (x [B,T,D], kv).

    rng: this layer's dropout key (training) or None."""
    with jax.named_scope("layer"):
        x_btd, kv = attention_block(cfg, p, x_btd, ctx, window, kv, rng)
        x_btd = mlp_block(cfg, p, x_btd, rng)
        return shard(x_btd, "batch", "act_seq", "act_embed"), kv
