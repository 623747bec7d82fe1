"""Learning rate x warmup grid (2 x 2) over the tiny experiment's `:runlocal` form, on CPU.

Reproduces: nothing from the report; it exercises the whole sweep path locally in minutes
(plan, launch --backend=local, status, collect: table + loss curves + metric vs each field).
Hardware: this machine's CPU; each point trains 12 steps: start-up and compilation dominate
(2.5-3 min per point, 11 min for the sweep, measured on 2 cores shared with other work).
Expected: the higher learning rate wins at this length: final loss ~5.96 (lr 1e-2, warmup 1) and
~6.06 (warmup 6) against ~6.71 / ~6.75 at lr 1e-3 (2026-12-01).
Metric: final training loss (min).

Commands (the demo's data and tokenizer first: `make demo`, or `qwen-jax demo --workdir runs/demo`):
  qwen-jax sweep plan experiments/sweeps/tiny_lr_warmup.py --no-compile
  qwen-jax sweep launch experiments/sweeps/tiny_lr_warmup.py --backend=local --root=runs/sweeps
  qwen-jax sweep status experiments/sweeps/tiny_lr_warmup.py --root=runs/sweeps
  qwen-jax sweep collect experiments/sweeps/tiny_lr_warmup.py --root=runs/sweeps \
      --out=runs/sweeps/tiny_lr_warmup/report
"""

from qwen_jax.sweep.spec import Grid, Sweep


def get_sweep() -> Sweep:
    return Sweep(
        name="tiny_lr_warmup",
        experiment="experiments/pretrain/tiny.py:runlocal",
        space=Grid({"optim.peak_lr": [1e-3, 1e-2], "optim.warmup_steps": [1, 6]}),
        fixed={
            "data.data_dir": "runs/demo/data",
            "data.tokenizer": "runs/demo/tokenizer/tokenizer.model",
            "optim.total_steps": 12,
            "run.steps": 12,
            "run.log_every": 2,
            "run.eval_every": 6,
            "run.eval_batches": 2,
            "run.checkpoint_every": 6,
        },
        seeds=(0,),
        metric="loss",
        mode="min",
        read="final",
    )
