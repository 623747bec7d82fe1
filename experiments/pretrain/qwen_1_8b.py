"""Qwen-1.8B pretraining (report Table 1; spec §1.4, §4.2).

Reproduces: Qwen-1.8B base: 2.2T tokens, context 2048 (released checkpoint extended to 8192),
AdamW (0.9, 0.95, 1e-8), peak LR 3e-4, 2000 warmup steps, cosine to 10%, weight decay 0.1,
clip 1.0, batch 4M tokens (2048 x 2048), bf16 compute with fp32 master weights.

Hardware: TPU v5e-64 (64 chips, 16 GiB each), mesh fsdp=64; full remat, and the 4M-token
batch accumulated over 4 microbatches (8 sequences per chip each) to fit 16 GiB ("dots_no_batch"
remat needs ~20 GiB here: `qwen-jax compile` says so).
Expected: ~525k steps; at 45% MFU on v5e-64 (~12.6 PFLOP/s peak) about 50 days.
Metric: held-out loss; MMLU 5-shot 44.6, C-Eval 54.7, GSM8K 21.2 (Table 2).

Commands:
  qwen-jax compile --config=experiments/pretrain/qwen_1_8b.py
  qwen-jax train --config=experiments/pretrain/qwen_1_8b.py --workdir=gs://BUCKET/qwen_1_8b \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/pretrain/qwen_1_8b.py:runlocal --workdir=/tmp/q18
"""

from qwen_jax.train.config import TrainConfig, runlocal


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    c.model.preset = "qwen_1_8b"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.mixture = c.data.eval_mixture = "qwen_pretrain_v1"
    c.data.tokenizer = "qwen"
    c.data.seq_len, c.data.global_batch = 2048, 2048
    c.step.microbatches = 4
    c.optim.peak_lr, c.optim.warmup_steps = 3e-4, 2000
    c.optim.total_steps = 2_200_000_000_000 // (2048 * 2048)
    c.run.steps = c.optim.total_steps
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 100, 5000, 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tpu.topology = "v5e-64"
    if arg == "runlocal":
        runlocal(c)
    return c
