"""PPO and GRPO runs through the RL loop (qwen_jax/rl/loop.py) from the tiny SFT / reward /
math-SFT models (qwen_jax/testing/rl_models.py): a PPO run killed at a random iteration resumes
with the uninterrupted run's metrics, a GRPO run stops on a NaN reward naming the iteration with
its last good checkpoint intact, bad input is one line (exit 2) before anything is built, the
prompt stream resumes exactly, and the experiment files compile for their slices."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from qwen_jax.testing.compile_cache import persistent_compile_cache
from qwen_jax.testing.experiments import REPO
from qwen_jax.testing.rl_models import session_rl_models
from qwen_jax.train.config import TrainConfig, load_experiment

PPO = "experiments/ppo/qwen_7b_chat_ppo.py"
GRPO = "experiments/grpo/qwen_7b_math_grpo.py"
TINY = "experiments/pretrain/tiny.py"
# A guard against a hang, not a speed check (as tests/test_trainer.py's).
HANG_S = 900
ITERATIONS = 5


@pytest.fixture(scope="module", autouse=True)
def compile_cache(xla_cache_dir):
    """A persistent XLA cache (qwen_jax/testing/compile_cache.py): every run of the module
    (uninterrupted, killed subprocess, resumed) builds the same programs; only the first
    compiles them."""
    with persistent_compile_cache(xla_cache_dir) as env:
        yield env


@pytest.fixture(scope="module")
def models(demo_assets, tmp_path_factory):
    return session_rl_models(tmp_path_factory, demo_assets)  # built once per session


def changes(path: str, models, assets, **extra) -> dict:
    """The overrides ("a.b" -> value) that put an experiment's :runlocal form on the tiny test
    models: their architecture, the test's demo assets, short rollouts."""
    data_dir, spm = assets
    small = load_experiment(REPO / TINY, "runlocal")
    out = {f"model.{k}": v for k, v in small.model.items() if v is not None}
    out.update({"data.data_dir": str(data_dir), "data.tokenizer": str(spm)})
    out.update({"rl.prompts_per_step": 2, "rl.max_new_tokens": 8, "rl.max_prompt_len": 96})
    out.update({"run.steps": ITERATIONS, "run.log_every": 1, "run.checkpoint_every": 2})
    if path == PPO:
        out.update({"init_from": str(models["sft"]), "rl.reward_model": str(models["rm"])})
        out["rl.value_warmup_steps"] = 2  # iterations 1-2 value-only, then PPO proper
    else:
        out.update(
            {"init_from": str(models["math_sft"]), "data.mixture": str(models["math_train"])}
        )
        out["rl.max_prompt_len"] = 48
    out.update(extra)
    return out


def config(path: str, overrides: dict) -> TrainConfig:
    c = load_experiment(REPO / path, "runlocal")
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[last] = value
    return TrainConfig.from_config_dict(c)


