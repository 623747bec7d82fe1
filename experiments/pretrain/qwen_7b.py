"""Qwen-7B pretraining (report §2.3 / Table 1; spec §4.2).

Reproduces: Qwen-7B base, 2.4T tokens at context 2048 then extended to 8192 (the released
checkpoint), AdamW (0.9, 0.95, 1e-8), peak LR 3e-4 with 2000 warmup steps and cosine decay to
10%, weight decay 0.1, clip 1.0, batch 4M tokens (2048 x 2048), bf16 compute, fp32 master weights.

Hardware: TPU v5p-256 (128 chips), mesh fsdp=128 (ZeRO-3); full remat of each block.
Expected: ~580k steps for 2.4T tokens; at 40% MFU on v5p-256 (~58.8 PFLOP/s peak) about 54 days.
Metric: training loss; held-out loss on the validation mixture; MMLU 5-shot 58.2 (Table 2).

Commands:
  qwen-jax compile --config=experiments/pretrain/qwen_7b.py            # HBM/FLOPs on v5p-256
  qwen-jax train --config=experiments/pretrain/qwen_7b.py --workdir=gs://BUCKET/qwen_7b \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/pretrain/qwen_7b.py:runlocal --workdir=/tmp/q7  # CPU smoke
"""

from qwen_jax.train.config import TrainConfig, runlocal


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    c.model.preset = "qwen_7b"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.mixture = "qwen_pretrain_v1"
    c.data.eval_mixture = "qwen_pretrain_v1"
    c.data.tokenizer = "qwen"
    c.data.seq_len = 2048
    c.data.global_batch = 2048  # 4M tokens
    c.optim.peak_lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.total_steps = 2_400_000_000_000 // (2048 * 2048)
    c.run.steps = c.optim.total_steps
    c.run.log_every = 100
    c.run.eval_every = 5000
    c.run.checkpoint_every = 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.tpu.topology = "v5p-256"
    if arg == "runlocal":
        runlocal(c)
    return c
