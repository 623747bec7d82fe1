"""Qwen-7B math by GRPO with a rule reward (beyond the report; issue 14).

Reproduces: group-relative policy optimisation (DeepSeekMath's recipe) on a math chat model
(Math-Qwen-7B-Chat, experiments/math/, or the chat SFT model): 8 responses per problem, the
reward 1 when the response's final number equals the problem's answer (evals/extract.py, the
GSM8K checker) else 0, advantages (r - group mean) / group std, a k3 KL of 0.04 to the
reference in the loss, no value or reward model; policy LR 1e-6 (qwen_jax/rl/recipes.py).
Hardware: v5p-16 (qwen_jax.rl.recipes docstring: policy fp32 + AdamW, a bf16 reference and the
engine's weight copy, 18 bytes/param, + the rollout KV cache); mesh fsdp, full remat. Compiled at
full depth (--fast): the whole iteration peaks at 53.4 GiB per chip of 95.
Expected: exact match on held-out word problems rises over the starting model's within a few
hundred iterations; response length first shrinks, then grows.
Metric: reward_raw (the training exact-match rate), kl, entropy, response_len in
metrics.jsonl; held-out exact match with `qwen-jax eval run --benchmarks synth_math`.

Commands:
  qwen-jax compile --config=experiments/grpo/qwen_7b_math_grpo.py
  qwen-jax train --config=experiments/grpo/qwen_7b_math_grpo.py --workdir=gs://BUCKET/grpo \
      --config.init_from=gs://BUCKET/math_qwen_7b_chat/export \
      --config.data.mixture='gs://BUCKET/rl/math-*.jsonl'   # {"messages": [...], "answer": "42"}
  # CPU, from a tiny math SFT model of the demo chain (after `make demo`):
  qwen-jax train --config=experiments/sft/qwen_7b_chat.py:runlocal --workdir=runs/demo/math_sft \
      --config.data.mixture=demo_sft_math_v1 --config.data.eval_mixture=demo_sft_math_v1
  qwen-jax train --config=experiments/grpo/qwen_7b_math_grpo.py:runlocal --workdir=/tmp/grpo
Data: demo_rl_math_prompts_v1 (the demo math SFT problems, answers read from the worked
replies), or jsonl files with "messages" (or "prompt") and "answer" (qwen_jax/data/rl_tasks.py).
"""

from qwen_jax.rl import recipes
from qwen_jax.train.config import TrainConfig


def get_config(arg: str | None = None):
    c = TrainConfig.defaults()
    recipes.grpo_math(c, "qwen_7b")
    c.data.mixture = c.data.eval_mixture = "demo_rl_math_prompts_v1"
    if arg == "runlocal":
        recipes.runlocal(c, "demo_rl_math_prompts_v1", init_from=recipes.DEMO_MATH_SFT)
        c.rl.samples_per_prompt = 4
    return c
