"""Qwen-7B-Chat RLHF by PPO (report §3.2.2; spec §5.3).

Reproduces: PPO on the chat SFT model (experiments/sft/qwen_7b_chat.py, exported) against
the reward model (experiments/rm/*_rm.py): four models on one mesh (policy and value trainable,
reference and reward frozen in bf16), 50 value-only warmup iterations with the policy frozen,
two responses sampled per query with top-p 0.9, a per-token KL penalty of 0.04 (k1) to the
reference in the reward, rewards normalised by a running mean and variance, policy LR 1e-6 and
value LR 5e-6, value-loss clipping 0.15, and PPO-ptx gradient mixing on the pretraining mixture.
What the report leaves out (value init from the RM, clip 0.2, GAE gamma 1 / lambda 0.95, one
PPO epoch of one minibatch, ptx coefficient, batch sizes) is qwen_jax/rl/recipes.py's, with
reasons there and in WORKSPACE.md's decision log.
Hardware: v5p-32 (qwen_jax.rl.recipes docstring: 32 bytes/param over the slice, the engine's
weight copy included, + rollout KV cache); mesh fsdp over the slice, full remat. Compiled at
full depth (--fast): the whole iteration peaks at 38.5 GiB per chip of 95.
Expected: the reward model's mean score on held-out prompts rises over the SFT policy's within
a few hundred iterations while the KL to the reference stays small (the report gives no curve).
Metric: reward_raw / reward_norm, kl, entropy, clipfrac, value_loss, explained_var,
response_len and the rollout / scoring / update time split in metrics.jsonl.

Commands:
  qwen-jax compile --config=experiments/ppo/qwen_7b_chat_ppo.py   # every program + the 4 models
  qwen-jax train --config=experiments/ppo/qwen_7b_chat_ppo.py \
      --workdir=gs://BUCKET/qwen_7b_chat_ppo \
      --config.init_from=gs://BUCKET/qwen_7b_chat/export \
      --config.rl.reward_model=gs://BUCKET/qwen_7b_rm/export \
      --config.data.mixture='gs://BUCKET/rl/prompts-*.jsonl' --config.data.data_dir=gs://BUCKET/corpora
  # CPU, from the demo chain's tiny SFT and reward models (after `make demo`):
  qwen-jax train --config=experiments/sft/qwen_7b_chat.py:runlocal --workdir=runs/demo/chat_sft
  qwen-jax train --config=experiments/rm/qwen_7b_rm.py:runlocal --workdir=runs/demo/rm \
      --config.init_from=runs/demo/chat_sft
  qwen-jax train --config=experiments/ppo/qwen_7b_chat_ppo.py:runlocal --workdir=/tmp/ppo
Data: prompts from an RL prompt task (demo_rl_prompts_v1: the demo preference prompts),
any registered SFT / preference / prompt task, or jsonl files with "messages"
(qwen_jax/data/rl_tasks.py).
"""

from qwen_jax.rl import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.ppo_report(c, "qwen_7b")
    c.data.mixture = c.data.eval_mixture = "demo_rl_prompts_v1"
    if arg == "runlocal":
        recipes.runlocal(
            c, "demo_rl_prompts_v1", init_from=recipes.DEMO_CHAT_SFT, reward_model=recipes.DEMO_RM
        )
    return c
