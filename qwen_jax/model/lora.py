"""LoRA adapters: target names, config checks, the trainable filter, and merging into the base.

A targeted per-layer dense weight w [L, *in, *out] (block.DENSE) gets two nnx.LoRAParam arrays
in `Qwen.blocks`, stacked over layers like every block parameter (transformer.Blocks.add_lora):

    <name>_lora_a [L, *in, r]   ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (PEFT's lora_A init)
    <name>_lora_b [L, r, *out]  = 0                                    (a fresh adapter is a no-op)
    y = x @ w + (dropout(x) @ a @ b) * alpha / r                       (block.projector)

with r = cfg.lora_rank, alpha = cfg.lora_alpha and dropout = cfg.lora_dropout (only when the
forward gets a dropout key). The base may be int8 (cfg.lora_int8_base: quantize.quantize_int8
with head=False, made by factory.create_model): the int8 weights and their scales are constants
of the step, the adapters stay float.

Target names (`resolve_targets`): ours are wq wk wv wo (attention q/k/v/out), w1 (up), w2 (gate),
c_proj (down). Aliases: Qwen v1's module names as in its finetune.py, where `c_attn` is the fused
q/k/v and `c_proj` names BOTH the attention output (attn.c_proj) and the MLP down projection
(mlp.c_proj), so "c_proj" adapts wo and c_proj (target only the MLP's with "down_proj"); HF
Qwen2's q_proj k_proj v_proj o_proj up_proj gate_proj down_proj.

PEFT layout (for the adapter exporter). PEFT holds per HF nn.Linear module (in -> out)
lora_A.weight [r, in] and lora_B.weight [out, r], delta W = B @ A * lora_alpha / r, so
adapter_config.json takes r = cfg.lora_rank and lora_alpha = cfg.lora_alpha, and per layer l:

    ours    base w      our a / b            PEFT module  lora_A.weight        lora_B.weight
    wq      [D, N, H]   [D, r] / [r, N, H]   q_proj       a.T [r, D]           b.reshape(r, N*H).T
    wk, wv  [D, K, H]   [D, r] / [r, K, H]   k/v_proj     a.T [r, D]           b.reshape(r, K*H).T
    wo      [N, H, D]   [N, H, r] / [r, D]   o_proj       a.reshape(N*H, r).T  b.T [D, r]
    w1      [D, F]      [D, r] / [r, F]      up_proj      a.T [r, D]           b.T [F, r]
    w2      [D, F]      [D, r] / [r, F]      gate_proj    a.T [r, D]           b.T [F, r]
    c_proj  [F, D]      [F, r] / [r, D]      down_proj    a.T [r, F]           b.T [D, r]

(a and b taken at layer l; HF flattens heads as n * H + h, the same order as our reshape.) A Qwen
v1 fused c_attn adapter is not one of ours: PEFT there shares lora_A across q/k/v. Ours map onto
it exactly with rank 3r and alpha 3 * alpha: lora_A = [a_q.T; a_k.T; a_v.T] [3r, D], lora_B =
block-diagonal(b_q, b_k, b_v) [3*N*H, 3r].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:
    from qwen_jax.model.config import QwenConfig
    from qwen_jax.model.transformer import Qwen

OUR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "c_proj")
ALIASES: dict[str, tuple[str, ...]] = {
    # Qwen v1 (QWenLMHeadModel module names; w1 / w2 are ours too)
    "c_attn": ("wq", "wk", "wv"),
    "c_proj": ("wo", "c_proj"),  # attn.c_proj and mlp.c_proj share the name in v1
    # HF Qwen2 (Qwen2ForCausalLM)
    "q_proj": ("wq",),
    "k_proj": ("wk",),
    "v_proj": ("wv",),
    "o_proj": ("wo",),
    "up_proj": ("w1",),
    "gate_proj": ("w2",),
    "down_proj": ("c_proj",),
}


def resolve_targets(names) -> tuple[str, ...]:
    """Target names or aliases (module docstring) -> our weight names, in block order, once each.

    Raises ValueError naming a name that matches no weight.
    """
    if isinstance(names, str):
        raise ValueError(f"lora_targets must be a sequence of names, got the string {names!r}")
    chosen = set()
    for name in names:
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in OUR_NAMES:
            chosen.add(name)
        else:
            raise ValueError(
                f"lora_targets: {name!r} matches no weight; use our names {list(OUR_NAMES)} or "
                f"the Qwen v1 / HF Qwen2 aliases {list(ALIASES)}"
            )
    return tuple(n for n in OUR_NAMES if n in chosen)


def check_config(cfg: QwenConfig) -> None:
    """The LoRA fields' checks (QwenConfig.__post_init__ runs them); ValueError naming the field."""
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank={cfg.lora_rank} must be >= 0 (0 = no adapters)")
    if not cfg.lora_alpha > 0:
        raise ValueError(f"lora_alpha={cfg.lora_alpha} must be > 0")
    targets = resolve_targets(cfg.lora_targets)
    if cfg.lora_rank and not targets:
        raise ValueError(f"lora_rank={cfg.lora_rank} needs lora_targets (e.g. ('c_attn', 'w1'))")
    if targets and not cfg.lora_rank:
        raise ValueError(f"lora_targets={tuple(cfg.lora_targets)} need lora_rank > 0")
    if cfg.lora_int8_base and not cfg.lora_rank:
        raise ValueError("lora_int8_base=True needs LoRA adapters (lora_rank > 0, lora_targets)")
    fans = cfg.dense_fans()
    for name in targets:
        fan_in, fan_out = fans[name]
        if cfg.lora_rank > min(fan_in, fan_out):
            raise ValueError(
                f"lora_rank={cfg.lora_rank} is larger than the projection {name} "
                f"(fan_in {fan_in}, fan_out {fan_out}): a rank above min(fan_in, fan_out) adds "
                "parameters without adding expressiveness"
            )


