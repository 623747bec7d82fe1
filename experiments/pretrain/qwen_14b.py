"""Qwen-14B pretraining (report Table 1; spec §1.4, §4.2).

Reproduces: Qwen-14B base: 3.0T tokens, context 2048,
AdamW (0.9, 0.95, 1e-8), peak LR 3e-4, 2000 warmup steps, cosine to 10%, weight decay 0.1,
clip 1.0, batch 4M tokens (2048 x 2048), bf16 compute with fp32 master weights.

Hardware: TPU v5p-512 (256 chips, 95 GiB each), mesh fsdp=256; full remat.
Expected: ~715k steps; at 40% MFU on v5p-512 (~117 PFLOP/s peak) about 63 days.
Metric: held-out loss; MMLU 5-shot 66.3, C-Eval 72.1, GSM8K 61.3 (Table 2).

Commands:
  qwen-jax compile --config=experiments/pretrain/qwen_14b.py
  qwen-jax train --config=experiments/pretrain/qwen_14b.py --workdir=gs://BUCKET/qwen_14b \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/pretrain/qwen_14b.py:runlocal --workdir=/tmp/q14
"""

from qwen_jax.train.config import TrainConfig, runlocal


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    c.model.preset = "qwen_14b"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.mixture = c.data.eval_mixture = "qwen_pretrain_v1"
    c.data.tokenizer = "qwen"
    c.data.seq_len, c.data.global_batch = 2048, 2048
    c.optim.peak_lr, c.optim.warmup_steps = 3e-4, 2000
    c.optim.total_steps = 3_000_000_000_000 // (2048 * 2048)
    c.run.steps = c.optim.total_steps
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 100, 5000, 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tpu.topology = "v5p-512"
    if arg == "runlocal":
        runlocal(c)
    return c
