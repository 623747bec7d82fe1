"""Qwen-72B pretraining (model card; spec §1.4, §4.2; the report gives no 72B hyperparameters).

Reproduces: Qwen-72B base: 3.0T tokens with RoPE base 1e6, the 7B recipe otherwise. The
pretraining context is not published; we train at 4096 (the 32768 of the released config is
reached by continued training at longer context, not modelled here), so XLA attention fits.
The recipe:
AdamW (0.9, 0.95, 1e-8), peak LR 3e-4, 2000 warmup steps, cosine to 10%, weight decay 0.1,
clip 1.0, batch 4M tokens (1024 x 4096), bf16 compute with fp32 master weights.

Hardware: TPU v5p-1024 (512 chips, 95 GiB each), mesh fsdp=64 x tensor=8; full remat; the
batch accumulated over 4 microbatches (without them the saved layer inputs need ~110 GiB).
Expected: ~715k steps at 4M-token batches (1024 x 4096); at 40% MFU on v5p-1024
(~235 PFLOP/s peak) about 160 days.
Metric: held-out loss; MMLU 5-shot 77.4, C-Eval 83.3, GSM8K 78.9 (README).

Commands:
  qwen-jax compile --config=experiments/pretrain/qwen_72b.py
  qwen-jax train --config=experiments/pretrain/qwen_72b.py --workdir=gs://BUCKET/qwen_72b \
      --config.data.data_dir=gs://BUCKET/corpora
  qwen-jax train --config=experiments/pretrain/qwen_72b.py:runlocal --workdir=/tmp/q72
"""

from qwen_jax.train.config import TrainConfig, runlocal


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    c.model.preset = "qwen_72b"
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.data.mixture = c.data.eval_mixture = "qwen_pretrain_v1"
    c.data.tokenizer = "qwen"
    c.data.seq_len, c.data.global_batch = 4096, 1024
    c.step.microbatches = 4
    c.optim.peak_lr, c.optim.warmup_steps = 3e-4, 2000
    c.optim.total_steps = 3_000_000_000_000 // (4096 * 1024)
    c.run.steps = c.optim.total_steps
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 100, 5000, 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 8
    c.tpu.topology = "v5p-1024"
    if arg == "runlocal":
        runlocal(c)
    return c
