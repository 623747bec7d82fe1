"""The tiny models the RL tests start from: a chat SFT policy, a reward model and a math SFT
policy, all at tests/test_alignment_runs.py's tiny shape (experiments/pretrain/tiny.py's
runlocal architecture: d=64, 2 layers, the demo 1024-piece vocab), sequences of 64 tokens.

`tiny_rl_models(root, demo_assets)` trains, in order, from scratch unless said:
  sft       experiments/sft/qwen_7b_chat.py:runlocal (demo_sft_v1), 40 steps: most of its
            sampled replies are empty (<|im_end|> at once), the rest short gibberish
  rm        experiments/rm/qwen_7b_rm.py:runlocal from sft on `length_preferences`: a complete
            reply preferred over the same reply cut short (possibly to nothing). The RM shares
            the policy's trunk, as PPO's value model (value_init="reward") then does
  math_sft  the same SFT stage on EASY synthetic arithmetic chats (every pair, `write_arithmetic`),
            hedging (a reply with no number) half the time
and writes each as a params export (qwen_config.json + params/ + tokenizer/), the form
`init_from` and `rl.reward_model` read. The stages share one persistent XLA cache (sft and
math_sft run the same train step). `session_rl_models` builds them once per pytest session,
shared by xdist workers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
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
# Every 5th (a, b) pair, scattered over both operands ((3a + b) mod 5), is never an RL training
# prompt. The math SFT sees every pair: a 2-layer model is a lookup table that cannot add pairs
# it never saw. The SFT data answers half the time and hedges ("Let me think about it.", no
# number) the other half: what GRPO carries over to held-out prompts is answering instead of
# hedging (measured: sampled exact match 0.145 -> 0.24-0.29), not new arithmetic.
HELDOUT_EVERY = 5


def arithmetic_question(a: int, b: int, op: str) -> str:
    return f"What is {a} {op} {b}?"


def arithmetic_answer(a: int, b: int, op: str) -> int:
    return a + b if op == "+" else a - b


def arithmetic_records(split: str = "train") -> list[dict]:
    """Chat records {"messages": [user, assistant], "answer": str} for every (a, b, op) with
    a, b in 0..MAX_OPERAND, op "+" when a + b <= MAX_OPERAND and "-" when a >= b, of `split`:
    "train" (the RL prompts), "heldout" (every HELDOUT_EVERY-th pair, disjoint from train) or
    "all" (the SFT data). The reply is "The answer is N." (evals/extract.py's last number)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    out = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            held = (3 * a + b) % HELDOUT_EVERY == HELDOUT_EVERY - 1
            if split != "all" and held != (split == "heldout"):
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


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# A reply with no number (exact match 0). The math SFT data holds it for every question beside
# the real answer, as often (HEDGE_COPIES = ANSWER_COPIES), so the SFT model hedges about half
# the time: its sampled exact match sits well below what it knows (its greedy reply), and GRPO
# can raise it on held-out prompts by answering instead, a choice made on the reply's first
# token and shared by every prompt. Without the hedge replies the tiny model's greedy and
# sampled exact match were about equal (0.18, 0.15) and 32 GRPO iterations moved neither
# (measured): sharpening a stored sum does not carry over to another prompt's sum.
HEDGE = "Let me think about it."
ANSWER_COPIES, HEDGE_COPIES = 2, 2


def write_arithmetic(out: Path, seed: int = 0) -> dict[str, Path]:
    """{"sft", "train", "heldout"} jsonl files under `out`: sft holds every record
    ANSWER_COPIES times and its HEDGE reply HEDGE_COPIES times, shuffled (the SFT reads it as a
    chat task); train / heldout the RL prompt splits."""
    out.mkdir(parents=True, exist_ok=True)
    recs = arithmetic_records("all")
    hedged = [{**r, "messages": [r["messages"][0], {"role": "assistant", "content": HEDGE}]}
              for r in recs]  # fmt: skip
    sft = recs * ANSWER_COPIES + hedged * HEDGE_COPIES
    order = np.random.default_rng(seed).permutation(len(sft))
    return {
        "sft": _write_jsonl(out / "sft.jsonl", [sft[i] for i in order]),
        "train": _write_jsonl(out / "train.jsonl", arithmetic_records("train")),
        "heldout": _write_jsonl(out / "heldout.jsonl", arithmetic_records("heldout")),
    }


REPLY_WORDS = 10
RM_SEQ = 128  # the pipeline skips a pair that does not fit: 99% of these fit


def length_preferences(data_dir: Path, seed: int = 0) -> list[dict]:
    """Preference records {"prompt", "chosen", "rejected"} a 2-layer RM learns in 40 steps
    (train accuracy 1.0, margin 4.2): for each demo preference record, its chosen reply (its
    first REPLY_WORDS words, so the pair fits RM_SEQ tokens) over the same reply cut to its
    first k words, k uniform in [1, words // 3] (the data pipeline refuses an empty reply;
    replies under 3 words are left out). The tiny SFT policy's sampled replies are mostly
    empty, so PPO against this RM has a reward it can reach by sampling: reply at length."""
    rng = np.random.default_rng(seed)
    out = []
    for line in (Path(data_dir) / "preference" / "train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        words = rec["chosen"].split()[:REPLY_WORDS]
        if len(words) < 3:
            continue
        k = int(rng.integers(1, len(words) // 3 + 1))
        out.append(
            {"prompt": rec["prompt"], "chosen": " ".join(words), "rejected": " ".join(words[:k])}
        )
    return out


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
    """Train `config` in `workdir`, export its params to `export` (written under a temporary
    name and renamed: a build killed midway leaves no export a later build would trust)."""
    from qwen_jax.checkpoint import save_params
    from qwen_jax.train.export import restore_model
    from qwen_jax.train.loop import train

    partial = export.with_name(export.name + ".partial")
    for stale in (workdir, partial):
        shutil.rmtree(stale, ignore_errors=True)
    train(config, workdir)
    _, model, _ = restore_model(workdir)
    save_params(model, partial, tokenizer_files=[spm])
    partial.rename(export)
    return export


SEQ = 64  # every stage's sequence length: one train step shape for sft and math_sft


def tiny_rl_models(root: Path, demo_assets) -> dict:
    """Train (or reuse, when root already holds them) the three tiny exports under `root`:
    {"sft", "rm", "math_sft": export dirs, "tokenizer": the spm path, "math_train",
     "math_heldout": the arithmetic RL prompt jsonl files}."""
    from qwen_jax.testing.compile_cache import persistent_compile_cache

    root = Path(root)
    data_dir, spm = demo_assets
    out = {"tokenizer": Path(spm)}
    math = write_arithmetic(root / "math_data")
    out["math_train"], out["math_heldout"] = math["train"], math["heldout"]
    (root / "rm_data").mkdir(parents=True, exist_ok=True)
    rm_data = _write_jsonl(root / "rm_data" / "train.jsonl", length_preferences(data_dir))
    common = {"data.seq_len": SEQ, "run.checkpoint_every": 0}
    stages = (
        ("sft", SFT, None, {"run.steps": 40, "optim.peak_lr": 3e-3}),
        (
            "rm",
            RM,
            "sft",
            {
                "run.steps": 40,
                "optim.peak_lr": 1e-3,
                "data.seq_len": RM_SEQ,
                "data.mixture": f"preference:{rm_data}",
                "data.eval_mixture": f"preference:{rm_data}",
            },
        ),
        (
            "math_sft",
            SFT,
            None,
            {
                "run.steps": 300,
                "optim.peak_lr": 3e-3,
                # 4x runlocal's batch and no dropout: at batch 8 with dropout the model got
                # about 1 in 6 of the sums right (greedy), too little for GRPO's signal
                "data.global_batch": 32,
                "model.dropout": 0.0,
                "data.mixture": f"sft:{math['sft']}",
                "data.eval_mixture": f"sft:{math['sft']}",
            },
        ),
    )
    with persistent_compile_cache(root / "xla_cache"):
        for name, path, start, changes in stages:
            export = root / name
            if not export.exists():
                start_dir = out[start] if start else None
                config = stage_config(path, demo_assets, start_dir, **{**common, **changes})
                _train_and_export(config, root / f"{name}_run", export, Path(spm))
            out[name] = export
    return out


def _inputs_key(spm: Path) -> str:
    """What the models depend on beyond the session: this file, the stage experiments and the
    tokenizer (two xdist workers train bit-identical vocabularies; if not, they build apart)."""
    h = hashlib.sha256()
    for path in (Path(__file__), REPO / SFT, REPO / RM, REPO / TINY, Path(spm)):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def session_rl_models(tmp_path_factory, demo_assets) -> dict:
    """`tiny_rl_models` built once per pytest session (the test modules' fixtures call this):
    under xdist in the session's directory shared by the workers (the parent of each worker's
    base temp), behind a file lock, so the first worker builds and the others wait and reuse.
    QWEN_JAX_TEST_RL_MODELS=DIR keeps them across sessions (iterating on the tests locally);
    either way keyed by `_inputs_key`."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = Path(os.environ.get("QWEN_JAX_TEST_RL_MODELS") or shared / "rl_models")
    root = root / _inputs_key(demo_assets[1])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return tiny_rl_models(root, demo_assets)
