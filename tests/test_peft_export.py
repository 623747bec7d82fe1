"""LoRA exports: a PEFT adapter directory that `peft` loads onto transformers' Qwen2 (with the
base exported without adapters), and merged HF weights; both give our logits (fp32, 1e-4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from qwen_jax.checkpoint import CheckpointError
from qwen_jax.checkpoint.peft import export_base_hf, export_merged_hf, export_peft_adapter
from qwen_jax.model import config as C
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.quantize import quantize_int8
from qwen_jax.testing.hf_reference import hf_logits
from qwen_jax.testing.tolerance import ATOL_LOGITS

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "c_proj")


def _cfg(**changes):
    """Tiny Qwen2-layout GQA model (2 kv heads for 4 query heads) with LoRA rank 4."""
    base = dict(
        vocab_size=256,
        num_kv_heads=2,
        model_type="qwen2",
        init_std=0.1,
        lora_rank=4,
        lora_alpha=8.0,
        lora_dropout=0.05,
        lora_targets=ALL_TARGETS,
    )
    return C.tiny(C.QWEN_7B, **(base | changes))


def _lora_model(cfg, seed=0):
    """A model with every parameter drawn at random (numpy: no per-shape compiles), norms
    near 1: the adapters' b (zero at a real init) change the output, and the q/k/v biases are
    nonzero so the base export carries them too."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model(cfg))

    def draw(path, x):
        name = str(path[-1].key)
        if name.startswith("ln"):
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _tokens(vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 12))


def _ours(model, tokens):
    """Our fp32 logits [B, T, V] (no dropout)."""
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, t: nnx.merge(graphdef, state)(t)[0])
    return np.asarray(run(state, jnp.asarray(tokens)))


@pytest.mark.parametrize(
    "targets,tied,int8",
    [
        (ALL_TARGETS, False, False),
        (("q_proj", "v_proj", "down_proj"), True, False),
        (("c_attn", "w1"), False, True),  # Q-LoRA-style: the base export is dequantized
    ],
)
def test_peft_adapter_on_transformers_gives_our_logits(tmp_path, targets, tied, int8):
    import peft
    from transformers import Qwen2ForCausalLM

    model = _lora_model(_cfg(lora_targets=targets, tie_embeddings=tied))
    if int8:
        model = quantize_int8(model, head=False)
    base_dir = export_base_hf(model, tmp_path / "base", layout="qwen2")
    adapter_dir = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="b")

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
    names = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
    names |= {"w1": "up_proj", "w2": "gate_proj", "c_proj": "down_proj"}
    names |= {"c_attn": ("q_proj", "k_proj", "v_proj")}
    want = set()
    for t in targets:
        want |= set(np.atleast_1d(names.get(t, t)))
    assert set(config["target_modules"]) == want
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(tensors) == 2 * len(want) * model.cfg.num_layers
    q_a = tensors.get("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
    assert q_a is not None and q_a.shape == (4, model.cfg.hidden_size)

    tokens = _tokens()
    ours = _ours(model, tokens)
    hf_base = Qwen2ForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    # The base alone is a different model: the adapters matter in this comparison.
    assert np.max(np.abs(hf_logits(hf_base, tokens) - ours)) > 100 * ATOL_LOGITS
    hf_lora = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    np.testing.assert_allclose(hf_logits(hf_lora, tokens), ours, atol=ATOL_LOGITS, rtol=0)


def test_merged_export_gives_our_logits(tmp_path):
    from transformers import Qwen2ForCausalLM

    model = _lora_model(_cfg(), seed=3)
    out = export_merged_hf(model, tmp_path / "merged", layout="qwen2")
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    hf = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(
        hf_logits(hf, tokens), _ours(model, tokens), atol=ATOL_LOGITS, rtol=0
    )


def test_adapter_export_refuses_a_model_without_adapters(tmp_path):
    model = _lora_model(_cfg(lora_rank=0, lora_targets=()))
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        export_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
