"""Architecture configuration: a frozen dataclass with the published sizes as named presets.

Sizes and flags are the spec's table (shared/spec/qwen_v1.md §1.4). The same dataclass describes
the Qwen1.5/2/2.5 family (GQA through `num_kv_heads`, tied embeddings, larger rope bases), so one
model class loads both; `from_hf_config` / `to_hf_config` translate the two config.json dialects:
Qwen v1 (`model_type: "qwen"`, class `QWenLMHeadModel`) and Qwen2 (`model_type: "qwen2"`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

# Qwen v1 tokenizer: 151,643 BPE ranks + 208 special tokens (spec §3).
QWEN_TOKENIZER_VOCAB = 151_851
ENDOFTEXT_ID = 151_643

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_qkv_proj"]
_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Decoder-only Qwen architecture.

    Legend used in shapes across the model: B batch, T query length, S kv length, D hidden,
    N query heads, K kv heads, H head dim, F FFN width, V vocab (embedding rows), L layers.
    """

    vocab_size: int  # V: embedding rows (padded; the tokenizer uses fewer ids)
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K (= N for every Qwen v1 size; fewer for GQA in Qwen2-family models)
    head_dim: int  # H (`kv_channels` in v1 configs)
    ffn_size: int  # F: the *real* SwiGLU width (v1 config `intermediate_size` is 2F)
    rope_base: float = 10_000.0
    rms_eps: float = 1e-6
    seq_length: int = 2048  # training context S; dynamic NTK and LogN key off it
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = False  # inference-only long-context switches (spec §2)
    use_logn_attn: bool = False
    # Layer-wise window attention (spec §2.3): one window per layer, 0 = full causal attention.
    # Empty tuple = every layer full. Shorter windows belong in lower layers.
    attn_windows: tuple[int, ...] = ()
    tie_embeddings: bool = False
    qkv_bias: bool = True
    model_type: Literal["qwen", "qwen2"] = "qwen"  # which HF layout exports default to
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: str = "float32"  # storage dtype of parameters (fp32 master weights)
    remat_policy: RematPolicy = "none"
    # Kernels (qwen_jax.model.dispatch); runtime choices, never written to HF config.json.
    attention_impl: Literal["xla", "pallas"] = "xla"  # flash (no cache) + decode (T == 1)
    # "pallas" needs replicated weights under a mesh (single device or data parallel); the
    # "dots" remat policies save XLA dot outputs only, so they recompute the kernel's products.
    matmul_impl: Literal["xla", "pallas"] = "xla"
    # Fine-tuning options (training/runtime only, never written to HF config.json).
    # Inverted dropout on the embedding output and on each residual branch (attention output,
    # MLP output); only when the forward is given a key (Qwen.__call__(dropout_rng=...)).
    dropout: float = 0.0
    # LoRA (qwen_jax.model.lora): rank 0 = no adapters; y += dropout(x) @ a @ b * alpha / rank.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on each adapter's input (PEFT's), only with a dropout key
    # Our names (wq wk wv wo w1 w2 c_proj) or aliases: Qwen v1 c_attn / c_proj, HF q_proj ...
    lora_targets: tuple[str, ...] = ()
    lora_int8_base: bool = False  # frozen dense block weights held int8 (Q-LoRA-style)
    reward_head: bool = False  # Param `score` [D, 1]: Qwen.rewards (HF score.weight transposed)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotate-half RoPE")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {list(_DTYPES)}")
        if self.attn_windows and len(self.attn_windows) != self.num_layers:
            raise ValueError(
                f"attn_windows has {len(self.attn_windows)} entries for {self.num_layers} layers"
            )
        if any(w < 0 for w in self.attn_windows):
            raise ValueError(f"attn_windows must be >= 0 (0 = full), got {self.attn_windows}")
        for name in ("attention_impl", "matmul_impl"):
            if getattr(self, name) not in _IMPLS:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {_IMPLS}")
        for name in ("dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.lora_rank or self.lora_targets or self.lora_int8_base or not self.lora_alpha > 0:
            # Lazy: lora.py imports the model, which imports this module.
            from qwen_jax.model import lora

            lora.check_config(self)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def num_groups(self) -> int:
        """G = N / K query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> QwenConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Closed-form count; equals the spec's formula for v1 (MHA, untied, qkv bias).

        LoRA adapters (rank x (fan_in + fan_out) per targeted weight and layer) and the reward
        head (D) count only when configured; the int8 scales of `lora_int8_base` do not count
        (they are quantization metadata, like factory.param_count treats them).
        """
        d, f, v, h = self.hidden_size, self.ffn_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        attn = d * (q + 2 * kv) + (q + 2 * kv) * self.qkv_bias + q * d
        per_layer = attn + 3 * d * f + 2 * d
        if self.lora_rank:
            from qwen_jax.model.lora import resolve_targets  # lazy: lora imports the model

            fans = self.dense_fans()
            targets = resolve_targets(self.lora_targets)
            per_layer += sum(self.lora_rank * (fans[n][0] + fans[n][1]) for n in targets)
        embed = v * d * (1 if self.tie_embeddings else 2)
        return embed + self.num_layers * per_layer + d + d * self.reward_head

    def dense_fans(self) -> dict[str, tuple[int, int]]:
        """(fan_in, fan_out) of each per-layer dense projection, as a PEFT nn.Linear sees it."""
        d, f = self.hidden_size, self.ffn_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "wq": (d, q),
            "wk": (d, kv),
            "wv": (d, kv),
            "wo": (q, d),
            "w1": (d, f),
            "w2": (d, f),
            "c_proj": (f, d),
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        6 * (non-embedding matmul params + lm head) + 12 * L * T * N * H / 2 for causal attention
        (the score and value matmuls, halved for the causal triangle; the PaLM/MaxText convention).
        """
        d, h = self.hidden_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        matmul = self.num_layers * (d * (q + 2 * kv) + q * d + 3 * d * self.ffn_size)
        matmul += self.vocab_size * d
        attn = 12 * self.num_layers * seq_len * q / 2
        return 6.0 * matmul + attn


def _ffn(d: int) -> int:
    """The v1 rule (spec §1.1): roundup(2*floor(8d/3), 256) / 2."""
    wide = 2 * (8 * d // 3)
    return -(-wide // 256) * 256 // 2


QWEN_1_8B = QwenConfig(
    vocab_size=151_936,
    hidden_size=2048,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    head_dim=128,
    ffn_size=_ffn(2048),  # 5504
    seq_length=8192,
    max_position_embeddings=8192,
    use_dynamic_ntk=True,
    use_logn_attn=True,
)
QWEN_7B = QwenConfig(
    vocab_size=151_936,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    ffn_size=_ffn(4096),  # 11008
    seq_length=8192,
    max_position_embeddings=32768,
    use_dynamic_ntk=True,
    use_logn_attn=True,
)
QWEN_14B = QwenConfig(
    vocab_size=152_064,
    hidden_size=5120,
    num_layers=40,
    num_heads=40,
    num_kv_heads=40,
    head_dim=128,
    ffn_size=_ffn(5120),  # 13696
    seq_length=2048,
    max_position_embeddings=8192,
    use_dynamic_ntk=True,
    use_logn_attn=True,
)
QWEN_72B = QwenConfig(
    vocab_size=152_064,
    hidden_size=8192,
    num_layers=80,
    num_heads=64,
    num_kv_heads=64,
    head_dim=128,
    ffn_size=24_576,  # 3d: 72B breaks the 8/3 rule (spec §1.1)
    rope_base=1_000_000.0,
    seq_length=32768,
    max_position_embeddings=32768,
)
PRESETS: dict[str, QwenConfig] = {
    "qwen_1_8b": QWEN_1_8B,
    "qwen_7b": QWEN_7B,
    "qwen_14b": QWEN_14B,
    "qwen_72b": QWEN_72B,
}


def tiny(base: QwenConfig = QWEN_7B, **changes: Any) -> QwenConfig:
    """A tiny config derived from a real preset (same flags and layout, small sizes)."""
    small = dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        ffn_size=96,
        seq_length=64,
        max_position_embeddings=256,
    )
    small.update(changes)
    return dataclasses.replace(base, **small)


# --------------------------------------------------------------------------- HF config.json


def from_hf_config(hf: dict[str, Any]) -> QwenConfig:
    """Build a QwenConfig from a parsed config.json (Qwen v1 "qwen" or Qwen2-family "qwen2").

    Parameters keep the checkpoint's stored dtype (`torch_dtype`/`dtype`); override
    `param_dtype` to train with fp32 master weights.
    """
    cfg = _from_hf_config(hf)
    stored = hf.get("torch_dtype") or hf.get("dtype")
    if stored in _DTYPES:
        cfg = dataclasses.replace(cfg, param_dtype=stored)
    return cfg


def _from_hf_config(hf: dict[str, Any]) -> QwenConfig:
    model_type = hf.get("model_type")
    if model_type == "qwen":
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("kv_channels", d // n)
        if hf.get("rotary_pct", 1.0) != 1.0:
            raise ValueError(f"rotary_pct={hf['rotary_pct']} is not supported (only 1.0)")
        if hf["intermediate_size"] % 2:
            raise ValueError(f"v1 intermediate_size={hf['intermediate_size']} must be even (2F)")
        return QwenConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            num_layers=hf["num_hidden_layers"],
            num_heads=n,
            num_kv_heads=n,
            head_dim=head_dim,
            ffn_size=hf["intermediate_size"] // 2,
            rope_base=float(hf.get("rotary_emb_base", 10_000)),
            rms_eps=hf.get("layer_norm_epsilon", 1e-6),
            seq_length=hf.get("seq_length", 2048),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            use_dynamic_ntk=bool(hf.get("use_dynamic_ntk", False)),
            use_logn_attn=bool(hf.get("use_logn_attn", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=not hf.get("no_bias_qkv", False),
            model_type="qwen",
        )
    if model_type == "qwen2":
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("rope_type"))
        if rope_type not in (None, "default"):
            raise ValueError(f"rope_type={rope_type!r} is not supported (only 'default')")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true Qwen2 configs are not supported")
        max_pos = hf.get("max_position_embeddings", 32768)
        return QwenConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=d,
            num_layers=hf["num_hidden_layers"],
            num_heads=n,
            num_kv_heads=hf.get("num_key_value_heads", n),
            head_dim=hf.get("head_dim") or d // n,
            ffn_size=hf["intermediate_size"],
            rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            rms_eps=hf.get("rms_norm_eps", 1e-6),
            seq_length=max_pos,
            max_position_embeddings=max_pos,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True,
            model_type="qwen2",
        )
    raise ValueError(
        f"unsupported config.json model_type={model_type!r}; expected 'qwen' (QWenLMHeadModel) "
        "or 'qwen2' (Qwen1.5/2/2.5 Qwen2ForCausalLM)"
    )


def to_hf_config(cfg: QwenConfig, layout: Literal["qwen", "qwen2"] | None = None) -> dict[str, Any]:
    """config.json contents for `layout` (default: the config's own model_type)."""
    layout = layout or cfg.model_type
    dtype = cfg.param_dtype  # a torch_dtype name as is (__post_init__ checked it)
    if layout == "qwen":
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError("the Qwen v1 layout has no GQA: num_kv_heads must equal num_heads")
        if not cfg.qkv_bias:
            raise ValueError("the Qwen v1 layout always has a c_attn bias")
        return {
            "architectures": ["QWenLMHeadModel"],
            "model_type": "qwen",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "kv_channels": cfg.head_dim,
            "intermediate_size": 2 * cfg.ffn_size,
            "rotary_emb_base": cfg.rope_base,
            "rotary_pct": 1.0,
            "layer_norm_epsilon": cfg.rms_eps,
            "seq_length": cfg.seq_length,
            "max_position_embeddings": cfg.max_position_embeddings,
            "use_dynamic_ntk": cfg.use_dynamic_ntk,
            "use_logn_attn": cfg.use_logn_attn,
            "no_bias": True,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
            "torch_dtype": dtype,
        }
    if layout == "qwen2":
        if not cfg.qkv_bias:
            raise ValueError("the Qwen2 layout always has q/k/v biases")
        # Qwen2 configs have no switch for dynamic NTK / LogN: they stay inference options here.
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.ffn_size,
            "rope_theta": cfg.rope_base,
            "rms_norm_eps": cfg.rms_eps,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "initializer_range": cfg.init_std,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": ENDOFTEXT_ID,
            "torch_dtype": dtype,
        }
    raise ValueError(f"unknown layout {layout!r}; expected 'qwen' or 'qwen2'")
