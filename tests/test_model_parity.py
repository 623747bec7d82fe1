"""Parity with transformers Qwen2ForCausalLM (fp32, random weights, imported via our importer)."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.checkpoint.hf import load_hf
from qwen_jax.model.transformer import positions_from_mask
from qwen_jax.testing.hf_reference import hf_logits, make_hf_model, save_as_qwen_v1

ATOL = 1e-4  # design.md §4: fp32 logits, never relaxed

VARIANTS = {
    "mha_untied": dict(heads=4, kv_heads=4, tied=False),
    "gqa_tied": dict(heads=4, kv_heads=2, tied=True),
    "gqa_untied_big_rope": dict(heads=8, kv_heads=2, tied=False, rope_theta=1e6, hidden=64),
}


def _padded_batch(vocab: int, seed: int = 0):
    """Rows of different lengths: left padded, right padded and full."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(3, 12))
    mask = np.ones((3, 12), np.int32)
    mask[0, :5] = 0  # left padding
    mask[1, 9:] = 0  # right padding
    return tokens, mask


def _ours(model, tokens, mask):
    logits, _ = model(
        jnp.asarray(tokens),
        positions_bt=positions_from_mask(jnp.asarray(mask)),
        segment_ids_bt=jnp.asarray(mask),
    )
    return np.asarray(logits)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_qwen2_checkpoint_matches_transformers(tmp_path, name):
    hf = make_hf_model(**VARIANTS[name])
    hf.save_pretrained(tmp_path / "hf")
    cfg, model = load_hf(tmp_path / "hf")
    assert cfg.model_type == "qwen2" and cfg.num_kv_heads == VARIANTS[name]["kv_heads"]
    tokens, mask = _padded_batch(cfg.vocab_size)
    ref = hf_logits(hf, tokens, mask)
    ours = _ours(model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)


def test_qwen_v1_named_checkpoint_matches_transformers(tmp_path):
    hf = make_hf_model(heads=4, kv_heads=4, tied=False, seed=3)
    save_as_qwen_v1(hf, tmp_path / "v1")
    cfg, model = load_hf(tmp_path / "v1")
    assert cfg.model_type == "qwen" and cfg.ffn_size == hf.config.intermediate_size
    assert cfg.use_dynamic_ntk and cfg.use_logn_attn  # flags carried from the v1 config
    tokens, mask = _padded_batch(cfg.vocab_size, seed=1)
    np.testing.assert_allclose(
        _ours(model, tokens, mask)[mask.astype(bool)],
        hf_logits(hf, tokens, mask)[mask.astype(bool)],
        atol=ATOL,
        rtol=0,
    )


def test_unpadded_defaults_match_transformers(tmp_path):
    """No positions/segments given: arange positions and a full causal mask."""
    hf = make_hf_model(heads=4, kv_heads=2, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    _, model = load_hf(tmp_path / "hf")
    tokens = np.random.default_rng(2).integers(0, 256, size=(2, 16))
    logits, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), hf_logits(hf, tokens), atol=ATOL, rtol=0)
