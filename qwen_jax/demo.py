"""`qwen-jax demo --workdir DIR`: the README's main job, end to end on the embedded default.

1. builds the embedded corpus (stdlib code, docstring prose, synthetic math/chat) into DIR/data;
2. trains a SentencePiece BPE vocabulary on it (DIR/tokenizer);
3. measures the corpus's unigram entropy under that vocabulary (the loss a model that ignores
   context would reach);
4. trains the tiny Qwen of experiments/pretrain/tiny.py (DIR/run; resumes if interrupted);
5. exports a params-only checkpoint with its tokenizer (DIR/export);
6. generates a sample from the export, and prints a summary.
Each stage is skipped when its output already exists, so a rerun resumes instead of redoing.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qwen-jax demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--steps", type=int, default=None, help="override the experiment's steps")
    p.add_argument("--prompt", default="def fibonacci(n):")
    args = p.parse_args(argv)
    from qwen_jax.data.demo_corpus import build_demo
    from qwen_jax.tokenizer import load_tokenizer, train_sentencepiece
    from qwen_jax.train.config import TrainConfig, load_experiment
    from qwen_jax.train.loop import train

    wd = args.workdir
    t0 = time.perf_counter()
    data_dir = wd / "data"
    if not (data_dir / "manifest.json").exists():
        manifest = build_demo(data_dir)
        print(f"[demo] corpus: {manifest['total_bytes']:,} bytes in {data_dir}")
    spm_path = wd / "tokenizer" / "tokenizer.model"
    if not spm_path.exists():
        inputs = sorted(str(f) for f in (data_dir / "pretrain").glob("*/train-*"))
        train_sentencepiece(inputs, wd / "tokenizer", VOCAB_SIZE)
        print(f"[demo] SentencePiece BPE vocab of {VOCAB_SIZE} trained: {spm_path}")
    tokenizer = load_tokenizer(str(spm_path))

    c = load_experiment(EXPERIMENT)
    c.data.data_dir = str(data_dir)
    c.data.tokenizer = str(spm_path)
    if args.steps:
        c.run.steps = c.optim.total_steps = args.steps
    config = TrainConfig.from_config_dict(c)
    entropy = unigram_entropy(
        config.data.mixture, str(data_dir), tokenizer, config.data.seq_len, batches=50
    )
    print(f"[demo] unigram entropy of the training stream: {entropy:.3f} nats/token")

    result = train(config, wd / "run")
    # The run's full log (metrics.jsonl), so a resumed demo still reports the whole curve.
    rows = [json.loads(line) for line in (wd / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    export = wd / "export"
    if export.exists():
        shutil.rmtree(export)  # the demo owns its directory; the export follows the run
    from qwen_jax.checkpoint import save_params
    from qwen_jax.train.export import restore_model

    step, model, _ = restore_model(wd / "run")
    save_params(model, export, tokenizer_files=[spm_path])
    print(f"[demo] exported step {step} to {export}")

    sample = generate_sample(export, args.prompt)
    summary = {
        "unigram_entropy": round(entropy, 4),
        "first_loss": round(losses[0]["loss"], 4) if losses else None,
        "last_loss": round(losses[-1]["loss"], 4) if losses else None,
        "last_eval_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
        "steps": result.last_step,
        "export": str(export),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"[demo] sample for {args.prompt!r}:\n{args.prompt}{sample}")
    print("[demo] summary " + json.dumps(summary))
    (wd / "summary.json").write_text(json.dumps({**summary, "sample": sample}, indent=2))
    return 0


def generate_sample(export: Path, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation of `prompt` from the exported checkpoint."""
    from qwen_jax.infer import generate_text

    return generate_text(str(export), prompt, max_new_tokens=max_new_tokens)
