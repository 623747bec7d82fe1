"""`RLConfig`: the `rl` section of TrainConfig (PPO / GRPO), and `check`, the checks of an RL
config that run before anything is built or compiled.

Defaults are the report's PPO settings (spec §5.3: two responses per query, KL coefficient 0.04,
running reward normalisation, value LR 5e-6, value-loss clipping 0.15, top-p 0.9, 50 value-only
warmup iterations; the policy LR 1e-6 is optim.peak_lr). What the report leaves out (decision
log, WORKSPACE.md): value_init "reward" (OpenRLHF and TRL start the critic from the RM),
clip_eps 0.2, gamma 1.0, lam 0.95, one PPO epoch of one minibatch (TRL / OpenRLHF defaults),
KL estimator k1 in the reward for PPO (the per-token log-ratio, as InstructGPT / TRL), ptx_coef
0 unless a run sets it with its mixture.
"""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("ppo", "grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
VALUE_INITS = ("reward", "policy")
REFERENCE_DTYPES = ("bfloat16", "float32", "int8")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    algorithm: str = ""  # "" (not an RL run) | "ppo" | "grpo"
    reward_model: str = ""  # PPO: RM export / workdir (an init_from-style source); "" for GRPO
    reward_fn: str = ""  # GRPO: "math" | "code" (rl/rewards.py RULE_REWARDS key)
    value_init: str = "reward"  # PPO: value model from the RM ("reward") or the policy ("policy")
    samples_per_prompt: int = 2  # the report's two responses per query; GRPO: group size (>= 2)
    prompts_per_step: int = 8
    max_prompt_len: int = 512
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 0.9
    kl_coef: float = 0.04
    kl_estimator: str = "k1"  # "k1" | "k2" | "k3" (rl/losses.py kl_estimate)
    kl_in_reward: bool = True  # PPO: KL as a per-token reward penalty; GRPO: KL in the loss
    normalize_reward: bool = True  # running mean / variance of raw scores
    value_lr: float = 5e-6  # the policy's LR is optim.peak_lr (1e-6 in the experiment files)
    value_clip: float = 0.15
    clip_eps: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 1
    minibatches: int = 1
    value_warmup_steps: int = 50
    ptx_coef: float = 0.0
    ptx_mixture: str = ""
    reference_dtype: str = "bfloat16"  # frozen reference / reward models


def _one_of(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"rl.{name}={value!r}: expected one of {', '.join(allowed)}")


def check(rl: RLConfig, train_config=None, tokenizer_vocab: int | None = None) -> None:
    """ValueError (one line) for an RL config that cannot run; reads only config files (the
    reward model's architecture), never weights, and compiles nothing.

    train_config: the run's TrainConfig (its model config is the policy's); tokenizer_vocab:
    the tokenizer's vocabulary size (sets the policy's embedding rows)."""
    from qwen_jax.rl.rewards import RULE_REWARDS

    _one_of("algorithm", rl.algorithm, ALGORITHMS)
    if train_config is not None and train_config.model_config(tokenizer_vocab).lora_rank:
        raise ValueError("RL trains the full policy: LoRA (model.lora_rank > 0) is not supported")
    _one_of("kl_estimator", rl.kl_estimator, KL_ESTIMATORS)
    _one_of("reference_dtype", rl.reference_dtype, REFERENCE_DTYPES)
    for name in ("samples_per_prompt", "prompts_per_step", "max_prompt_len", "max_new_tokens",
                 "ppo_epochs", "minibatches"):  # fmt: skip
        if getattr(rl, name) < 1:
            raise ValueError(f"rl.{name} must be >= 1, got {getattr(rl, name)}")
    rows = rl.prompts_per_step * rl.samples_per_prompt
    if rows % rl.minibatches:
        raise ValueError(
            f"rl.minibatches={rl.minibatches} does not divide the {rows} rollout rows "
            f"(prompts_per_step x samples_per_prompt)"
        )
    if not 0.0 < rl.top_p <= 1.0 or rl.temperature <= 0.0:
        raise ValueError("rl.top_p must be in (0, 1] and rl.temperature > 0")
    if rl.kl_coef < 0 or rl.ptx_coef < 0:
        raise ValueError("rl.kl_coef and rl.ptx_coef must be >= 0")
    if rl.ptx_coef > 0 and not rl.ptx_mixture:
        raise ValueError(
            f"rl.ptx_coef={rl.ptx_coef} needs a pretraining mixture: set rl.ptx_mixture"
        )
    if rl.algorithm == "grpo":
        if rl.samples_per_prompt < 2:
            raise ValueError(
                f"GRPO needs a group of >= 2 responses per prompt (rl.samples_per_prompt="
                f"{rl.samples_per_prompt}): group-relative advantages of one response are 0"
            )
        _one_of("reward_fn", rl.reward_fn, tuple(sorted(RULE_REWARDS)))
        return
    _one_of("value_init", rl.value_init, VALUE_INITS)
    if not rl.reward_model:
        raise ValueError("PPO needs a reward model: set rl.reward_model (an RM export or workdir)")
    if train_config is None:
        return
    from qwen_jax.train import init_from

    reward = init_from.find_source(rl.reward_model)
    policy = train_config.model_config(tokenizer_vocab)
    got = reward.model_cfg
    where = f"rl.reward_model {rl.reward_model}"
    if got.vocab_size != policy.vocab_size:
        raise ValueError(
            f"{where} has a vocabulary of {got.vocab_size} ids, the policy {policy.vocab_size}: "
            "the reward model scores the policy's tokens, so they must share a tokenizer"
        )
    if not got.reward_head:
        raise ValueError(f"{where} has no reward head (not a reward model export)")
    if rl.value_init == "reward" and got.hidden_size != policy.hidden_size:
        raise ValueError(
            f"{where} has hidden size {got.hidden_size}, the policy {policy.hidden_size}: "
            "value_init='reward' needs them equal (or set rl.value_init='policy')"
        )
