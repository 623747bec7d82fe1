"""`qwen-jax compile` of an RL experiment compiles EVERY program an iteration runs on the slice.

A PPO experiment (all four models: policy, value, reference, reward) at tiny sizes (2 layers,
d 64, 1024 ids) and short rollouts, compiled for its declared TPU topology from this CPU (libtpu's
compile-only devices, fast level): the rollout engine's new-cache / prefill / first-token /
decode programs are in the compiled set beside the scoring and update steps, each compiles,
and the whole iteration's per-chip HBM counts the resident models plus the largest program.
"""

import pytest

from qwen_jax.testing.experiments import REPO
from qwen_jax.train.config import TrainConfig, load_experiment

PPO = "experiments/ppo/qwen_1_8b_chat_ppo.py"
ENGINE = {"rollout_new_cache", "rollout_prefill", "rollout_first_token", "rollout_decode"}


@pytest.fixture(scope="module")
def report():
    from qwen_jax.train.aot import compile_rl_for_topology

    c = load_experiment(REPO / PPO)
    # The experiment's preset and mesh at tiny sizes (a small vocabulary: the LM head's
    # compile time is not what this shows).
    for key, value in dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4,
                           head_dim=16, ffn_size=96, vocab_size=1024).items():  # fmt: skip
        c.model[key] = value
    c.rl.prompts_per_step, c.rl.samples_per_prompt = 2, 2
    c.rl.max_prompt_len, c.rl.max_new_tokens = 16, 16
    config = TrainConfig.from_config_dict(c)
    return compile_rl_for_topology(config, config.tpu.topology, fast=True)


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_every_program_of_an_iteration_compiles(report):
    assert not report.error, report.error
    assert set(report.programs) == {"experience", "policy_step", "value_step"} | ENGINE
    failed = {n: r.error for n, r in report.programs.items() if r.error}
    assert not failed, failed
    # The engine programs run on their own copy of the policy's weights, resident for the run.
    assert set(report.resident) == {
        "policy_params", "policy_opt_state", "value_params", "value_opt_state",
        "reference", "reward", "rollout_weights",
    }  # fmt: skip
    assert report.resident["rollout_weights"] == report.resident["policy_params"]
    # The decode step reads the engine's weights and the KV cache (donated: aliased).
    decode = report.programs["rollout_decode"]
    assert decode.argument_bytes > report.resident["rollout_weights"]
    assert decode.alias_bytes > 0


@pytest.mark.slow
@pytest.mark.tpu_aot
def test_whole_iteration_hbm_is_resident_plus_the_largest_program(report):
    peaks = {n: report.program_peak(n) for n in report.programs}
    assert report.iteration_peak == max(peaks.values()) > report.resident_bytes
    # Each program's peak keeps every resident tree it does not read beside its own peak.
    exp = report.programs["experience"]
    read = sum(report.resident[k] for k in ("policy_params", "reference", "value_params", "reward"))
    assert peaks["experience"] == report.resident_bytes - read + exp.peak_bytes
    assert report.fits
    assert "whole iteration:" in report.summary()
