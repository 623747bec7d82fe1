"""The experiment files of a source checkout, for tests that load or compile every one of them.

Load one with `qwen_jax.train.config.load_experiment` (the library's single loader).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # qwen_jax/testing/ -> the checkout's root
EXPERIMENTS = sorted((REPO / "experiments").rglob("*.py"))
