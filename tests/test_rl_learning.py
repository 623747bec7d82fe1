"""PPO and GRPO learn on the tiny models (qwen_jax/testing/rl_models.py): PPO raises the reward
model's mean score on held-out prompts above the SFT policy's at the report's KL coefficient
while its KL to the reference stays bounded, and a run without the KL penalty ends farther from
the reference than one with a large penalty; GRPO with the math rule reward raises sampled
exact match on held-out arithmetic prompts (never RL prompts) above the math-SFT model's; an
iteration's programs compile once; bad RL settings fail before anything is loaded or compiled.

The training loop here is a few lines (rl/loop.py is the real one)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.rl.algo import build_rl
from qwen_jax.rl.config import RLConfig
from qwen_jax.rl.rewards import math_rewards
from qwen_jax.rl.scoring import sequence_logprobs, sequence_scores
from qwen_jax.sharding import make_mesh
from qwen_jax.testing import rl_models
from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.tokenizer import chatml, load_tokenizer
from qwen_jax.train.config import TrainConfig, load_experiment

PPO_ITERS = 8
PPO_LR = 3e-4
# The learning run uses the report's KL coefficient (RLConfig's default). A per-token penalty
# against normalised scores (about unit scale) makes every extra token cost KL; at 0.2 the
# policy learned SHORTER replies (held-out score -1.021 -> -1.375, measured) while the RM
# prefers longer ones. The penalty comparison runs 0 against LARGE_KL for PENALTY_ITERS.
PPO_KL_COEF = RLConfig.kl_coef
LARGE_KL = 5.0
PENALTY_ITERS = 16
# GRPO, measured on three builds of the models (the math SFT hedges half the time,
# rl_models.HEDGE): held-out exact match sampled at temperature 1 (SAMPLES draws of each of
# the 22 held-out prompts, 352 in all: binomial std about 0.02 at these rates) 0.145 -> 0.244,
# 0.145 -> 0.293 and (2026-12-02) 0.131 -> 0.233; greedy 0.364 -> 0.227, 0.364 -> 0.5 and
# 0.455 -> 0.227 (not what GRPO raises here); after 24 iterations of 8 prompts x 8 samples at
# LR 1e-3 (train reward about 0.15 -> 0.3-0.4). At LR 4e-3 the train reward collapsed
# (0.17 -> 0.05) and sampled exact match fell to 0.057. The margin is half the smallest gain
# (0.10, 2.5 std).
GRPO_ITERS = 24
GRPO_LR = 1e-3
SAMPLES = 16
EM_MARGIN = 0.05


def rl_config(demo_assets, init_from, **rl) -> TrainConfig:
    """An RL run at the tiny shape: the chat SFT experiment's runlocal config with the tiny
    architecture, constant LR, no dropout, and `rl` settings."""
    data_dir, spm = demo_assets
    c = load_experiment(rl_models.REPO / rl_models.SFT, "runlocal")
    small = load_experiment(rl_models.REPO / rl_models.TINY, "runlocal")
    for key, value in small.model.items():
        if value is not None:
            c.model[key] = value
    c.model.dropout = 0.0
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.init_from = str(init_from)
    c.optim.warmup_steps, c.optim.schedule = 0, "constant"
    c.optim.peak_lr = rl.pop("lr", 1e-3)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    for key, value in rl.items():
        c.rl[key] = value
    return TrainConfig.from_config_dict(c)


def prompt_ids(tok, record) -> list[int]:
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return chatml.build_prompt(tok, messages[:1])


def train(rl, state, records, iterations: int, rng: np.random.Generator):
    """`iterations` RL iterations on random draws of `records`; (state, metrics per iteration)."""
    history = []
    for _ in range(iterations):
        batch = [records[i] for i in rng.choice(len(records), rl.rl.prompts_per_step, False)]
        state, metrics = rl.iteration(state, [prompt_ids(rl.tokenizer, r) for r in batch], batch)
        history.append(metrics)
    return state, history


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for the module: the two PPO runs build the same update and engine
    programs (qwen_jax/testing/compile_cache.py); the second loads them."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def models(demo_assets, tmp_path_factory):
    return rl_models.session_rl_models(tmp_path_factory, demo_assets)  # once per session


def _prompt_records(demo_assets, split: str) -> list[dict]:
    path = demo_assets[0] / "prompts" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def ppo_run(demo_assets, models, iterations: int = PPO_ITERS, **changes):
    """(RL, {"before"/"after": (mean RM score, mean k1 KL per response)}, history) of a PPO run
    from the SFT policy with the RM; held-out = the demo prompts' validation split."""
    settings = dict(
        algorithm="ppo",
        reward_model=str(models["rm"]),
        prompts_per_step=8,
        samples_per_prompt=2,
        max_prompt_len=96,
        max_new_tokens=24,
        value_lr=1e-3,
        # A critic from the policy (zero head), not from the RM: the RM-initialised critic reads
        # per-prefix RM scores in the RM's raw scale (about -2.5) while the returns are the
        # running-normalised scores (about 0), and the value clip (0.15) lets it close that gap
        # by at most 0.15 an iteration; measured, its advantages drove the replies SHORTER
        # (held-out score -2.545 -> -2.68 after 8 iterations). lam=1: the advantage of a reply's
        # first token is its return minus the prompt's value, whatever the critic says later on.
        value_init="policy",
        lam=1.0,
        value_warmup_steps=2,
        kl_coef=PPO_KL_COEF,
        lr=PPO_LR,
    )
    settings.update(changes)
    config = rl_config(demo_assets, models["sft"], **settings)
    tok = load_tokenizer(config.data.tokenizer)
    mesh = make_mesh(config.mesh)
    held = [prompt_ids(tok, r) for r in _prompt_records(demo_assets, "validation")[:24]]

    rl = build_rl(config, tok, mesh)  # outside set_mesh, as the trainer builds its steps
    with jax.set_mesh(mesh):

        @jax.jit
        def score_and_kl(params, ref_state, rm_state, tokens, lengths, mask):
            policy = rl._policy_model(params)
            logp = sequence_logprobs(policy, tokens, lengths)
            ref = sequence_logprobs(rl.reference.model(ref_state), tokens, lengths)
            scores = sequence_scores(rl.reward.model(rm_state), tokens, lengths)
            return scores.mean(), ((logp - ref) * mask).sum(-1).mean()

        def evaluate(state):
            rl.rollout.refresh(state["policy"]["params"])
            ro = rl.rollout.generate(held, 4, seed=1234)
            got = score_and_kl(
                state["policy"]["params"],
                rl.reference.state,
                rl.reward.state,
                jnp.asarray(ro.tokens),
                jnp.asarray(ro.lengths),
                jnp.asarray(ro.response_mask()),
            )
            return tuple(float(x) for x in got)

        state = rl.init_state()
        out = {"before": evaluate(state)}
        records = _prompt_records(demo_assets, "train")
        state, history = train(rl, state, records, iterations, np.random.default_rng(0))
        out["after"] = evaluate(state)
    return rl, out, history


