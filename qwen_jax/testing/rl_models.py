"""The tiny models the RL tests start from: a chat SFT policy, a reward model and a math SFT
policy, all at tests/test_alignment_runs.py's tiny shape (experiments/pretrain/tiny.py's
runlocal architecture: d=64, 2 layers, the demo 1024-piece vocab).

`tiny_rl_models(root, demo_assets)` trains, in order (steps: 20, 40, 40, 300; mostly compile
time; not yet timed on a quiet machine):
  base      experiments/pretrain/tiny.py:runlocal (20 steps on the demo pretraining mixture)
  sft       experiments/sft/qwen_7b_chat.py:runlocal from base (demo_sft_v1)
  rm        experiments/rm/qwen_7b_rm.py:runlocal from sft (demo_preference_v1): the RM shares
            the policy's trunk, as PPO's value model (value_init="reward") then does
  math_sft  the same SFT stage from base on EASY synthetic arithmetic chats (`arithmetic_records`):
            greedy exact match 0.21 on the held-out pairs, 0.125 sampled at temperature 1
and writes each as a params export (qwen_config.json + params/ + tokenizer/), the form
`init_from` and `rl.reward_model` read. A test module builds them once (a module fixture).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen_jax.testing.experiments import REPO

SFT = "experiments/sft/qwen_7b_chat.py"
RM = "experiments/rm/qwen_7b_rm.py"
TINY = "experiments/pretrain/tiny.py"

# Operands and answers of the arithmetic prompts are single digits (a + b <= 9, a - b >= 0):
# the answer is one digit token, and a 2-layer model trained for a minute gets a fraction of
# them right (GRPO's signal). With two-digit sums it learns to answer "1" to everything.
MAX_OPERAND = 9
HELDOUT_EVERY = 5  # every 5th (a, b) pair (by a*10+b) is never in the SFT or RL training prompts


def arithmetic_question(a: int, b: int, op: str) -> str:
    return f"What is {a} {op} {b}?"


def arithmetic_answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def arithmetic_records(split: str = "train") -> list[dict]:
    """Chat records {"messages": [user, assistant], "answer": str} for every (a, b, op) with
    a, b in 0..MAX_OPERAND, op "+" when a + b <= MAX_OPERAND and "-" when a >= b, of `split`:
    "train" or "heldout" (every HELDOUT_EVERY-th pair, disjoint from train). The reply is
    "The answer is N." (what evals/extract.py's last-number rule reads)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            held = (a * 10 + b) % HELDOUT_EVERY == HELDOUT_EVERY - 1
            if held != (split == "heldout"):
                continue
            ops = ("+",) * (a + b <= MAX_OPERAND) + ("-",) * (a >= b)
            for op in ops:
                n = arithmetic_answer(a, b, op)
                out.append(
                    {
                        "messages": [
                            {"role": "user", "content": arithmetic_question(a, b, op)},
                            {"role": "assistant", "content": f"The answer is {n}."},
                        ],
                        "answer": str(n),
                    }
                )
    return out


def write_arithmetic(out: Path, copies: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """(train.jsonl, heldout.jsonl) under `out`; train holds `copies` shuffled copies of the
    train records (the SFT reads it as a chat task)."""
    out.mkdir(parents=True, exist_ok=True)
    train = arithmetic_records("train") * copies
    order = np.random.default_rng(seed).permutation(len(train))
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, recs in zip(paths, ([train[i] for i in order], arithmetic_records("heldout"))):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def _set(c, key: str, value) -> None:
    *path, last = key.split(".")
    for p in path:
        c = c[p]
    c[last] = value


def stage_config(path: str, demo_assets, init_from: Path | None, **changes):
    """The experiment's `:runlocal` config on the test's demo assets at the tiny shape, started
    from `init_from` (None: from scratch), with `changes` ("a.b" keys) applied."""
    from qwen_jax.train.config import TrainConfig, load_experiment

    data_dir, spm = demo_assets
    c = load_experiment(REPO / path, "runlocal")
    small = load_experiment(REPO / TINY, "runlocal")
    for key, value in small.model.items():
        if value is not None:
            c.model[key] = value
    c.data.data_dir, c.data.tokenizer = str(data_dir), str(spm)
    c.data.seq_len = 128 if path != TINY else c.data.seq_len
    c.init_from = str(init_from) if init_from is not None else ""
    c.run.log_every = 10
    c.run.eval_every = 0
    for key, value in changes.items():
        _set(c, key, value)
    return TrainConfig.from_config_dict(c)


def _train_and_export(config, workdir: Path, export: Path, spm: Path) -> Path:
    from qwen_jax.checkpoint import save_params
    from qwen_jax.train.export import restore_model
    from qwen_jax.train.loop import train

    train(config, workdir)
    _, model, _ = restore_model(workdir)
    save_params(model, export, tokenizer_files=[spm])
    return export


def tiny_rl_models(root: Path, demo_assets) -> dict:
    """Train (or reuse, when root already holds them) the four tiny exports under `root`:
    {"base", "sft", "rm", "math_sft": export dirs, "tokenizer": the spm path,
     "math_train", "math_heldout": the arithmetic jsonl files}."""
    root = Path(root)
    _, spm = demo_assets
    out = {"tokenizer": Path(spm)}
    out["math_train"], out["math_heldout"] = write_arithmetic(root / "math_data")
    stages = (
        ("base", TINY, None, {}),
        ("sft", SFT, "base", {"run.steps": 40, "optim.peak_lr": 3e-3}),
        ("rm", RM, "sft", {"run.steps": 40, "optim.peak_lr": 1e-3}),
        (
            "math_sft",
            SFT,
            "base",
            {
                "run.steps": 300,
                "optim.peak_lr": 3e-3,
                "data.mixture": f"sft:{out['math_train']}",
                "data.eval_mixture": f"sft:{out['math_train']}",
                "data.seq_len": 64,
            },
        ),
    )
    for name, path, start, changes in stages:
        export = root / name
        if not export.exists():
            start_dir = out[start] if start else None
            config = stage_config(path, demo_assets, start_dir, **changes)
            _train_and_export(config, root / f"{name}_run", export, Path(spm))
        out[name] = export
    return out
