"""The Qwen decoder in Flax NNX: parameters stacked over layers and scanned.

Parameters are NNX `Param`s holding arrays with a leading layer axis L and logical axis names in
their `out_sharding` metadata (resolved by qwen_jax.sharding; eager sharding is off so the same
module works abstractly, unsharded, or under a mesh). One layer is the named pure functions of
qwen_jax.model.block; without a KV cache (training, scoring) the forward scans them over that
layer axis, so compile time is flat in depth and remat is one `jax.checkpoint` policy. With a KV
cache (qwen_jax.model.cache: per-layer buffers, per-row lengths and starts) or with per-layer
weights (the inference engine) the layers run as an unrolled loop.

Qwen v1's fused `c_attn` ([Q|K|V] in one matmul) is kept as three projections here: the math is
identical, GQA and tensor-parallel head sharding stay uniform, and checkpoint I/O fuses/splits
(qwen_jax.checkpoint.hf). Names keep v1's MLP convention: w1 = up, w2 = gate, c_proj = down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwen_jax.model import dispatch, lora, rope
from qwen_jax.model.block import DENSE, Context
from qwen_jax.model.block import layer as layer_fn
from qwen_jax.model.cache import KVCache
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.layers import dropout, rms_norm
from qwen_jax.model.logprobs import token_logprobs
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


def _param(value: jax.Array, axes: tuple[str | None, ...], kind=nnx.Param) -> nnx.Param:
    return kind(value, out_sharding=axes, eager_sharding=False)


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

    def add_lora(self, cfg: QwenConfig, *, rngs: nnx.Rngs) -> None:
        """LoRA adapters (nnx.LoRAParam) on cfg.lora_targets: for w [L, *in, *out],
        `<name>_lora_a` [L, *in, r] ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's
        kaiming_uniform(a=sqrt(5)) on lora_A) and `<name>_lora_b` [L, r, *out] = 0, so a fresh
        adapter changes nothing. Logical axes: the weight's in/out axes, the rank unsharded."""
        r, n, dtype = cfg.lora_rank, cfg.num_layers, cfg.weight_dtype
        for name in lora.resolve_targets(cfg.lora_targets):
            shape_fn, axes, _ = _LAYER_PARAMS[name]
            shape, n_in = shape_fn(cfg), DENSE[name]
            bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
            a = jax.random.uniform(
                rngs.params(), (n, *shape[:n_in], r), dtype, minval=-bound, maxval=bound
            )
            b = jnp.zeros((n, r, *shape[n_in:]), dtype)
            a_axes, b_axes = ("layers", *axes[:n_in], None), ("layers", None, *axes[n_in:])
            setattr(self, f"{name}_lora_a", _param(a, a_axes, nnx.LoRAParam))
            setattr(self, f"{name}_lora_b", _param(b, b_axes, nnx.LoRAParam))

    def stacked(self) -> dict[str, jax.Array]:
        """Every per-layer array by name, with the int8 scales of a quantized model
        ("<name>_scale", qwen_jax.model.quantize) and the LoRA adapters ("<name>_lora_a",
        "<name>_lora_b", qwen_jax.model.lora)."""
        extra = [f"{n}_{kind}" for n in DENSE for kind in ("scale", "lora_a", "lora_b")]
        names = [*_LAYER_PARAMS, *extra]
        return {name: getattr(self, name)[...] for name in names if hasattr(self, name)}


