"""Builders for the independent reference: transformers `Qwen2ForCausalLM` on random weights.

Shared by the model-parity, export and generation tests. torch, transformers and safetensors'
torch API are peers (the `test` extra, design.md §3): imported inside each function, so importing
qwen_jax.testing never needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM


def make_hf_model(
    *,
    vocab: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    ffn: int = 96,
    tied: bool = False,
    rope_theta: float = 10_000.0,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A tiny Qwen2 with every parameter (norms and biases too) drawn at random."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_theta=rope_theta,
        rms_norm_eps=1e-6,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """fp32 logits [B, T, V]; positions from the mask the way `generate` computes them."""
    import torch

    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    kwargs = {}
    if mask is not None:
        m = torch.tensor(np.asarray(mask), dtype=torch.long)
        kwargs["attention_mask"] = m
        kwargs["position_ids"] = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float().numpy()


def save_as_qwen_v1(model: Qwen2ForCausalLM, out: Path) -> Path:
    """Write `model` under Qwen v1 names: q/k/v fused into c_attn rows [Q;K;V] (MHA only)."""
    import torch
    from safetensors.torch import save_file

    cfg = model.config
    assert cfg.num_key_value_heads == cfg.num_attention_heads, "v1 has no GQA"
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    t = {"transformer.wte.weight": sd["model.embed_tokens.weight"]}
    t["transformer.ln_f.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        t[q + "attn.c_attn.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        t[q + "attn.c_attn.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        t[q + "attn.c_proj.weight"] = sd[a + "o_proj.weight"]
        t[q + "mlp.w1.weight"] = sd[p + "mlp.up_proj.weight"]
        t[q + "mlp.w2.weight"] = sd[p + "mlp.gate_proj.weight"]
        t[q + "mlp.c_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        t[q + "ln_1.weight"] = sd[p + "input_layernorm.weight"]
        t[q + "ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    v1 = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_channels": cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": 2 * cfg.intermediate_size,
        "rotary_emb_base": cfg.rope_parameters["rope_theta"],
        "rotary_pct": 1.0,
        "layer_norm_epsilon": cfg.rms_norm_eps,
        "seq_length": 128,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    (out / "config.json").write_text(json.dumps(v1))
    return out
