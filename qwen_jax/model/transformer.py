"""The Qwen decoder in Flax NNX: parameters stacked over layers and scanned.

Parameters are NNX `Param`s holding arrays with a leading layer axis L and logical axis names in
their `out_sharding` metadata (resolved by qwen_jax.sharding; eager sharding is off so the same
module works abstractly, unsharded, or under a mesh). The forward pass is pure einsum math scanned
over that layer axis, so compile time is flat in depth and remat is one `jax.checkpoint` policy.

Qwen v1's fused `c_attn` ([Q|K|V] in one matmul) is kept as three projections here: the math is
identical, GQA and tensor-parallel head sharding stay uniform, and checkpoint I/O fuses/splits
(qwen_jax.checkpoint.hf). Names keep v1's MLP convention: w1 = up, w2 = gate, c_proj = down.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen_jax.model import dispatch, rope
from qwen_jax.model.attention import attention
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import rms_norm, swiglu
from qwen_jax.sharding import shard

# Per-layer parameters: name -> (shape builder, logical axes without the layer axis, init kind).
_LAYER_PARAMS: dict[str, tuple[Any, tuple[str, ...], str]] = {
    "ln_1": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "wq": (lambda c: (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), "w"),
    "wk": (
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "w",
    ),
    "wv": (
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        ("embed", "kv_heads", "head_dim"),
        "w",
    ),
    "bq": (lambda c: (c.num_heads, c.head_dim), ("heads", "head_dim"), "zeros"),
    "bk": (lambda c: (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), "zeros"),
    "bv": (lambda c: (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), "zeros"),
    "wo": (
        lambda c: (c.num_heads, c.head_dim, c.hidden_size),
        ("heads", "head_dim", "embed"),
        "proj",
    ),
    "ln_2": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "w1": (lambda c: (c.hidden_size, c.ffn_size), ("embed", "mlp"), "w"),
    "w2": (lambda c: (c.hidden_size, c.ffn_size), ("embed", "mlp"), "w"),
    "c_proj": (lambda c: (c.ffn_size, c.hidden_size), ("mlp", "embed"), "proj"),
}
_BIASES = ("bq", "bk", "bv")


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _keep_dtype(name: str, value: jax.Array) -> bool:
    """int8 weights and their scales are not cast to the compute dtype (quantize.py)."""
    return value.dtype == jnp.int8 or name.endswith("_scale")


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "attn_out"),
    }
    if policy not in policies:
        raise ValueError(f"unknown remat_policy {policy!r}; choose from {['none', *policies]}")
    return jax.checkpoint(fn, policy=policies[policy], prevent_cse=False)


class Blocks(nnx.Module):
    """All L decoder blocks, each parameter stacked along a leading layer axis."""

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs):
        dtype, n = cfg.weight_dtype, cfg.num_layers
        proj_std = cfg.init_std / math.sqrt(2 * n)  # c_proj weights (spec §1.1 init)
        for name, (shape_fn, axes, kind) in _LAYER_PARAMS.items():
            if name in _BIASES and not cfg.qkv_bias:
                continue
            shape = (n, *shape_fn(cfg))
            if kind == "ones":
                value = jnp.ones(shape, dtype)
            elif kind == "zeros":
                value = jnp.zeros(shape, dtype)
            else:
                std = proj_std if kind == "proj" else cfg.init_std
                value = std * jax.random.normal(rngs.params(), shape, dtype)
            setattr(self, name, _param(value, ("layers", *axes)))

    def stacked(self) -> dict[str, jax.Array]:
        """Every per-layer array by name, with the int8 scales of a quantized model
        ("<name>_scale", qwen_jax.model.quantize)."""
        names = [*_LAYER_PARAMS, *(f"{n}_scale" for n in _LAYER_PARAMS)]
        return {name: getattr(self, name)[...] for name in names if hasattr(self, name)}


class Qwen(nnx.Module):
    """Qwen / Qwen2-family decoder-only LM.

    Call: tokens [B, T] int -> logits [B, T, V] fp32 (or final hidden [B, T, D] with
    return_hidden=True, for chunked losses and value/reward heads).
    """

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = cfg.weight_dtype
        shape_vd = (cfg.vocab_size, cfg.hidden_size)
        self.wte = _param(
            cfg.init_std * jax.random.normal(rngs.params(), shape_vd, dtype), ("vocab", "embed")
        )
        self.blocks = Blocks(cfg, rngs=rngs)
        self.ln_f = _param(jnp.ones((cfg.hidden_size,), dtype), ("norm",))
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                cfg.init_std
                * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), dtype),
                ("embed", "vocab"),
            )

    # ------------------------------------------------------------------------------ forward

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: dict[str, jax.Array] | None = None,
        rope_alpha_b: jax.Array | None = None,
        logn: bool = False,
        return_hidden: bool = False,
        layers: Sequence[dict[str, jax.Array]] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Run the decoder.

        Args:
          tokens_bt: [B, T] token ids.
          positions_bt: [B, T] RoPE positions (default arange(T) + cache index).
          segment_ids_bt: [B, T] document ids for packing; 0 marks padding. Default all ones.
            For a padded batch this is exactly the usual attention mask (1 real, 0 pad).
          cache: KV cache from `init_cache` ({"k","v": [L,B,S,K,H], "segment_ids": [B,S],
            "index": int32 scalar}); the T new tokens are written at slots [index, index+T).
          rope_alpha_b: [B] dynamic-NTK alpha per row (spec §2.1), None = plain RoPE.
          logn: scale queries by LogN (spec §2.2) beyond cfg.seq_length (inference only).
          return_hidden: return the final-norm hidden states [B, T, D] instead of logits.
          layers: per-layer parameters (L dicts of `Blocks.stacked()`'s names without the
            layer axis) used instead of `self.blocks`, in an unrolled loop instead of the
            layer scan. The inference engine passes them (`unstack_layers`): XLA:CPU copies
            each scanned layer's weight slice before its matmuls, which at decode's batch
            sizes costs more than the matmuls themselves (see the engine's docstring).

        Returns:
          (logits [B, T, V] fp32 or hidden [B, T, D], updated cache or None)
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        slots_t = start + jnp.arange(t, dtype=jnp.int32)
        q_slot_bt = jnp.broadcast_to(slots_t, (b, t))
        if positions_bt is None:
            positions_bt = q_slot_bt
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        segment_ids_bt = segment_ids_bt.astype(jnp.int32)

        kv_segment_bs = segment_ids_bt
        if cache is not None:
            kv_segment_bs = jax.lax.dynamic_update_slice(
                cache["segment_ids"], segment_ids_bt, (0, start)
            )

        cos, sin = rope.rope_angles(positions_bt, cfg.head_dim, cfg.rope_base, rope_alpha_b)
        q_scale_bt = rope.logn_scale(positions_bt, cfg.seq_length) if logn else None
        windows_l = jnp.asarray(cfg.attn_windows or (0,) * cfg.num_layers, jnp.int32)

        # Attention path. Without a cache (training, scoring) T == S and q_slot == arange(T):
        # the flash kernel's layout. Decoding one token against the cache takes the decode
        # kernel. Prefilling T > 1 tokens into a cache stays on XLA: the queries sit at an offset
        # into a longer, left-padded cache, a layout neither kernel serves (and prefill is one
        # call per prompt, decode the per-token loop).
        decode_kernel = cache is not None and t == 1 and cfg.attention_impl == "pallas"
        attn_impl = cfg.attention_impl if cache is None else "xla"
        starts_b = dispatch.cache_starts(kv_segment_bs) if decode_kernel else None
        mm = functools.partial(dispatch.matmul, impl=cfg.matmul_impl)

        dt = cfg.compute_dtype
        x = jnp.take(self.wte[...], tokens_bt, axis=0)
        if hasattr(self, "wte_scale"):  # int8 tied table: rows scale like the head's channels
            x = x.astype(jnp.float32) * jnp.take(self.wte_scale[...], tokens_bt, axis=0)[..., None]
        x = x.astype(dt)
        x = shard(x, "batch", "act_seq", "act_embed")

        # The cache rides in the scan carry and is updated in place at [layer, :, index): as
        # scanned inputs/outputs every decode step would copy the whole cache several times.
        def layer(carry, xs):
            x_btd, k_cache, v_cache = carry
            p, window, layer_idx = xs
            # int8 weights and their fp32 scales go to the matmul as they are (quantize.py).
            p = {k: v if _keep_dtype(k, v) else v.astype(dt) for k, v in p.items()}
            scale_of = {k: p.get(f"{k}_scale") for k in _LAYER_PARAMS}
            h = rms_norm(x_btd, p["ln_1"], cfg.rms_eps)
            q = mm("btd,dnh->btnh", h, p["wq"], scale=scale_of["wq"])
            k = mm("btd,dkh->btkh", h, p["wk"], scale=scale_of["wk"])
            v = mm("btd,dkh->btkh", h, p["wv"], scale=scale_of["wv"])
            if cfg.qkv_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
            if q_scale_bt is not None:
                q = (q.astype(jnp.float32) * q_scale_bt[:, :, None, None]).astype(dt)
            q = checkpoint_name(shard(q, "batch", None, "act_heads", None), "q")
            k = checkpoint_name(k, "k")
            v = checkpoint_name(v, "v")
            if k_cache is not None:
                at = (layer_idx, 0, start, 0, 0)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), at)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), at)
                k_att, v_att = k_cache[layer_idx].astype(dt), v_cache[layer_idx].astype(dt)
            else:
                k_att, v_att = k, v
            if decode_kernel:
                o = dispatch.decode_attention(
                    q, k_att, v_att, q_slot=start, starts_b=starts_b, window=window
                )
            else:
                o = attention(
                    q,
                    k_att,
                    v_att,
                    q_slot_bt=q_slot_bt,
                    q_segment_bt=segment_ids_bt,
                    kv_segment_bs=kv_segment_bs,
                    window=window,
                    impl=attn_impl,
                )
            o = checkpoint_name(o, "attn_out")
            x_btd = x_btd + mm("btnh,nhd->btd", o, p["wo"], scale=scale_of["wo"])
            h = rms_norm(x_btd, p["ln_2"], cfg.rms_eps)
            mlp_scales = (scale_of["w1"], scale_of["w2"], scale_of["c_proj"])
            x_btd = x_btd + swiglu(
                h, p["w1"], p["w2"], p["c_proj"], impl=cfg.matmul_impl, scales=mlp_scales
            )
            x_btd = shard(x_btd, "batch", "act_seq", "act_embed")
            return (x_btd, k_cache, v_cache), None

        kv = (None, None) if cache is None else (cache["k"], cache["v"])
        if layers is None:
            xs = (self.blocks.stacked(), windows_l, jnp.arange(cfg.num_layers))
            (x, k_new, v_new), _ = jax.lax.scan(_remat(layer, cfg.remat_policy), (x, *kv), xs)
        else:
            if len(layers) != cfg.num_layers:
                raise ValueError(f"got {len(layers)} per-layer params for {cfg.num_layers} layers")
            carry = (x, *kv)
            for i, p in enumerate(layers):
                carry, _ = layer(carry, (p, windows_l[i], i))
            x, k_new, v_new = carry

        h = rms_norm(x, self.ln_f[...], cfg.rms_eps)
        new_cache = None
        if cache is not None:
            new_cache = {"k": k_new, "v": v_new, "segment_ids": kv_segment_bs, "index": start + t}
        if return_hidden:
            return h, new_cache
        return self.logits(h), new_cache

    def _head(self) -> tuple[jax.Array, jax.Array | None]:
        """(output projection [D, V], its int8 scale [V] or None)."""
        tied = self.cfg.tie_embeddings
        w = self.wte[...].T if tied else self.lm_head[...]
        scale = getattr(self, "wte_scale" if tied else "lm_head_scale", None)
        return w, None if scale is None else scale[...]

    def head_weight(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding when tied)."""
        w, scale = self._head()
        if scale is not None:
            raise ValueError(
                "this model has int8 weights (qwen_jax.model.quantize), which serve inference "
                "only: training and head_weight need the float model"
            )
        return w

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """[B, T, D] -> fp32 logits [B, T, V] (compute-dtype inputs, fp32 accumulation)."""
        w, scale = self._head()
        w = w if scale is not None else w.astype(h_btd.dtype)
        out = dispatch.matmul(
            "btd,dv->btv", h_btd, w, impl=self.cfg.matmul_impl, out_dtype=jnp.float32, scale=scale
        )
        return shard(out, "batch", "act_seq", "act_vocab")


