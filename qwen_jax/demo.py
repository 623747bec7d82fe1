"""`qwen-jax demo --workdir DIR`: the README's main job, the short reproduction chain on CPU.

It is `qwen-jax reproduce --out DIR --quick` (qwen_jax/reproduce.py): from the embedded corpus,
1. the base: the corpus (DIR/data), a SentencePiece BPE vocabulary (DIR/tokenizer), its unigram
   entropy (the loss a model that ignores context reaches), the tiny Qwen of
   experiments/pretrain/tiny.py trained in DIR/run and exported to DIR/export;
2. Code-Qwen (continued pretraining) -> Code-Qwen-Chat (SFT); Math-Qwen-Chat (SFT) from the base;
3. every model on the held-out benchmarks, the results table, loss plots, and what the variants
   learned: a held-out word problem Math-Qwen-Chat solved and a held-out function Code-Qwen-Chat
   wrote (asked in words) that passes its tests in the sandbox (the first such item in a fixed
   order, never a picked one), with how many of the held-out items each solved.
Finished stages are skipped, so a rerun resumes instead of redoing. The base's functions here
(corpus, vocabulary, config, export) are the chain's first stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
from collections import Counter
from pathlib import Path

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "pretrain" / "tiny.py"
VOCAB_SIZE = 2048


def unigram_entropy(mixture: str, data_dir: str, tokenizer, seq_len: int, batches: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution of the packed training targets."""
    from qwen_jax.data.pipeline import get_iterator

    it = get_iterator(
        mixture,
        split="train",
        sequence_length=seq_len,
        batch_size=16,
        seed=0,
        data_dir=data_dir,
        vocab=tokenizer,
    )
    counts: Counter[int] = Counter()
    for _ in range(batches):
        b = next(it)
        t, w = b["decoder_target_tokens"], b["decoder_loss_weights"] > 0
        counts.update(t[w].tolist())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def build_assets(wd: Path, log=print) -> tuple[Path, Path]:
    """The corpus (wd/data) and the vocabulary (wd/tokenizer), each built only when missing.
    Returns (data_dir, SentencePiece model path)."""
    from qwen_jax.data.demo_corpus import build_demo
    from qwen_jax.tokenizer import train_sentencepiece

    data_dir = wd / "data"
    if not (data_dir / "manifest.json").exists():
        manifest = build_demo(data_dir)
        log(f"corpus: {manifest['total_bytes']:,} bytes in {data_dir}")
    spm_path = wd / "tokenizer" / "tokenizer.model"
    if not spm_path.exists():
        inputs = sorted(str(f) for f in (data_dir / "pretrain").glob("*/train-*"))
        train_sentencepiece(inputs, wd / "tokenizer", VOCAB_SIZE)
        log(f"SentencePiece BPE vocab of {VOCAB_SIZE} trained: {spm_path}")
    return data_dir, spm_path


def base_config(wd: Path, *, steps: int | None = None, model: dict | None = None, seq_len=None):
    """experiments/pretrain/tiny.py on wd's corpus and vocabulary (ConfigDict). `steps`, `model`
    (field -> value) and `seq_len` shrink it (the quick chain, tests)."""
    from qwen_jax.train.config import load_experiment

    c = load_experiment(EXPERIMENT)
    c.data.data_dir = str(wd / "data")
    c.data.tokenizer = str(wd / "tokenizer" / "tokenizer.model")
    if steps:
        c.run.steps = c.optim.total_steps = steps
        c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, steps // 10))
        c.run.log_every = min(c.run.log_every, max(1, steps // 15))
        c.run.eval_every = c.run.checkpoint_every = max(1, steps // 3)
    for key, value in (model or {}).items():
        c.model[key] = value
    if seq_len:
        c.data.seq_len = c.model.seq_length = seq_len
    return c


def export_run(run_dir: Path, export: Path, spm_path: Path) -> int:
    """The run's newest checkpoint as a params export with its tokenizer (replacing `export`:
    the export follows the run). Returns the exported step."""
    from qwen_jax.checkpoint import save_params
    from qwen_jax.train.export import restore_model

    if export.exists():
        shutil.rmtree(export)
    step, model, _ = restore_model(run_dir)
    save_params(model, export, tokenizer_files=[spm_path])
    return step


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qwen-jax demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=None, help="override the base's training steps")
    args = p.parse_args(argv)
    from qwen_jax import reproduce

    settings = reproduce.QUICK
    if args.steps:
        settings = dataclasses.replace(settings, base_steps=args.steps)
    return reproduce.run_and_report(args.workdir, settings)
