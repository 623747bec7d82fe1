"""Reinforcement learning from feedback: PPO (the report's RLHF stage) and GRPO with rule rewards.

  losses.py      pure jnp: KL estimators, masked statistics, GAE, the clipped policy / value
                 losses, explained variance, GRPO group advantages
  normalizer.py  RunningMoments: running mean / variance of raw rewards (a pytree in the state)
  rewards.py     host-side rule rewards: math answers (the GSM8K / MATH checkers), code in the
                 sandbox
  rollout.py     RolloutEngine over the inference engine (weights refreshed in place)
  scoring.py     differentiable per-token log-probs, values and reward-model scores
  algo.py        build_rl -> RL: one iteration (rollout, scoring, update)
  loop.py        the RL training loop (checkpoints, resume, metrics)

Nothing is imported here: `import qwen_jax.rl.losses` pulls only what that module needs.
"""
