"""Side-by-side benchmark: qwen-jax vs the transformers peer, same shape, same machine, one run.

  python -m benchmarks.run [--what train,prefill,decode] [--steps N] [--shapes a,b]
                           [--out results.json]

Shapes come from qwen_jax/bench_shapes.py (train and prefill: the bench shape; decode: every
shape in --shapes, default all of DECODE_SHAPES, at batch 1 and 8).

Each side runs in its own process (JAX and PyTorch each get all cores, one at a time); every
figure is printed as a JSON line, then one ratio line per figure (ours / peer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = {
    "train": "benchmarks.peer_train",
    "prefill": "benchmarks.peer_infer",
    "decode": "benchmarks.peer_infer",
}


def _rows(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rows = []
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            rows.append(json.loads(line))
            print(line, flush=True)
    return rows


def _key(row: dict) -> tuple:
    return row["figure"], row.get("batch"), row.get("shape", "bench")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="train,prefill,decode")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shapes", default=None, help="decode shapes (default: all DECODE_SHAPES)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    shapes = ["--shapes", args.shapes] if args.shapes else []
    rows = []
    for what in [w.strip() for w in args.what.split(",") if w.strip()]:
        ours = _rows(
            [
                sys.executable,
                "-m",
                "qwen_jax.cli",
                "bench",
                "--what",
                what,
                "--steps",
                str(args.steps),
                *shapes,
            ]
        )
        peer_cmd = [sys.executable, "-m", PEERS[what], "--steps", str(args.steps)]
        if PEERS[what] == "benchmarks.peer_infer":
            peer_cmd += ["--what", what, *shapes]
        peer = {_key(r): r for r in _rows(peer_cmd)}
        rows += ours + list(peer.values())
        for r in ours:
            other = peer.get(_key(r))
            if other and r["unit"] == "tokens/s":
                ratio = {
                    "figure": f"{r['figure']}_ratio",
                    "value": r["value"] / other["value"],
                    "unit": "qwen-jax / transformers",
                    "batch": r.get("batch"),
                    "shape": r.get("shape", "bench"),
                }
                rows.append(ratio)
                print(json.dumps(ratio), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
