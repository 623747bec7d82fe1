"""The alignment stages' shared settings (spec §5), read by experiments/{sft,rm,dpo}/*.py.

Each experiment file states what it reproduces and sets its own numbers; what is common lives
here once: the size-dependent mesh and slice, the report's chat-SFT optimizer, and the `:runlocal`
form that runs the same stage on this CPU from the demo model (`make demo` writes it to
runs/demo: the export, its SentencePiece tokenizer and the demo corpus with its SFT and
preference splits).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from qwen_jax.train.config import load_experiment

DEMO_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "pretrain" / "tiny.py"
DEMO_DIR = "runs/demo"

# Slice per size for the alignment stages (batch 128 x 2048 for SFT, 64 pairs x 2 x 2048 for the
# reward model and DPO): the smallest v5p slice whose HBM holds the fp32 master weights, AdamW
# state and remat activations (`qwen-jax compile` checks it; figures in WORKSPACE.md).
TOPOLOGY = {"qwen_1_8b": "v5p-8", "qwen_7b": "v5p-32", "qwen_14b": "v5p-64", "qwen_72b": "v5p-256"}


def base_model(c: ml_collections.ConfigDict, preset: str) -> None:
    """A full-size preset in bf16 compute with fp32 master weights, full remat, fsdp over the
    slice (as pretraining)."""
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.tokenizer = "qwen"
    c.data.seq_len = 2048
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tpu.topology = TOPOLOGY[preset]


def chat_sft_optimizer(c: ml_collections.ConfigDict, peak_lr: float = 2e-6) -> None:
    """Report §3.1 (spec §5.1): AdamW (0.9, 0.95, 1e-8), warmup over 1430 of 4000 steps to the
    peak, weight decay 0.1, clip 1.0. The report names no decay after warmup: constant."""
    c.optim.peak_lr = peak_lr
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
    c.optim.warmup_steps = 1430
    c.optim.total_steps = 4000
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0
    c.run.steps = 4000


def runlocal(
    c: ml_collections.ConfigDict,
    mixture: str,
    *,
    steps: int = 40,
    peak_lr: float = 1e-3,
    init_from: str = f"{DEMO_DIR}/export",
) -> ml_collections.ConfigDict:
    """The same stage on CPU in minutes: the demo model's architecture (experiments/pretrain/
    tiny.py) started from `init_from` (the demo export by default), the demo tokenizer and
    corpus, `mixture`'s train split and its validation split as the held-out set. Objective,
    LoRA and dropout settings of the full-size file are kept."""
    demo = load_experiment(DEMO_EXPERIMENT)
    for key, value in demo.model.items():
        if value is not None:
            c.model[key] = value
    c.model.dtype = c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    c.init_from = init_from
    c.data.mixture = c.data.eval_mixture = mixture
    c.data.tokenizer = demo.data.tokenizer
    c.data.data_dir = f"{DEMO_DIR}/data"
    c.data.seq_len, c.data.global_batch = demo.data.seq_len, 8
    c.step.microbatches = 1
    c.optim.peak_lr = peak_lr
    c.optim.warmup_steps, c.optim.total_steps = 5, steps
    c.run.steps, c.run.log_every, c.run.eval_every = steps, 10, steps // 2
    c.run.eval_batches, c.run.checkpoint_every = 2, steps // 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tpu.topology = ""
    return c


# ------------------------------------------------------------------ Code-Qwen and Math-Qwen (§7)

# Code-Qwen (spec §7.1): ~90B tokens of continued pretraining at context 8192. The report gives no
# batch; ours is pretraining's 4M tokens per step as 512 sequences of 8192, on pretraining's
# slice (experiments/pretrain/qwen_*.py): about 2 days for either size at 40% MFU.
CODE_PRETRAIN_TOKENS = 90_000_000_000
CODE_PRETRAIN_BATCH = 512
CODE_SEQ_LEN = 8192
CODE_PRETRAIN_TOPOLOGY = {"qwen_7b": "v5p-256", "qwen_14b": "v5p-512"}
MATH_SEQ_LEN = 1024  # Math-Qwen-Chat's SFT sequence (spec §7.2)
# Where the reproduction chain (`qwen-jax reproduce`) puts the demo Code-Qwen export: the start
# of experiments/code/code_qwen_*_chat.py:runlocal.
DEMO_CODE_QWEN = f"{DEMO_DIR}/code_qwen"
VARIANT_WARMUP_FRACTION = 0.03  # Code-Qwen and Code-Qwen-Chat: warmup over 3% of the steps


def warmup_steps_for(total_steps: int, fraction: float = VARIANT_WARMUP_FRACTION) -> int:
    """round(fraction x total), at least 1: Code-Qwen's "3% warmup" as a step count."""
    return max(1, round(fraction * total_steps))


def constant_after_warmup(c: ml_collections.ConfigDict, peak_lr: float, total_steps: int) -> None:
    """Spec §7.1: AdamW (0.9, 0.95, 1e-8), warmup over 3% of `total_steps` to `peak_lr`, then
    constant (no decay). Weight decay 0.1 and clip 1.0 are pretraining's (spec §4.2; the report
    names none for the variants)."""
    c.optim.peak_lr = peak_lr
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.95, 1e-8
    c.optim.warmup_steps = warmup_steps_for(total_steps)
    c.optim.total_steps = c.run.steps = total_steps
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0


def long_context(c: ml_collections.ConfigDict, seq_len: int) -> None:
    """Training at `seq_len` with the flash-attention kernel (model.attention_impl="pallas"):
    at 8192 the XLA path's [T, T] scores per head do not fit (WORKSPACE.md, Pallas vs XLA)."""
    c.data.seq_len = seq_len
    c.model.attention_impl = "pallas"


def variant_runlocal(
    c: ml_collections.ConfigDict, mixture: str, *, init_from: str, steps: int
) -> ml_collections.ConfigDict:
    """`runlocal` for the variants: the demo model from `init_from` on a demo mixture, with the
    XLA attention path (the flash kernel runs interpreted on CPU: correct, far slower)."""
    runlocal(c, mixture, steps=steps, init_from=init_from)
    c.model.attention_impl = "xla"
    return c


def config_words(arg: str | None, allowed: tuple[str, ...]) -> set[str]:
    """The comma-separated words of `--config=FILE:word,word` (e.g. "stage2,runlocal"); a word
    outside `allowed` raises ValueError naming it."""
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    unknown = sorted(words - set(allowed))
    if unknown:
        raise ValueError(f"unknown experiment argument {unknown[0]!r}; expected any of {allowed}")
    return words
