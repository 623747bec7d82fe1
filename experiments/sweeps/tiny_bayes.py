"""Bayesian search (Optuna TPE, seeded) over the tiny experiment's learning rate and warmup.

Reproduces: nothing from the report; it shows the ask/tell flow on CPU. The first batch of 4
points is TPE's random start-up; each later batch comes from the finished points' final loss
(`Sweep.suggest(results)`), 12 points in all. Needs the `sweep` extra (optuna).
Hardware: this machine's CPU; 12 steps per point (2.5-3 min each on 2 shared cores, as
tiny_lr_warmup.py measured), ~35 min for the 12 points.
Metric: final training loss (min).

Commands (after `make demo`):
  qwen-jax sweep plan experiments/sweeps/tiny_bayes.py --no-compile    # the first batch
  qwen-jax sweep launch experiments/sweeps/tiny_bayes.py --backend=local --root=runs/sweeps
  qwen-jax sweep collect experiments/sweeps/tiny_bayes.py --root=runs/sweeps --out=runs/bayes
"""

from qwen_jax.sweep.spec import Bayes, Sweep, int_uniform, log_uniform


def get_sweep() -> Sweep:
    return Sweep(
        name="tiny_bayes",
        experiment="experiments/pretrain/tiny.py:runlocal",
        space=Bayes(
            {"optim.peak_lr": log_uniform(1e-4, 3e-2), "optim.warmup_steps": int_uniform(0, 8)},
            num_points=12,
            batch=4,
            seed=0,
        ),
        fixed={
            "data.data_dir": "runs/demo/data",
            "data.tokenizer": "runs/demo/tokenizer/tokenizer.model",
            "optim.total_steps": 12,
            "run.steps": 12,
            "run.log_every": 2,
            "run.eval_every": 0,
            "run.checkpoint_every": 6,
        },
        metric="loss",
        mode="min",
        read="final",
    )
