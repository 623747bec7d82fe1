"""The experiment files of a source checkout, for tests that load or compile every one of them.

Load one with `qwen_jax.train.config.load_experiment` (the library's single loader).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # qwen_jax/testing/ -> the checkout's root
# experiments/sweeps/ holds sweep files (qwen_jax.sweep.spec: get_sweep()), not experiments.
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.parent.name != "sweeps")
