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