class Qwen(nnx.Module):
    """Qwen / Qwen2-family decoder-only LM.

    Call: tokens [B, T] int -> logits [B, T, V] fp32 (or final hidden [B, T, D] with
    return_hidden=True, for chunked losses and value/reward heads).

    Optional parts (QwenConfig): LoRA adapters in `blocks` (qwen_jax.model.lora), the reward
    head `score` [D, 1] (`rewards`), dropout when a key is passed. They draw their init keys
    after every base weight, so the base weights equal those of the same seed's plain model.
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
        if cfg.lora_rank:
            self.blocks.add_lora(cfg, rngs=rngs)
        if cfg.reward_head:  # HF Qwen2ForSequenceClassification: score ~ N(0, initializer_range)
            self.score = _param(
                cfg.init_std * jax.random.normal(rngs.params(), (cfg.hidden_size, 1), dtype),
                ("embed", None),
            )

    # ------------------------------------------------------------------------------ forward

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        cache: KVCache | None = None,
        rope_alpha_b: jax.Array | None = None,
        logn: bool = False,
        return_hidden: bool = False,
        layers: Sequence[dict[str, jax.Array]] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Run the decoder.

        Args:
          tokens_bt: [B, T] token ids.
          positions_bt: [B, T] RoPE positions. Default arange(T) without a cache; with one,
            each row's own positions (`KVCache.positions`: slot - start), so rows at
            different lengths advance in one batch.
          segment_ids_bt: [B, T] document ids for packing; 0 marks padding. Default all ones.
            For a padded batch this is exactly the usual attention mask (1 real, 0 pad). Only
            without a cache: a cache row's padding is its `starts` (qwen_jax.model.cache).
          cache: a `KVCache`; row b's T new tokens are written at its slots [lengths[b],
            lengths[b] + T) and attend to [starts[b], their slot].
          rope_alpha_b: [B] dynamic-NTK alpha per row (spec §2.1), None = plain RoPE.
          logn: scale queries by LogN (spec §2.2) beyond cfg.seq_length (inference only).
          return_hidden: return the final-norm hidden states [B, T, D] instead of logits.
          layers: per-layer parameters (L dicts of `Blocks.stacked()`'s names without the
            layer axis) used instead of `self.blocks`. The inference engine passes them
            (`unstack_layers`): XLA:CPU copies each scanned layer's weight slice before its
            matmuls, which at decode's batch sizes costs more than the matmuls themselves.
          dropout_rng: a key turns on dropout (training): cfg.dropout on the embedding output
            (key fold_in(rng, 0)) and in every layer i, with cfg.lora_dropout on adapter inputs
            (layer key fold_in(fold_in(rng, 1), i); qwen_jax.model.block). None (eval and every
            inference path) = no dropout.

        Without a cache and without `layers` the layers run as one `lax.scan` over the stacked
        parameters (training: flat compile time in depth, one remat policy); otherwise as an
        unrolled loop, each layer updating its own cache buffers in place.

        Returns:
          (logits [B, T, V] fp32 or hidden [B, T, D], updated cache or None)
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        if cache is None:
            q_slot_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if segment_ids_bt is None:
                segment_ids_bt = jnp.ones((b, t), jnp.int32)
            segment_ids_bt = segment_ids_bt.astype(jnp.int32)
            default_positions = q_slot_bt
        else:
            if segment_ids_bt is not None:
                raise ValueError(
                    "segment_ids_bt is for calls without a KV cache; a cache row's padding is "
                    "its starts (KVCache.init(starts_b=...))"
                )
            q_slot_bt = cache.query_slots(t)
            default_positions = cache.positions(t)
        if positions_bt is None:
            positions_bt = default_positions

        cos, sin = rope.rope_angles(positions_bt, cfg.head_dim, cfg.rope_base, rope_alpha_b)
        ctx = Context(
            cos_bth=cos,
            sin_bth=sin,
            q_scale_bt=rope.logn_scale(positions_bt, cfg.seq_length) if logn else None,
            q_slot_bt=q_slot_bt,
            segment_ids_bt=segment_ids_bt,
            starts_b=None if cache is None else cache.starts,
            lengths_b=None if cache is None else cache.lengths,
        )
        windows_l = jnp.asarray(cfg.attn_windows or (0,) * cfg.num_layers, jnp.int32)

        x = jnp.take(self.wte[...], tokens_bt, axis=0)
        if hasattr(self, "wte_scale"):  # int8 tied table: rows scale like the head's channels
            x = x.astype(jnp.float32) * jnp.take(self.wte_scale[...], tokens_bt, axis=0)[..., None]
        x = x.astype(cfg.compute_dtype)
        embed_key = layers_key = None
        if dropout_rng is not None and (cfg.dropout or (cfg.lora_rank and cfg.lora_dropout)):
            embed_key = jax.random.fold_in(dropout_rng, 0)
            layers_key = jax.random.fold_in(dropout_rng, 1)

        def layer_key(i):
            return None if layers_key is None else jax.random.fold_in(layers_key, i)

        x = dropout(x, cfg.dropout, embed_key)
        x = shard(x, "batch", "act_seq", "act_embed")

        if cache is None and layers is None:

            def body(x_btd, xs):
                p, window, i = xs
                return layer_fn(cfg, p, x_btd, ctx, window, rng=layer_key(i))[0], None

            # The layer index rides in xs: each layer's dropout key is a function of it, so a
            # remat recompute draws the same masks.
            xs = (self.blocks.stacked(), windows_l, jnp.arange(cfg.num_layers, dtype=jnp.int32))
            x, _ = jax.lax.scan(_remat(body, cfg.remat_policy), x, xs)
            new_cache = None
        else:
            if layers is None:
                stacked = self.blocks.stacked()
                layers = [{k: v[i] for k, v in stacked.items()} for i in range(cfg.num_layers)]
            if len(layers) != cfg.num_layers:
                raise ValueError(f"got {len(layers)} per-layer params for {cfg.num_layers} layers")
            ks, vs = [], []
            for i, p in enumerate(layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = layer_fn(cfg, p, x, ctx, windows_l[i], kv, rng=layer_key(i))
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            new_cache = None if cache is None else cache.advanced(ks, vs, t)

        h = rms_norm(x, self.ln_f[...], cfg.rms_eps)
        if return_hidden:
            return h, new_cache
        return self.logits(h), new_cache

    def rewards(self, h_btd: jax.Array, index_b: jax.Array) -> jax.Array:
        """fp32 [B]: the reward head read at one position per row, h[b, index_b[b]] @ score.

        h_btd: final hidden states [B, T, D] (`__call__(..., return_hidden=True)`); index_b [B]
        int: the position to read (the reward objective's length - 1, the `<|im_end|>` closing
        the response). Computed in fp32 whatever the compute dtype.
        """
        if not hasattr(self, "score"):
            raise ValueError("this model has no reward head (QwenConfig.reward_head=False)")
        idx = index_b.astype(jnp.int32)[:, None, None]
        h_bd = jnp.take_along_axis(h_btd, idx, axis=1)[:, 0].astype(jnp.float32)
        score_d = self.score[...][:, 0].astype(jnp.float32)
        return jnp.einsum("bd,d->b", h_bd, score_d, precision=jax.lax.Precision.HIGHEST)

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

    def _head_for(self, h_btd: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The head as applied to h: float weights take h's dtype, int8 keep their scale."""
        w, scale = self._head()
        return (w if scale is not None else w.astype(h_btd.dtype)), scale

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """[B, T, D] -> fp32 logits [B, T, V] (compute-dtype inputs, fp32 accumulation)."""
        w, scale = self._head_for(h_btd)
        out = dispatch.matmul(
            "btd,dv->btv", h_btd, w, impl=self.cfg.matmul_impl, out_dtype=jnp.float32, scale=scale
        )
        return shard(out, "batch", "act_seq", "act_vocab")

    def token_logprobs(
        self,
        h_btd: jax.Array,
        targets_bt: jax.Array,
        *,
        chunk: int = 256,
        with_entropy: bool = False,
    ) -> tuple[jax.Array, ...]:
        """(log p(target), logsumexp) fp32 [B, T] from final hidden states [B, T, D] through
        this model's head, applied as `logits` applies it (qwen_jax.model.logprobs);
        with_entropy=True adds the entropy [B, T] of each predicted distribution."""
        w, scale = self._head_for(h_btd)
        return token_logprobs(
            h_btd,
            w,
            targets_bt,
            chunk=chunk,
            matmul_impl=self.cfg.matmul_impl,
            scale_v=scale,
            with_entropy=with_entropy,
        )


