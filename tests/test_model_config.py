"""Presets against the spec's size table (shared/spec/qwen_v1.md §1.4), counted abstractly."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from qwen_jax.model import config as C
from qwen_jax.model.factory import abstract_model, param_count

# spec §1.4: (d, L, heads, config intermediate_size, V, seq_length, max_pos, rope base, ntk/logn)
SPEC = {
    "qwen_1_8b": (2048, 24, 16, 11008, 151936, 8192, 8192, 10000, True),
    "qwen_7b": (4096, 32, 32, 22016, 151936, 8192, 32768, 10000, True),
    "qwen_14b": (5120, 40, 40, 27392, 152064, 2048, 8192, 10000, True),
    "qwen_72b": (8192, 80, 64, 49152, 152064, 32768, 32768, 1_000_000, False),
}
# The spec's rounded counts, and 72B exactly from its index total_size (bf16 bytes / 2).
SPEC_BILLIONS = {"qwen_1_8b": 1.837, "qwen_7b": 7.721, "qwen_14b": 14.167, "qwen_72b": 72.288}
QWEN_72B_EXACT = 144_575_840_256 // 2


def spec_formula(d, layers, ffn, vocab):
    """spec §1.4: 2*V*d + L*(4d^2 + 3d + 3*d*ffn + 2d) + d."""
    return 2 * vocab * d + layers * (4 * d * d + 3 * d + 3 * d * ffn + 2 * d) + d


@pytest.mark.parametrize("name", sorted(SPEC))
def test_preset_matches_spec_table(name):
    d, layers, heads, inter, vocab, seq, max_pos, base, ntk = SPEC[name]
    cfg = C.PRESETS[name]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (d, layers, heads)
    assert cfg.num_kv_heads == heads and cfg.head_dim == 128
    assert 2 * cfg.ffn_size == inter and cfg.vocab_size == vocab
    assert (cfg.seq_length, cfg.max_position_embeddings, cfg.rope_base) == (seq, max_pos, base)
    assert cfg.use_dynamic_ntk == ntk and cfg.use_logn_attn == ntk
    assert cfg.rms_eps == 1e-6 and not cfg.tie_embeddings and cfg.qkv_bias


@pytest.mark.parametrize("name", sorted(SPEC))
def test_param_count_from_eval_shape_equals_spec(name):
    d, layers, _, inter, vocab, *_ = SPEC[name]
    cfg = C.PRESETS[name]
    counted = param_count(cfg)  # jax.eval_shape: nothing allocated
    assert counted == spec_formula(d, layers, inter // 2, vocab)
    assert round(counted / 1e9, 3) == SPEC_BILLIONS[name]
    if name == "qwen_72b":
        assert counted == QWEN_72B_EXACT


def test_abstract_model_allocates_nothing():
    wq = abstract_model(C.QWEN_72B).blocks.wq.get_value()
    assert isinstance(wq, jax.ShapeDtypeStruct)
    assert wq.shape == (80, 8192, 64, 128) and wq.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(SPEC))
def test_hf_config_round_trip(name):
    cfg = C.PRESETS[name]
    assert C.from_hf_config(C.to_hf_config(cfg, "qwen")) == cfg
    q2 = C.from_hf_config(C.to_hf_config(cfg, "qwen2"))
    same = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "rope_base")
    assert all(getattr(q2, f) == getattr(cfg, f) for f in same)


def test_v1_config_reads_real_field_names():
    """A Qwen-7B config.json as released (spec [CFG-7B] field names)."""
    hf = {
        "model_type": "qwen",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "kv_channels": 128,
        "intermediate_size": 22016,
        "vocab_size": 151936,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "layer_norm_epsilon": 1e-6,
        "seq_length": 8192,
        "max_position_embeddings": 32768,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg = C.from_hf_config(hf)
    assert dataclasses.replace(cfg, param_dtype="float32") == C.QWEN_7B


def test_invalid_configs_fail_clearly():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        C.tiny(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_windows has 3 entries for 2 layers"):
        C.tiny(attn_windows=(8, 8, 8))
    with pytest.raises(ValueError, match="rotary_pct"):
        C.from_hf_config({**C.to_hf_config(C.QWEN_7B, "qwen"), "rotary_pct": 0.5})