def trainable_filter(cfg: QwenConfig) -> nnx.filterlib.Filter:
    """What the train step differentiates and keeps optimizer state for: the adapters (and a
    reward head) when the model has LoRA, else every parameter."""
    if cfg.lora_rank > 0:
        return nnx.Any(nnx.LoRAParam, nnx.PathContains("score"))
    return nnx.Param


def _dequantize_layers(w: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    """fp32 int8 w [L, *in, *out] * scale [L, *out] (quantize.py's per-output-channel scale)."""
    shape = (scale.shape[0], *(1,) * n_in, *scale.shape[1:])
    return w.astype(jnp.float32) * scale.astype(jnp.float32).reshape(shape)


def merge(model: Qwen) -> Qwen:
    """A float model without adapters: w += a @ b * alpha / r for each adapted weight.

    The sums are computed in fp32 (an int8 base is dequantized first, head included) and stored
    in the config's param_dtype; the result's config has lora_rank=0, no targets, no int8 base
    (everything else, the reward head included, is kept). `model` is unchanged.
    """
    from qwen_jax.model.block import DENSE  # lazy: the model imports this module
    from qwen_jax.model.factory import abstract_model

    cfg = model.cfg
    if not cfg.lora_rank:
        raise ValueError("merge: the model has no LoRA adapters (lora_rank=0)")
    dtype, scaling = cfg.weight_dtype, cfg.lora_alpha / cfg.lora_rank
    pure = nnx.to_pure_dict(nnx.state(model))
    blocks = pure["blocks"]
    for name, n_in in DENSE.items():
        scale = blocks.pop(f"{name}_scale", None)
        a, b = blocks.pop(f"{name}_lora_a", None), blocks.pop(f"{name}_lora_b", None)
        if scale is None and a is None:
            continue
        w = blocks[name]
        w32 = w.astype(jnp.float32) if scale is None else _dequantize_layers(w, scale, n_in)
        if a is not None:
            n, r = a.shape[0], a.shape[-1]
            a_lir = a.astype(jnp.float32).reshape(n, -1, r)
            b_lro = b.astype(jnp.float32).reshape(n, r, -1)
            delta = jnp.einsum("lir,lro->lio", a_lir, b_lro, precision=jax.lax.Precision.HIGHEST)
            w32 = w32 + scaling * delta.reshape(w.shape)
        blocks[name] = w32.astype(dtype)
    if "lm_head_scale" in pure:  # [D, V] * [V]
        head = pure["lm_head"].astype(jnp.float32) * pure.pop("lm_head_scale")
        pure["lm_head"] = head.astype(dtype)
    if "wte_scale" in pure:  # tied: [V, D] rows * [V]
        table = pure["wte"].astype(jnp.float32) * pure.pop("wte_scale")[:, None]
        pure["wte"] = table.astype(dtype)
    merged_cfg = cfg.replace(lora_rank=0, lora_targets=(), lora_dropout=0.0, lora_int8_base=False)
    graphdef, state = nnx.split(abstract_model(merged_cfg))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


__all__ = ["ALIASES", "OUR_NAMES", "check_config", "merge", "resolve_targets", "trainable_filter"]
