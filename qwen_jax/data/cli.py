"""`qwen-jax data {build-demo,dedup,list,inspect}`.

qwen-jax data build-demo --out DIR       the embedded corpus (a few MB, seconds)
qwen-jax data dedup --input a.jsonl b.jsonl --out DIR [--threshold 0.8]
qwen-jax data list                       registered Tasks and Mixtures
qwen-jax data inspect demo_pretrain_v1 --data-dir DIR --vocab DIR/spm   packed rows, stats
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qwen_jax.cli import UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-jax data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-demo", help="write the embedded demo corpus")
    b.add_argument("--out", required=True, help="a new or empty directory, or an earlier build")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty directory anyway"
    )
    d = sub.add_parser("dedup", help="MinHash+LSH near-duplicate removal")
    d.add_argument("--input", nargs="+", required=True, help="jsonl or text files")
    d.add_argument("--out", required=True)
    d.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity")
    d.add_argument("--num-perm", type=int, default=128)
    d.add_argument("--ngram", type=int, default=5)
    d.add_argument("--text-key", default="text")
    sub.add_parser("list", help="registered Tasks and Mixtures")
    i = sub.add_parser("inspect", help="decode a few packed rows of a Task/Mixture")
    i.add_argument("name")
    i.add_argument("--split", default="train")
    i.add_argument("--data-dir", default=None)
    i.add_argument("--vocab", default=None, help="tokenizer spec (default: the Tasks' own)")
    i.add_argument("--sequence-length", type=int, default=256)
    i.add_argument("--batch-size", type=int, default=2)
    i.add_argument("--batches", type=int, default=1)
    i.add_argument("--seed", type=int, default=0)
    return p


def _check_demo_out(out: Path, overwrite: bool) -> None:
    """build-demo writes into a new or empty directory, or over its own earlier output (its
    manifest.json is the marker); never over a user's files unless told to."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    if overwrite or not out.exists() or not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if not (isinstance(manifest, dict) and {"version", "files", "total_bytes"} <= set(manifest)):
        raise UsageError(
            f"--out {out} is a non-empty directory that is not an earlier build-demo output; "
            "choose a new directory or pass --overwrite"
        )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "build-demo":
        from qwen_jax.data.demo_corpus import build_demo

        _check_demo_out(Path(args.out), args.overwrite)
        t0 = time.perf_counter()
        manifest = build_demo(args.out, seed=args.seed)
        print(
            json.dumps(
                {
                    "out": args.out,
                    "files": len(manifest["files"]),
                    "total_bytes": manifest["total_bytes"],
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        )
        return 0
    if args.cmd == "dedup":
        from qwen_jax.data.dedup import dedup_files

        report = dedup_files(
            args.input,
            args.out,
            text_key=args.text_key,
            threshold=args.threshold,
            num_perm=args.num_perm,
            ngram=args.ngram,
        )
        print(json.dumps({k: v for k, v in report.items() if k != "examples"}))
        return 0
    from qwen_jax.data import pipeline

    if args.cmd == "list":
        import seqio

        from qwen_jax.data.tasks import task_kind

        for name in pipeline.registered_names():
            tasks, rates = pipeline.resolve(name)
            if name in seqio.MixtureRegistry.names():
                parts = ", ".join(f"{t.name}={r:.3f}" for t, r in zip(tasks, rates))
                print(f"mixture  {name}: {parts}")
            else:
                print(f"task     {name} ({task_kind(tasks[0])}): {tasks[0].source.patterns}")
        return 0
    it = pipeline.get_iterator(
        args.name,
        split=args.split,
        sequence_length=args.sequence_length,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        vocab=args.vocab,
    )
    tok = it.tokenizer
    for _ in range(args.batches):
        batch = next(it)
        for row in range(args.batch_size):
            print(f"--- row {row}")
            if "decoder_segment_ids" not in batch:
                print(
                    {
                        k: (v[row].tolist() if hasattr(v[row], "tolist") else v[row])
                        for k, v in batch.items()
                    }
                )
                continue
            seg = batch["decoder_segment_ids"][row]
            for s in sorted(set(seg.tolist()) - {0}):
                ids = batch["decoder_target_tokens"][row][seg == s]
                w = batch["decoder_loss_weights"][row][seg == s]
                print(f"[segment {s}: {len(ids)} tokens, {int(w.sum())} learned]")
                print(tok.decode(ids.tolist()))
    print(json.dumps(it.stats(), indent=1))
    return 0
