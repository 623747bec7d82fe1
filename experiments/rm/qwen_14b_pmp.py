"""Qwen-14B reward model, stage 1: preference model pretraining (report §3.2.1; spec §5.2).

Reproduces: PMP, the reward model's first stage: the pretrained Qwen-14B plus a scalar head read
at the `<|im_end|>` closing the assistant reply (the report's "specific end token"), trained with
the pairwise ranking loss -log sigmoid(r_chosen - r_rejected) on a large, noisy comparison set.
The report gives RM finetuning's hyperparameters only; PMP uses the same (constant LR 3e-6, batch
64 pairs, sequence 2048) for one epoch of its data: set run.steps to pairs / 64.
Hardware: the slice of qwen_jax.train.recipes.TOPOLOGY; mesh fsdp, full remat.
Expected: held-out accuracy near Table 4's PMP row on comparable data (61-77%).
Metric: held-out pairwise accuracy (eval_accuracy); Table 4's PMP row.

Commands:
  qwen-jax compile --config=experiments/rm/qwen_14b_pmp.py
  qwen-jax train --config=experiments/rm/qwen_14b_pmp.py --workdir=gs://BUCKET/qwen_14b_pmp \
      --config.init_from=gs://BUCKET/qwen_14b/export --config.data.mixture='gs://BUCKET/pmp/*.jsonl'
  qwen-jax train --config=experiments/rm/qwen_14b_pmp.py:runlocal --workdir=/tmp/pmp   # CPU
"""

from qwen_jax.train import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.base_model(c, "qwen_14b")
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