@pytest.fixture(scope="module")
def ppo_runs(demo_assets, models):
    """The same PPO run (seeds, prompts) with the KL penalty at PPO_KL_COEF for PPO_ITERS, and
    at LARGE_KL and 0 for PENALTY_ITERS."""
    return {
        "default": ppo_run(demo_assets, models),
        "large_kl": ppo_run(demo_assets, models, iterations=PENALTY_ITERS, kl_coef=LARGE_KL),
        "no_kl": ppo_run(demo_assets, models, iterations=PENALTY_ITERS, kl_coef=0.0),
    }


@pytest.mark.slow
def test_ppo_raises_the_reward_models_score_within_a_kl_bound(ppo_runs):
    _, out, history = ppo_runs["default"]
    (before, kl0), (after, kl) = out["before"], out["after"]
    print("PPO held-out RM score / KL", out, [round(h["reward_raw"], 3) for h in history])
    # The policy starts as the reference (held in bf16: rounding only, measured 0.001).
    assert abs(kl0) < 0.01, out
    assert [h["policy_updated"] for h in history[:3]] == [0.0, 0.0, 1.0]
    assert after > before + MARGIN, out
    assert kl < KL_BOUND, out
    for h in history:
        assert all(isinstance(v, float) and np.isfinite(v) for v in h.values()), h


