"""Qwen-7B-Chat by DPO (beyond the report: what users now reach for before PPO).

Reproduces: direct preference optimisation (Rafailov et al.) of the chat SFT model
(experiments/sft/qwen_7b_chat.py, exported) on preference pairs: the sigmoid loss with beta 0.1
(label_smoothing > 0 for conservative DPO; objective.dpo_loss="ipo" for IPO), the reference being
a frozen copy of the starting weights run on every batch (objective.reference="model"), constant
LR 5e-7 after 10% warmup, batch 64 pairs, sequence 2048, AdamW (0.9, 0.95), dropout off.
Hardware: v5p-64 (policy + frozen reference in HBM); mesh fsdp, full remat.
Expected: implicit-reward accuracy on held-out pairs rises above 50% within the first
hundred steps; chosen and rejected log-probs both drift down, rejected faster.
Metric: held-out implicit-reward accuracy and margins (eval_reward_accuracy, eval_reward_margin).

Commands:
  qwen-jax compile --config=experiments/dpo/qwen_7b_chat_dpo.py
  qwen-jax train --config=experiments/dpo/qwen_7b_chat_dpo.py --workdir=gs://BUCKET/q7_dpo \
      --config.init_from=gs://BUCKET/qwen_7b_chat/export --config.data.mixture='pairs/*.jsonl'
  qwen-jax train --config=experiments/dpo/qwen_7b_chat_dpo.py:runlocal --workdir=/tmp/dpo
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_7b")
    c.tpu.topology = "v5p-64"
    c.objective.name = "dpo"
    c.objective.beta = 0.1
    c.data.mixture = c.data.eval_mixture = "demo_preference_v1"
    c.data.global_batch = 64
    c.optim.peak_lr = 5e-7
    c.optim.schedule = "constant"
    c.optim.total_steps = c.run.steps = 1000
    c.optim.warmup_steps = 100
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 10, 100, 200
    if arg == "runlocal":
        recipes.runlocal(c, "demo_preference_v1", peak_lr=1e-4)
        c.optim.schedule = "constant"
    return c