def cli_args(path: str, workdir, overrides: dict) -> list[str]:
    return [f"--config={path}:runlocal", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def metric_rows(workdir: Path) -> dict[int, dict]:
    """The last row per iteration of metrics.jsonl, timings dropped (they are wall clock)."""
    path = workdir / "metrics.jsonl"
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out[row["step"]] = {k: v for k, v in row.items() if not k.startswith("time_")}
    return out


def committed_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


@pytest.fixture(scope="module")
def ppo_uninterrupted(models, demo_assets, tmp_path_factory):
    from qwen_jax.rl.loop import train_rl

    workdir = tmp_path_factory.mktemp("ppo_uninterrupted")
    result = train_rl(config(PPO, changes(PPO, models, demo_assets)), workdir)
    rows = metric_rows(workdir)
    assert sorted(rows) == list(range(1, ITERATIONS + 1))
    assert result.last_step == ITERATIONS and committed_steps(workdir)[-1] == ITERATIONS
    return rows


@pytest.mark.slow
def test_ppo_run_logs_the_report_metrics(ppo_uninterrupted):
    rows = ppo_uninterrupted
    for name in ("reward_raw", "reward_norm", "kl", "entropy", "clipfrac", "value_loss",
                 "explained_var", "response_len", "data_crc32"):  # fmt: skip
        assert all(np.isfinite(r[name]) for r in rows.values()), name
    # Value-only warmup (rl.value_warmup_steps=2): the policy moves from iteration 3 on.
    assert [rows[i]["policy_updated"] for i in range(1, ITERATIONS + 1)] == [0, 0, 1, 1, 1]
    # A fresh batch of prompts every iteration.
    assert len({r["data_crc32"] for r in rows.values()}) == ITERATIONS


@pytest.mark.slow
def test_ppo_sigkill_then_resume_repeats_the_metrics(
    models, demo_assets, ppo_uninterrupted, compile_cache, tmp_path
):
    from qwen_jax.rl.loop import train_rl

    overrides = changes(PPO, models, demo_assets)
    kill_at = random.Random(os.getpid()).randint(2, ITERATIONS - 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_jax.cli", "train", *cli_args(PPO, tmp_path, overrides)],
        cwd=REPO,
        env={**os.environ, **compile_cache},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    end = time.time() + HANG_S
    # Kill once iteration `kill_at` is logged AND a checkpoint is committed (Orbax renames the
    # temporary step directory on commit), or the resume would test nothing.
    while not (max(metric_rows(tmp_path), default=0) >= kill_at and committed_steps(tmp_path)):
        if proc.poll() is not None:
            raise AssertionError(f"the run exited early:\n{proc.stdout.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"no iteration {kill_at} within {HANG_S} s")
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = metric_rows(tmp_path)
    assert max(killed) < ITERATIONS, "the run finished before it was killed"

    result = train_rl(config(PPO, overrides), tmp_path)
    resumed_from = result.history[0]["step"] - 1
    assert 0 < resumed_from <= max(killed) and resumed_from in committed_steps(tmp_path)
    rows = metric_rows(tmp_path)
    assert sorted(rows) == list(range(1, ITERATIONS + 1))
    for step in range(1, ITERATIONS + 1):
        # The same prompts, samples, rewards and losses after the kill as without it.
        assert rows[step] == ppo_uninterrupted[step], step


@pytest.mark.slow
def test_grpo_nan_reward_stops_naming_the_iteration(models, demo_assets, tmp_path, monkeypatch):
    from qwen_jax.rl import algo, loop, rewards
    from qwen_jax.rl.algo import RLNumericsError
    from qwen_jax.rl.rollout import Rollouts
    from qwen_jax.train.checkpointing import TrainCheckpointer

    real_rewards, real_build, calls, built = rewards.rule_rewards, algo.build_rl, [], []
    real_responses = Rollouts.responses

    def poisoned(name, responses, records):
        calls.append(responses)
        out = real_rewards(name, responses, records)
        return [float("nan")] * len(out) if len(calls) == 3 else out

    def with_unknown_id(self):
        # An id past the tokenizer (a padded embedding row: the tiny model's vocabulary is
        # the tokenizer's, so add one): scored as text with a marker, not a crash.
        out = real_responses(self)
        out[0] = out[0] + [built[0].tokenizer.vocab_size + 3]
        return out

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(rewards, "rule_rewards", poisoned)
    monkeypatch.setattr(algo, "build_rl", build)
    monkeypatch.setattr(Rollouts, "responses", with_unknown_id)
    cfg = config(GRPO, changes(GRPO, models, demo_assets, **{"run.checkpoint_every": 1}))
    with pytest.raises(RLNumericsError, match=r"stopped at iteration 3 \(.*reward_raw is nan.*"
                       r"last checkpoint is iteration 2") as err:  # fmt: skip
        loop.train_rl(cfg, tmp_path)
    assert len(str(err.value).splitlines()) == 1
    unk = f"<unk:{built[0].tokenizer.vocab_size + 3}>"
    assert all(texts[0].endswith(unk) for texts in calls), calls[0][0]
    rows = metric_rows(tmp_path)
    assert sorted(rows) == [1, 2]
    for row in rows.values():  # GRPO's reward: the exact-match rate of the group's samples
        assert 0.0 <= row["reward_raw"] <= 1.0 and np.isfinite(row["kl"])
    assert committed_steps(tmp_path) == [1, 2]  # nothing saved for the failed iteration 3
    # The last good checkpoint restores whole, into the run's abstract state.
    ckpt = TrainCheckpointer(tmp_path / "checkpoints", keep=3, async_save=False)
    try:
        step, state, data = ckpt.restore_latest(built[0].abstract_state())
    finally:
        ckpt.close()
    assert step == 2 and int(state["iteration"]) == 2 and data["prompts"]["batches"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["policy"]))


def _rm_with_other_vocab(models, root: Path) -> Path:
    out = root / "rm_other_vocab"
    shutil.copytree(models["rm"], out)
    cfg_file = out / "qwen_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["vocab_size"] += 128
    cfg_file.write_text(json.dumps(cfg))
    return out


def test_bad_input_is_one_line_before_anything_is_built(
    models, demo_assets, tmp_path, monkeypatch, capsys
):
    from qwen_jax import cli
    from qwen_jax.rl import algo

    def never(*a, **k):
        raise AssertionError("build_rl reached: the check came too late")

    monkeypatch.setattr(algo, "build_rl", never)
    cases = {
        "ptx_coef=0.1 needs a pretraining mixture": (
            PPO,
            {"rl.ptx_coef": 0.1, "rl.ptx_mixture": ""},
        ),
        "GRPO needs a group of >= 2": (GRPO, {"rl.samples_per_prompt": 1}),
        "vocabulary of 1152 ids, the policy 1024": (
            PPO,
            {"rl.reward_model": str(_rm_with_other_vocab(models, tmp_path))},
        ),
        "more than rl.max_prompt_len=16": (PPO, {"rl.max_prompt_len": 16}),
    }
    for i, (message, (path, extra)) in enumerate(cases.items()):
        workdir = tmp_path / f"run{i}"
        overrides = changes(path, models, demo_assets, **extra)
        code = cli.main(["train", *cli_args(path, workdir, overrides)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (message, err)
        assert len(err) == 1 and err[0].startswith("qwen-jax train: error: "), err
        assert message in err[0], err[0]
        assert not (workdir / "checkpoints").exists(), message


def test_prompt_stream_resumes_exactly_and_keeps_answers(models, demo_assets):
    from qwen_jax.rl.prompts import PromptStream
    from qwen_jax.tokenizer import load_tokenizer

    cfg = config(GRPO, changes(GRPO, models, demo_assets))
    tok = load_tokenizer(cfg.data.tokenizer)
    a = PromptStream(cfg, tok)
    first = [a.next() for _ in range(2)]
    state = json.loads(json.dumps(a.get_state()))  # what the checkpoint stores
    after = [a.next() for _ in range(3)]
    b = PromptStream(cfg, tok)
    b.set_state(state)
    again = [b.next() for _ in range(3)]
    assert [x.prompts for x in after] == [x.prompts for x in again]
    assert [x.records for x in after] == [x.records for x in again]
    assert first[0].prompts != first[1].prompts
    header = tok.encode("assistant", allowed_special=set())
    for batch in first:
        for ids, record in zip(batch.prompts, batch.records):
            assert ids[-1 - len(header) - 1] == tok.im_start_id  # ... <|im_start|>assistant\n
            text = tok.decode(ids)
            a_, op, b_ = text.split("What is ")[1].split("?")[0].split()
            want = int(a_) + int(b_) if op == "+" else int(a_) - int(b_)
            assert record == {"answer": str(want)}
    a.close()
    b.close()


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.parametrize("path", [PPO, GRPO], ids=lambda p: Path(p).stem)
def test_experiment_compiles_for_its_slice(path):
    from qwen_jax.train.aot import compile_rl_for_topology

    c = load_experiment(REPO / path)
    c.model.num_layers = 2
    cfg = TrainConfig.from_config_dict(c)
    report = compile_rl_for_topology(cfg, cfg.tpu.topology, fast=True)
    assert not report.error, report.error
    assert report.fits, report.summary()
    want = {"policy_params", "policy_opt_state", "reference", "rollout_weights"}
    want |= {"value_params", "value_opt_state", "reward"} if path == PPO else set()
    assert set(report.resident) == want
    engine = {"rollout_prefill", "rollout_decode"}
    assert {"experience", "policy_step"} | engine <= set(report.programs)
