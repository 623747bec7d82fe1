"""Dynamic NTK, LogN and layer-wise window attention against an independent numpy reference.

The reference below is written from the spec's formulas (shared/spec/qwen_v1.md §1.2, §2.1-2.3)
in float64, sharing only the parameter values with the model. It is checked at prompt lengths
below, at and above seq_length, through prefill and through KV-cache decoding (where the NTK
alpha of the prefill is held fixed, as the reference implementation does), and each switch is
checked to be off where the reference leaves it off.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.infer.engine import Engine
from qwen_jax.infer.longctx import parse_windows, prefill_alpha, with_long_context
from qwen_jax.model import config as C
from qwen_jax.model import rope
from qwen_jax.model.factory import create_model

S = 16  # seq_length: the "training" context
# Large init so attention is sharp and positions matter (the switches then change logits a lot).
CFG = C.tiny(
    vocab_size=128,
    seq_length=S,
    max_position_embeddings=256,
    init_std=0.25,
    use_dynamic_ntk=True,
    use_logn_attn=True,
)
ATOL = 1e-4


# ------------------------------------------------------------------- the numpy reference


def ref_ntk_alpha(length: int, seq_length: int) -> int:
    """Spec §2.1, verbatim."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ref_logits(p, cfg, tokens, *, alpha=1, logn=False, windows=()) -> np.ndarray:
    """float64 forward of one sequence [T] -> logits [T, V] from the spec's formulas."""
    t, h = len(tokens), cfg.head_dim
    base = cfg.rope_base * alpha ** (h / (h - 2))
    inv_freq = (1.0 / base ** (np.arange(0, h, 2) / h)).astype(np.float32)  # fp32 (spec §1.2)
    freqs = np.outer(np.arange(t, dtype=np.float32), inv_freq).astype(np.float64)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

    def rotate(x):  # x' = x cos + rot(x) sin, rot(x) = concat(-x2, x1)
        x1, x2 = x[..., : h // 2], x[..., h // 2 :]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.rms_eps) * w

    pos = np.arange(t)
    scale = np.where(pos + 1 > cfg.seq_length, np.log(pos + 1) / math.log(cfg.seq_length), 1.0)
    g = cfg.num_heads // cfg.num_kv_heads
    blk = p["blocks"]
    x = p["wte"][np.asarray(tokens)]
    for layer in range(cfg.num_layers):
        w = {k: v[layer] for k, v in blk.items()}
        a = rms(x, w["ln_1"])
        q = rotate(np.einsum("td,dnh->tnh", a, w["wq"]) + w["bq"])
        k = rotate(np.einsum("td,dkh->tkh", a, w["wk"]) + w["bk"])
        v = np.einsum("td,dkh->tkh", a, w["wv"]) + w["bv"]
        if logn:
            q = q * scale[:, None, None]
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        scores = np.einsum("tnh,snh->nts", q, k) / math.sqrt(h)
        window = windows[layer] if windows else 0
        dist = pos[:, None] - pos[None, :]
        visible = (dist >= 0) & ((window == 0) | (dist < window))
        scores = np.where(visible[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("tnh,nhd->td", np.einsum("nts,snh->tnh", probs, v), w["wo"])
        a = rms(x, w["ln_2"])
        up, gate = a @ w["w1"], a @ w["w2"]
        x = x + (up * gate / (1 + np.exp(-gate))) @ w["c_proj"]
    return rms(x, p["ln_f"]) @ p["lm_head"]


def ref_logp(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=11)


@pytest.fixture(scope="module")
def params(model):
    state = nnx.state(model, nnx.Param).to_pure_dict()
    return jax.tree.map(lambda a: np.asarray(a, np.float64), state)


def _ours(model, tokens):
    """Full-sequence logits with the prefill alpha of this length and the config's LogN."""
    alpha = prefill_alpha(model.cfg, [len(tokens)])
    logits, _ = model(jnp.asarray([tokens]), rope_alpha_b=alpha, logn=model.cfg.use_logn_attn)
    return np.asarray(logits[0], np.float64)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=n).tolist()


# ------------------------------------------------------------------------------ tests


def test_ntk_alpha_formula():
    for length in range(1, 10 * S):
        assert float(rope.ntk_alpha(length, S)) == ref_ntk_alpha(length, S), length
    assert [ref_ntk_alpha(n, S) for n in (S, S + 1, 2 * S, 2 * S + 1, 4 * S + 1)] == [
        1,
        3,
        3,
        7,
        15,
    ]
    assert prefill_alpha(CFG.replace(use_dynamic_ntk=False), [100]) is None


@pytest.mark.parametrize("length", [9, S, 40, 100])  # below, at, above (alpha 7, 15)
def test_ntk_and_logn_prefill_logits_match_reference(model, params, length):
    toks = _tokens(length, seed=length)
    ref = ref_logits(params, CFG, toks, alpha=ref_ntk_alpha(length, S), logn=True)
    np.testing.assert_allclose(_ours(model, toks), ref, atol=ATOL, rtol=0)
    plain = ref_logits(params, CFG, toks)
    if length <= S:  # both are no-ops up to the training length
        np.testing.assert_allclose(ref, plain, atol=1e-9, rtol=0)
    else:  # and change the logits a lot beyond it (so the comparison above has teeth)
        assert np.abs(ref - plain).max() > 0.1


@pytest.mark.parametrize("ntk,logn", [(False, False), (True, False), (False, True)])
def test_each_switch_is_independent(model, params, ntk, logn):
    length = 40
    toks = _tokens(length, seed=1)
    view = with_long_context(model, ntk=ntk, logn=logn)
    alpha = ref_ntk_alpha(length, S) if ntk else 1
    ref = ref_logits(params, CFG, toks, alpha=alpha, logn=logn)
    np.testing.assert_allclose(_ours(view, toks), ref, atol=ATOL, rtol=0)


def test_window_attention_matches_masked_reference(model, params):
    windows = parse_windows("5,0", CFG.num_layers)  # short window low, full attention high
    assert windows == (5, 0)
    toks = _tokens(40, seed=2)
    view = with_long_context(model, windows=windows)
    ref = ref_logits(params, CFG, toks, alpha=ref_ntk_alpha(40, S), logn=True, windows=windows)
    np.testing.assert_allclose(_ours(view, toks), ref, atol=ATOL, rtol=0)
    full = ref_logits(params, CFG, toks, alpha=ref_ntk_alpha(40, S), logn=True)
    assert np.abs(ref[5:] - full[5:]).max() > 0.1  # the window does change things...
    np.testing.assert_allclose(ref[:5], full[:5], atol=1e-9)  # ...but not within its reach
    # windows only, NTK and LogN off
    plain_view = with_long_context(model, ntk=False, logn=False, windows=windows)
    ref = ref_logits(params, CFG, toks, windows=windows)
    np.testing.assert_allclose(_ours(plain_view, toks), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("windows", [(), (6, 0)], ids=["full", "window"])
def test_decoding_holds_the_prefill_alpha(model, params, windows):
    """Rows of 12 (alpha 1) and 21 (alpha 3) prompt tokens decode across S and 2S; the alpha of
    each row stays its prefill alpha, LogN follows positions, windows slide over the cache."""
    view = with_long_context(model, windows=windows)
    prompts = [_tokens(12, seed=3), _tokens(21, seed=4)]
    new = 14
    res = Engine(view, donate=False).generate(prompts, max_new_tokens=new)  # model is shared
    moved = 0.0
    for prompt, out in zip(prompts, res):
        alpha = ref_ntk_alpha(len(prompt), S)
        seq = prompt + out.token_ids
        logp = ref_logp(ref_logits(params, CFG, seq, alpha=alpha, logn=True, windows=windows))
        steps = logp[len(prompt) - 1 : -1]
        assert out.token_ids == steps.argmax(-1).tolist()
        np.testing.assert_allclose(out.logprobs, steps[np.arange(new), out.token_ids], atol=ATOL)
        # Recomputing alpha from the grown length (what the reference does NOT do) differs.
        grown = ref_ntk_alpha(len(seq), S)
        assert grown != alpha
        other = ref_logp(ref_logits(params, CFG, seq, alpha=grown, logn=True, windows=windows))
        moved = max(moved, np.abs(other[-1] - logp[-1]).max())
    assert moved > 1e-2


def test_parse_windows():
    assert parse_windows("off", 4) == ()
    assert parse_windows("8", 3) == (8, 8, 8)
    assert parse_windows("256*2,512*1,0", 4) == (256, 256, 512, 0)
    for bad in ("1,2,3", "x", "-1*4", "4*0"):
        with pytest.raises(ValueError):
            parse_windows(bad, 4)
