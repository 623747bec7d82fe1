"""LoRA exports: a PEFT adapter directory, and merged Hugging Face weights.

A PEFT adapter directory (what `peft.PeftModel.from_pretrained(base, DIR)` loads onto
transformers' `Qwen2ForCausalLM`):
  adapter_config.json         LoraConfig: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                              lora_dropout, target_modules as HF Qwen2 module names
  adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
                              [r, in] and ...lora_B.weight [out, r], per adapted projection

PEFT computes y = W x + B (A dropout(x)) * lora_alpha / r; ours is y += dropout(x) @ a @ b *
alpha / r (qwen_jax.model.lora) with a [*in, r] and b [r, *out], so A = a flattened to [in, r]
and transposed, B = b flattened to [r, out] and transposed. The head axes flatten row-major
(heads outer, head_dim inner), as the base weights do in qwen_jax.checkpoint.hf.

The adapter rides on the base weights WITHOUT adapters: `export_base_hf` writes those (an int8
base dequantized) as a plain HF directory; `export_merged_hf` instead folds the adapters in
(lora.merge) and writes one plain model.

Only Qwen2 module names are written; any of our models (Qwen v1 included) exports its base in
the qwen2 layout, which the adapter fits. A Qwen v1 (`QWenLMHeadModel`, remote code) adapter on
the fused c_attn would be a rank-3r one with a block-diagonal B (qwen_jax.model.lora); not built.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qwen_jax.checkpoint.hf import (
    _NP_DTYPES,
    CheckpointError,
    _host_array,
    _tensor_map,
    check_output_dir,
    save_hf,
)
from qwen_jax.model import lora
from qwen_jax.model.block import DENSE
from qwen_jax.model.transformer import Qwen

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapted_weights(model: Qwen) -> list[str]:
    """Our names of the block weights that carry an adapter (`{name}_lora_a`), in a fixed
    order."""
    return [n for n in DENSE if hasattr(model.blocks, f"{n}_lora_a")]


def hf_module_names(model: Qwen) -> dict[str, str]:
    """Our adapted weight name -> its HF Qwen2 module path with `{i}` for the layer
    (e.g. wq -> model.layers.{i}.self_attn.q_proj), from the export's own name mapping."""
    _, layer = _tensor_map(model.cfg, "qwen2")
    return {n: layer[n].hf.removesuffix(".weight") for n in adapted_weights(model)}


def adapter_config(model: Qwen, base_model_name_or_path: str = "") -> dict:
    """adapter_config.json contents (peft LoraConfig fields) for the model's adapters."""
    cfg = model.cfg
    modules = hf_module_names(model)
    if not modules:
        raise CheckpointError("the model has no LoRA adapters (lora_rank 0): nothing to export")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        # PEFT matches a module when its name ends with one of these (q_proj, up_proj, ...).
        "target_modules": sorted(m.rsplit(".", 1)[-1] for m in modules.values()),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,  # scaling alpha / r, as ours (rsLoRA would be alpha / sqrt(r))
        "use_dora": False,
        "init_lora_weights": True,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def adapter_tensors(model: Qwen, dtype: str | None = None) -> dict[str, np.ndarray]:
    """PEFT's saved state dict: per layer and adapted projection, lora_A [r, in] and lora_B
    [out, r] under `base_model.model.<HF module path>` (PEFT strips the adapter name on save
    and inserts it on load)."""
    np_dtype = _NP_DTYPES[dtype or model.cfg.param_dtype]
    r = model.cfg.lora_rank
    out: dict[str, np.ndarray] = {}
    for name, module in hf_module_names(model).items():
        a_l = _host_array(getattr(model.blocks, f"{name}_lora_a")[...])  # [L, *in, r]
        b_l = _host_array(getattr(model.blocks, f"{name}_lora_b")[...])  # [L, r, *out]
        for i in range(model.cfg.num_layers):
            prefix = "base_model.model." + module.format(i=i)
            a = a_l[i].reshape(-1, r).T  # [r, in]
            b = b_l[i].reshape(r, -1).T  # [out, r]
            out[prefix + ".lora_A.weight"] = np.ascontiguousarray(a.astype(np_dtype))
            out[prefix + ".lora_B.weight"] = np.ascontiguousarray(b.astype(np_dtype))
    return out


def export_peft_adapter(
    model: Qwen,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str = "",
    dtype: str | None = None,
) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory (module docstring).

    `base_model_name_or_path` is recorded for `AutoPeftModel*` loaders (the base export's
    directory or hub id); `dtype` defaults to the parameter dtype. The directory must not exist;
    it appears complete or not at all.
    """
    out = check_output_dir(out_dir)
    config = adapter_config(model, base_model_name_or_path)
    tensors = adapter_tensors(model, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent.absolute()))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def base_model(model: Qwen) -> Qwen:
    """The frozen base the adapters ride on, as a float model without adapters (an int8 base
    dequantized): lora.merge of the model with every b zeroed, which adds exactly nothing."""
    if not model.cfg.lora_rank:
        return model
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    for name in list(pure["blocks"]):
        if name.endswith("_lora_b"):
            pure["blocks"][name] = jnp.zeros_like(pure["blocks"][name])
    state = jax.tree.map(lambda x: x, state)  # a new tree: `model` keeps its adapters
    nnx.replace_by_pure_dict(state, pure)
    return lora.merge(nnx.merge(graphdef, state))


def export_base_hf(model: Qwen, out_dir: str | os.PathLike, **save_hf_kwargs) -> Path:
    """Write the base without adapters (`base_model`) as a plain HF directory, the model a
    PEFT adapter directory is loaded onto, in the qwen2 layout the adapter's module names
    refer to; `save_hf_kwargs` are save_hf's (dtype, extra_files, ...)."""
    save_hf_kwargs.setdefault("layout", "qwen2")
    return save_hf(base_model(model), out_dir, **save_hf_kwargs)


def export_merged_hf(model: Qwen, out_dir: str | os.PathLike, **save_hf_kwargs) -> Path:
    """Fold the adapters into the base (lora.merge) and write a plain HF directory;
    `save_hf_kwargs` are save_hf's (layout, dtype, extra_files, ...)."""
    merged = lora.merge(model) if model.cfg.lora_rank else model
    return save_hf(merged, out_dir, **save_hf_kwargs)