def unstack_layers(state: nnx.State) -> tuple[nnx.State, list[dict[str, jax.Array]]]:
    """Split a Qwen state's stacked block parameters into per-layer arrays.

    Returns (state with each stacked block parameter replaced by an empty placeholder, L dicts
    of separate per-layer arrays with the layer axis dropped) for `Qwen.__call__(layers=...)`.
    The per-layer arrays keep the stacked arrays' sharding; the placeholders hold no memory
    (the stacked arrays are released when nothing else references them).
    """
    pure = nnx.to_pure_dict(state)
    stacked = pure["blocks"]
    n = next(iter(stacked.values())).shape[0]
    layers = jax.jit(lambda st: [{k: v[i] for k, v in st.items()} for i in range(n)])(stacked)
    pure["blocks"] = {k: jnp.zeros((0,), v.dtype) for k, v in stacked.items()}
    state = jax.tree.map(lambda x: x, state)  # a copy: the caller's state stays intact
    nnx.replace_by_pure_dict(state, pure)
    return state, layers


def restack_layers(state: nnx.State, layers: Sequence[dict[str, jax.Array]]) -> nnx.State:
    """Inverse of `unstack_layers` (a copy of the layer weights): a state `nnx.merge` can use."""
    pure = nnx.to_pure_dict(state)
    pure["blocks"] = jax.jit(lambda ls: {k: jnp.stack([p[k] for p in ls]) for k in ls[0]})(layers)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def init_cache(
    cfg: QwenConfig, batch: int, max_len: int, dtype: Any = None
) -> dict[str, jax.Array]:
    """Empty KV cache: k/v [L, B, S, K, H], segment ids [B, S] (0 = empty), write index 0."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    k = shard(jnp.zeros(shape, dtype), None, "cache_batch", "cache_seq", "cache_kv_heads", None)
    return {
        "k": k,
        "v": jnp.zeros_like(k),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """RoPE positions for a padded batch: count of real tokens before each slot (pads get 0)."""
    mask = mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask
