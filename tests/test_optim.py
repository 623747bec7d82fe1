"""The learning-rate schedule (train/optim.py) against its formulas written out in numpy, for
both warmup shapes (linear; half-cosine, Code-Qwen-Chat's "cosine warmup") and both schedules
after the warmup (cosine decay; constant), and a bad warmup shape as a config-load error."""

from __future__ import annotations

import re

import numpy as np
import pytest

from qwen_jax.testing.experiments import REPO
from qwen_jax.train.config import TrainConfig, load_experiment
from qwen_jax.train.optim import OptimConfig, learning_rate

PEAK, WARMUP, TOTAL, FINAL = 2e-4, 30, 200, 0.1


def expected(step: int, shape: str, schedule: str) -> float:
    """The spec's schedule, in float64: warmup 0 -> peak, then cosine decay to FINAL * peak
    over the remaining steps, or flat."""
    s = float(step)
    if s < WARMUP:
        frac = s / WARMUP
        return PEAK * frac if shape == "linear" else PEAK * (1 - np.cos(np.pi * frac)) / 2
    if schedule == "constant":
        return PEAK
    t = min(s - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
    return PEAK * (FINAL + (1 - FINAL) * 0.5 * (1 + np.cos(np.pi * t)))


STEPS = [0, 1, 7, WARMUP // 2, WARMUP - 1, WARMUP, WARMUP + 1, 111, TOTAL - 1, TOTAL, TOTAL + 9]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_schedule_is_the_formula(shape, schedule):
    cfg = OptimConfig(
        peak_lr=PEAK,
        warmup_steps=WARMUP,
        total_steps=TOTAL,
        final_lr_fraction=FINAL,
        schedule=schedule,
        warmup_shape=shape,
    )
    lr = learning_rate(cfg)
    got = np.array([float(lr(s)) for s in STEPS])
    want = np.array([expected(s, shape, schedule) for s in STEPS])
    # The schedule computes in float32: each value within float32 rounding of the peak.
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=PEAK * np.finfo(np.float32).eps)


def test_the_two_warmups_differ_where_they_should():
    """Half-cosine starts slower, crosses the line at the middle, and ends flat at the peak."""
    lin, cos = (
        learning_rate(OptimConfig(peak_lr=PEAK, warmup_steps=WARMUP, warmup_shape=shape))
        for shape in ("linear", "cosine")
    )
    first, half, last = WARMUP // 4, WARMUP // 2, WARMUP - WARMUP // 4
    assert float(cos(first)) < float(lin(first))
    assert float(cos(half)) == pytest.approx(float(lin(half)), rel=1e-6)
    assert float(cos(last)) > float(lin(last))


def test_a_bad_warmup_shape_fails_at_config_load():
    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    c.optim.warmup_shape = "cosine"
    assert TrainConfig.from_config_dict(c).optim.warmup_shape == "cosine"
    c.optim.warmup_shape = "cosin"
    message = "config key optim.warmup_shape='cosin': expected one of ('linear', 'cosine')"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        TrainConfig.from_config_dict(c)
    # Built directly (no config load), the schedule refuses it too.
    with pytest.raises(ValueError, match="unknown warmup_shape 'cosin'"):
        learning_rate(OptimConfig(warmup_shape="cosin"))