@pytest.mark.slow
def test_the_kl_penalty_keeps_the_policy_nearer_the_reference(ppo_runs):
    _, penalised, _ = ppo_runs["large_kl"]
    _, no_kl, _ = ppo_runs["no_kl"]
    with_kl, without = penalised["after"][1], no_kl["after"][1]
    print("held-out KL after", PENALTY_ITERS, "iterations:", with_kl, "with the", LARGE_KL,
          "penalty,", without, "without")  # fmt: skip
    assert without > KL_RATIO * with_kl and without > with_kl + KL_GAP, (penalised, no_kl)


# PPO, held-out RM score and KL per response (24 validation prompts x 4 samples, fixed seed; the
# RM prefers complete replies over cut ones), measured (2026-12-02) on this build of the models
# with three prompt-order / sampling seeds, and before on three other builds (the builds differ
# from machine to machine: the CI build started at -1.22):
#   kl_coef 0.04, 8 iterations   gains +0.45, +0.36, +0.29 (KL 0.78, 1.46, 1.75); other builds
#                                +0.95 (KL 1.52), +0.54 (KL 0.99), +0.23 (CI: failed the old
#                                margin of 0.25)
#   kl_coef 0.04, 16 iterations  gains +0.38, +0.42 (KL 1.89, 3.84: the KL keeps growing)
#   kl_coef 0, 16 iterations     KL 2.46, 2.68 (gains +0.78, +0.90)
#   kl_coef 5, 16 iterations     KL 0.15, 0.17 (gains -0.10, +0.42)
# With kl_coef 1 for 8 iterations the gap was not reliable (KL 0.60 / 0.58 against 1.45 / 1.14
# without the penalty on two builds, 0.76 against 0.68 on the CI build): hence 5 and 16.
# MARGIN is about two thirds of the smallest gain seen (0.23); KL_BOUND about twice the largest
# KL at 8 iterations; the penalty must cut the KL at least KL_RATIO-fold (15-fold measured).
MARGIN = 0.15
KL_BOUND = 3.5
KL_RATIO = 3.0
KL_GAP = 0.5


def grpo_run(demo_assets, models, **changes):
    """((sampled, greedy) held-out exact match before, the same after, programs compiled after
    the first iteration, history) of a GRPO run from the math SFT model with the math rule
    reward on the train split of the arithmetic prompts."""
    settings = dict(
        algorithm="grpo",
        reward_fn="math",
        samples_per_prompt=8,
        prompts_per_step=8,
        max_prompt_len=48,
        max_new_tokens=16,
        kl_estimator="k3",
        top_p=1.0,
        value_warmup_steps=0,
        lr=GRPO_LR,
    )
    settings.update(changes)
    config = rl_config(demo_assets, models["math_sft"], **settings)
    tok = load_tokenizer(config.data.tokenizer)
    mesh = make_mesh(config.mesh)
    train_recs = rl_models.arithmetic_records("train")
    held = rl_models.arithmetic_records("heldout")
    stops = chatml.stop_ids(tok)
    compiles = _compile_counter()

    rl = build_rl(config, tok, mesh)
    with jax.set_mesh(mesh):

        def exact_match(state, samples: int) -> float:
            """Mean exact match over `samples` draws per held-out prompt at temperature 1
            (fixed seed): the policy's own probability of answering right; 1 = greedy."""
            rl.rollout.refresh(state["policy"]["params"])
            sampling = SamplingParams(temperature=1.0, seed=7) if samples > 1 else SamplingParams()
            gens = rl.rollout.engine.generate(
                [prompt_ids(tok, r) for r in held * samples],
                max_new_tokens=config.rl.max_new_tokens,
                sampling=sampling,
                stop_ids=stops,
                pad_prompts_to=config.rl.max_prompt_len,
            )
            texts = [tok.decode([t for t in g.token_ids if t not in stops]) for g in gens]
            answers = [r["answer"] for r in held * samples]
            return float(np.mean(math_rewards(texts, answers)))

        state = rl.init_state()
        before = exact_match(state, SAMPLES), exact_match(state, 1)
        rng = np.random.default_rng(0)
        state, history = train(rl, state, train_recs, 1, rng)
        after_first = len(compiles)
        state, more = train(rl, state, train_recs, GRPO_ITERS - 1, rng)
        history += more
        new_programs = compiles[after_first:]
        after = exact_match(state, SAMPLES), exact_match(state, 1)
    return before, after, new_programs, history


