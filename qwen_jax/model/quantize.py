"""Weight-only int8: dense weights stored as int8 with a per-output-channel scale.

    w[..., o] ~= wq[..., o] * scale[o],   scale[o] = max |w[:, o]| / 127   (symmetric absmax)

for every dense projection: q/k/v/o, the MLP, and the LM head (for tied embeddings the shared
table, whose rows are the head's output channels, so the embedding lookup dequantizes its rows
with the same scales). Each quantized weight keeps its name and logical axes, with dtype int8;
its scale is the Param "<name>_scale" over the weight's output axes. The model's forward sees the
scale and runs (x @ wq) * scale with fp32 accumulation: `matmul_impl="pallas"` through the int8
kernel (qwen_jax.kernels.matmul.int8_matmul, which reads int8 from memory), "xla" by converting
the weight to the compute dtype first. Norms, biases and (untied) embeddings stay float.

For serving, and as the frozen base of Q-LoRA-style fine-tuning (QwenConfig.lora_int8_base:
`head=False` keeps the LM head / tied embedding float, LoRA adapters stay float, and gradients
flow to the adapters through the int8 matmuls, whose weights are constants). A quantized model
has no float weights to train, so `Qwen.head_weight` (the training loss's) refuses an int8
head, and params exports hold float weights (merge adapters with lora.merge first).
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.kernels.matmul import quantize_int8 as quantize_columns
from qwen_jax.model import transformer
from qwen_jax.model.block import DENSE as LAYER_DENSE  # weight -> number of input axes
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import sharding_for


def is_quantized(model: Qwen) -> bool:
    return hasattr(model.blocks, "wq_scale")


def _quantize(w: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
    """w [*in, *out] -> (int8 [*in, *out], fp32 scale [*out]), one scale per output channel."""
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    wq, scale = quantize_columns(w.reshape(-1, math.prod(out_shape)))
    return wq.reshape(*in_shape, *out_shape), scale.reshape(out_shape)


def quantize_int8(model: Qwen, *, mesh: Mesh | None = None, head: bool = True) -> Qwen:
    """A copy of `model` with int8 dense weights (module docstring); `model` is unchanged.

    head=False keeps the LM head (the tied embedding) float: the Q-LoRA-style training base,
    whose loss needs `head_weight`. LoRA adapters and the reward head are never quantized.
    Under `mesh` the new arrays are placed by their logical axes, like `create_model` does.
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)  # a copy: the edits below leave `model` alone

    def put(owner, name, value, axes):
        if mesh is not None:
            value = jax.device_put(value, sharding_for(axes, value.shape, mesh))
        setattr(owner, name, transformer._param(value, axes))

    for name, n_in in LAYER_DENSE.items():
        var = getattr(new.blocks, name)
        axes = var.get_metadata()["out_sharding"]  # ("layers", *in, *out)
        wq, scale = jax.vmap(lambda w, n=n_in: _quantize(w, n))(var[...])
        put(new.blocks, name, wq, axes)
        put(new.blocks, f"{name}_scale", scale, (axes[0], *axes[1 + n_in :]))
    if not head:
        return new
    if model.cfg.tie_embeddings:
        wq_dv, scale_v = _quantize(new.wte[...].T, 1)  # the head's output channels are rows
        put(new, "wte", wq_dv.T, ("vocab", "embed"))
        put(new, "wte_scale", scale_v, ("vocab",))
    else:
        wq_dv, scale_v = _quantize(new.lm_head[...], 1)
        put(new, "lm_head", wq_dv, ("embed", "vocab"))
        put(new, "lm_head_scale", scale_v, ("vocab",))
    return new


__all__ = ["LAYER_DENSE", "is_quantized", "quantize_int8"]