@jax.jit
def split_layers(x_l: jax.Array) -> tuple[jax.Array, ...]:
    """[L, ...] -> L separate arrays [...] (fresh buffers; the layer axis is unsharded, so each
    keeps the other axes' sharding)."""
    return tuple(x_l[i] for i in range(x_l.shape[0]))


@jax.jit
def copy_arrays(tree):
    """Fresh buffers holding the same values (jit never aliases a non-donated input)."""
    return jax.tree.map(jnp.copy, tree)


def unstack_layers(
    state: nnx.State, *, donate: bool = False
) -> tuple[nnx.State, list[dict[str, jax.Array]]]:
    """Split a Qwen state's stacked block parameters into per-layer arrays.

    Returns (state with each stacked block parameter replaced by an empty placeholder, L dicts
    of separate per-layer arrays with the layer axis dropped) for `Qwen.__call__(layers=...)`.
    The per-layer arrays keep the stacked arrays' sharding. One parameter is split at a time,
    so at most one stacked parameter exists twice.

    donate=True takes the weights: each stacked array is deleted once split (the model the
    state came from can no longer run) and the other parameters are shared, so one copy of the
    weights exists. donate=False leaves `state` intact and copies everything, so the result
    shares no buffer with it (a later training step may donate those).
    """
    pure = nnx.to_pure_dict(state)
    stacked = pure["blocks"]
    n = next(iter(stacked.values())).shape[0]
    layers: list[dict[str, jax.Array]] = [{} for _ in range(n)]
    for name, x in stacked.items():
        for i, part in enumerate(split_layers(x)):
            layers[i][name] = part
        if donate:
            x.delete()
    pure["blocks"] = {k: jnp.zeros((0,), v.dtype) for k, v in stacked.items()}
    if not donate:
        pure = copy_arrays(pure)
    state = jax.tree.map(lambda x: x, state)  # a new tree; the caller's state object is kept
    nnx.replace_by_pure_dict(state, pure)
    return state, layers


def restack_layers(state: nnx.State, layers: Sequence[dict[str, jax.Array]]) -> nnx.State:
    """Inverse of `unstack_layers` (a copy of the layer weights): a state `nnx.merge` can use."""
    pure = nnx.to_pure_dict(state)
    pure["blocks"] = jax.jit(lambda ls: {k: jnp.stack([p[k] for p in ls]) for k in ls[0]})(layers)
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """RoPE positions for a padded batch: count of real tokens before each slot (pads get 0)."""
    mask = mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask
