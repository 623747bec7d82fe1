"""Qwen-7B reward model, stage 2: RM finetuning (report §3.2.1; spec §5.2).

Reproduces: RM finetuning from the PMP model (experiments/rm/qwen_7b_pmp.py, exported) on the
higher-quality human comparisons: constant LR 3e-6, batch 64 pairs, sequence 2048, one epoch
(set run.steps to pairs / 64), pairwise ranking loss on the scalar reward read at the reply's
`<|im_end|>`. Export with `qwen-jax export --reward-model` for transformers'
Qwen2ForSequenceClassification; score pairs with `qwen-jax rm score`.
Hardware: the slice of qwen_jax.train.recipes.TOPOLOGY; mesh fsdp, full remat.
Expected: held-out accuracy near Table 4's RM row on comparable data (60-75%).
Metric: held-out pairwise accuracy (eval_accuracy); Table 4's RM row.

Commands:
  qwen-jax compile --config=experiments/rm/qwen_7b_rm.py
  qwen-jax train --config=experiments/rm/qwen_7b_rm.py --workdir=gs://BUCKET/qwen_7b_rm \
      --config.init_from=gs://BUCKET/qwen_7b_pmp/export \
      --config.data.mixture='gs://BUCKET/rm/train-*.jsonl' \
      --config.data.eval_mixture=gs://BUCKET/rm/validation.jsonl
  qwen-jax train --config=experiments/rm/qwen_7b_rm.py:runlocal --workdir=/tmp/rm   # CPU
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_7b")
    c.model.reward_head = True
    c.objective.name = "reward"
    c.data.mixture = c.data.eval_mixture = "demo_preference_v1"
    c.data.global_batch = 64
    c.optim.peak_lr = 3e-6
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.total_steps = c.run.steps = 1000
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 10, 100, 200
    if arg == "runlocal":
        recipes.runlocal(c, "demo_preference_v1", peak_lr=1e-3)
        c.optim.schedule = "constant"
    return c
