"""The RL stages' shared settings (spec §5.3), read by experiments/{ppo,grpo}/*.py.

What the report gives is set here once (`ppo_report`); what it leaves out has a stated value
with its reason beside it. `runlocal` makes the same stage run on this CPU in minutes from the
tiny models of the demo chain (commands in each experiment file's docstring).

Slices (recipes.TOPOLOGY for PPO, the chat-SFT slice of the same size). Per-device state of
PPO: policy and value each trainable with fp32 master weights and AdamW's two fp32 moments
(12 bytes/param each, sharded fsdp over the slice), reference and reward models frozen in
bf16 (2 bytes/param each), and the rollout engine's own per-layer copy of the policy weights
(4 bytes/param, refreshed in place each iteration): 32 bytes/param in all, 2.7x the SFT stage's
12. For 7B on v5p-32 (16 chips x 95 GiB): 7.7e9 x 32 B = 229 GiB, 14.3 GiB a chip, leaving room
for the rollout's KV cache (128 rows x 2048 positions x 32 layers x 16 KiB = 8 GiB a chip) and
remat activations. 1.8B on v5p-8: 15 GiB a chip; 14B on v5p-64: 14 GiB a chip. GRPO has no
value or reward model (18 bytes/param): 7B fits v5p-16 (8 chips: 16 GiB state + 17 GiB of KV
cache for 256 rows x 1024). `qwen-jax compile` checks each: every program of an iteration
(scoring, updates, the engine's prefill and decode) beside the resident models; full depth,
--fast, the whole iteration peaks at 48.9 GiB a chip (PPO 1.8B), 38.5 (PPO 7B), 31.6 (PPO 14B),
53.4 (GRPO 7B) of 95 (WORKSPACE.md).
"""

from __future__ import annotations

import ml_collections

from qwen_jax.train import recipes
from qwen_jax.train.recipes import DEMO_DIR

# The demo chain's tiny models (`runlocal` starts from them; each experiment file's docstring
# shows the two commands that train them from `make demo`'s export). init_from and
# rl.reward_model accept a training workdir directly.
DEMO_CHAT_SFT = f"{DEMO_DIR}/chat_sft"
DEMO_RM = f"{DEMO_DIR}/rm"
DEMO_MATH_SFT = f"{DEMO_DIR}/math_sft"

GRPO_TOPOLOGY = {"qwen_7b": "v5p-16"}

# PPO-ptx's coefficient is not in the report ("too large hurts reward alignment, too small
# does little"). OpenRLHF's default: the pretraining cross-entropy (per token, ~2 nats) then
# weighs about a tenth of the normalised-advantage policy loss, a regulariser, not a second task.
PTX_COEF = 0.05


def ppo_report(c: ml_collections.ConfigDict, preset: str) -> None:
    """Report §3.2.2 (spec §5.3) on a full-size preset: value-only warmup of 50 iterations,
    two responses per query, KL coefficient 0.04 (per-token k1 penalty in the reward), running
    reward normalisation, policy LR 1e-6 / value LR 5e-6, value-loss clip 0.15, top-p 0.9,
    PPO-ptx on the pretraining mixture."""
    recipes.base_model(c, preset)
    c.rl.algorithm = "ppo"
    c.rl.value_warmup_steps = 50
    c.rl.samples_per_prompt = 2
    c.rl.kl_coef, c.rl.kl_estimator, c.rl.kl_in_reward = 0.04, "k1", True
    c.rl.normalize_reward = True
    c.rl.value_lr, c.rl.value_clip = 5e-6, 0.15
    c.rl.temperature, c.rl.top_p = 1.0, 0.9
    c.rl.value_init = "reward"  # not in the report: the common choice (InstructGPT, OpenRLHF)
    # Not in the report: 64 queries x 2 = 128 responses per iteration (the SFT batch),
    # prompts and responses of up to 1024 tokens each (the SFT sequence of 2048 in all).
    c.rl.prompts_per_step = 64
    c.rl.max_prompt_len, c.rl.max_new_tokens = 1024, 1024
    c.rl.ptx_coef, c.rl.ptx_mixture = PTX_COEF, "qwen_pretrain_v1"
    c.rl.reference_dtype = "bfloat16"
    c.data.global_batch = 32  # ptx rows per iteration (x data.seq_len 2048)
    _rl_optimizer(c, peak_lr=1e-6, iterations=1000)


def _rl_optimizer(c: ml_collections.ConfigDict, *, peak_lr: float, iterations: int) -> None:
    """The policy's AdamW (the SFT stage's betas, eps, decay and clip), constant LR after a
    short warmup; one optimizer step per PPO minibatch."""
    recipes.chat_sft_optimizer(c, peak_lr=peak_lr)
    c.optim.warmup_steps = 10
    c.optim.total_steps = c.run.steps = iterations
    c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 1, 0, 50


def grpo_math(c: ml_collections.ConfigDict, preset: str) -> None:
    """GRPO with the math rule reward (beyond the report; DeepSeekMath's recipe): groups of 8
    responses per problem, advantages relative to the group, k3 KL to the reference (0.04) in
    the loss, no value or reward model."""
    recipes.base_model(c, preset)
    c.tpu.topology = GRPO_TOPOLOGY[preset]
    c.rl.algorithm = "grpo"
    c.rl.reward_fn = "math"
    c.rl.samples_per_prompt = 8
    c.rl.prompts_per_step = 32
    c.rl.max_prompt_len, c.rl.max_new_tokens = 512, 512
    c.rl.kl_coef, c.rl.kl_estimator, c.rl.kl_in_reward = 0.04, "k3", False
    c.rl.normalize_reward = False  # group-relative advantages already centre and scale
    c.rl.value_warmup_steps = 0
    c.rl.temperature, c.rl.top_p = 1.0, 1.0
    c.rl.reference_dtype = "bfloat16"
    _rl_optimizer(c, peak_lr=1e-6, iterations=500)


def runlocal(
    c: ml_collections.ConfigDict, prompts: str, *, init_from: str, reward_model: str = ""
) -> ml_collections.ConfigDict:
    """The same stage on CPU in minutes: the demo architecture (train/recipes.py runlocal) from
    the tiny `init_from` policy, prompts from `prompts`, short rollouts, 20 iterations with a
    value warmup of 5 (PPO) and a checkpoint every 10; ptx (if on) from the demo pretraining
    mixture."""
    recipes.runlocal(c, prompts, steps=20, init_from=init_from)
    c.data.eval_mixture = prompts
    c.data.seq_len, c.data.global_batch = 64, 4  # the ptx batch
    c.optim.peak_lr = 1e-4
    c.optim.warmup_steps, c.optim.schedule = 0, "constant"
    c.rl.prompts_per_step = 4
    c.rl.max_prompt_len, c.rl.max_new_tokens = 192, 32
    c.rl.value_lr = 5e-4
    if c.rl.algorithm == "ppo":
        c.rl.reward_model = reward_model
        c.rl.value_warmup_steps = 5
    if c.rl.ptx_coef:
        c.rl.ptx_mixture = "demo_pretrain_v1"
    c.run.steps, c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 20, 1, 0, 10
    return c