@pytest.mark.slow
def test_grpo_raises_heldout_exact_match_and_compiles_once(demo_assets, models):
    before, after, new_programs, history = grpo_run(demo_assets, models)
    print("GRPO held-out exact match (sampled, greedy)", before, "->", after)
    print("train reward", [round(h["reward_raw"], 3) for h in history])
    assert new_programs == []
    assert after[0] > before[0] + EM_MARGIN, (before, after)


# ---- bad input, before anything is loaded or compiled ----------------------------------------


def _fake_export(path, **changes):
    """A directory init_from reads as a params export (config only: no weights are read)."""
    from qwen_jax.checkpoint.params import CONFIG_FILE, config_to_json

    small = load_experiment(rl_models.REPO / rl_models.TINY, "runlocal")
    cfg = TrainConfig.from_config_dict(small).model_config(changes.pop("vocab", 1024))
    (path / "params").mkdir(parents=True)
    cfg = dataclasses.replace(cfg, reward_head=True, **changes)
    (path / CONFIG_FILE).write_text(config_to_json(cfg))
    return path


def _compile_counter() -> list[str]:
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *_a, **_k: compiles.append(name) if "compile" in name else None
    )
    return compiles


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"algorithm": "a2c"}, "rl.algorithm"),
        ({"algorithm": "grpo", "reward_fn": "math", "samples_per_prompt": 1}, "group"),
        ({"algorithm": "grpo", "reward_fn": "poetry"}, "rl.reward_fn"),
        ({"algorithm": "grpo", "reward_fn": "math", "kl_estimator": "k9"}, "rl.kl_estimator"),
        ({"algorithm": "ppo"}, "reward model"),
        ({"algorithm": "grpo", "reward_fn": "math", "ptx_coef": 0.1}, "ptx_mixture"),
        ({"algorithm": "ppo", "rm": {"vocab": 2048}}, "vocabulary"),
        ({"algorithm": "ppo", "rm": {"hidden_size": 128, "ffn_size": 352}}, "hidden size"),
    ],
    ids=["algorithm", "group1", "reward_fn", "kl", "no_rm", "ptx", "rm_vocab", "rm_hidden"],
)
def test_bad_rl_settings_fail_before_loading_or_compiling(demo_assets, tmp_path, changes, message):
    """init_from names no model at all: the check runs before anything is read or compiled."""
    changes = dict(changes)
    if "rm" in changes:
        changes["reward_model"] = str(_fake_export(tmp_path / "rm", **changes.pop("rm")))
    config = rl_config(demo_assets, tmp_path / "no_policy", **changes)
    tok = load_tokenizer(config.data.tokenizer)
    compiles = _compile_counter()
    with pytest.raises(ValueError, match=message) as e:
        build_rl(config, tok, make_mesh(config.mesh))
    assert "\n" not in str(e.value)
    assert compiles == []
