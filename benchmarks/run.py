"""Side-by-side benchmark: qwen-jax vs its peers, same shape, same machine, one run.

  python -m benchmarks.run [--what train,sft,sft_lora,prefill,decode] [--steps N]
                           [--shapes a,b] [--out results.json]

Shapes come from qwen_jax/bench_shapes.py (train, sft and prefill: the bench shape; decode: every
shape in --shapes, default all of DECODE_SHAPES, at batch 1 and 8). Peers: transformers
(train, prefill, decode), TRL's SFTTrainer (+ PEFT) for sft and sft_lora.

Each side runs each workload in its own process (JAX and PyTorch each get all cores, one at a
time; the peak-RSS figures count one workload); every figure is printed as a JSON line, then one
ratio line per figure both sides report (ours / peer: tokens/s and bytes) and, when sft and
sft_lora both ran, LoRA / full of each side's tokens/s and memory figures.
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
    "sft": "benchmarks.peer_sft",
    "sft_lora": "benchmarks.peer_sft",
}
# Peers that run one of several workloads per call (--what).
MULTI = ("benchmarks.peer_infer", "benchmarks.peer_sft")
RATIO_UNITS = ("tokens/s", "bytes")


def _rows(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rows = []
    for line in out.stdout.splitlines():
        if line.startswith('{"figure"'):  # emit's rows; peers' libraries print dicts too
            rows.append(json.loads(line))
            print(line, flush=True)
    return rows


def _key(row: dict) -> tuple:
    return row["figure"], row.get("batch"), row.get("shape", "bench")


def _emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def lora_vs_full(rows: list[dict]) -> list[dict]:
    """Per impl, each sft_lora_X figure over its sft_X (tokens/s and bytes)."""
    full = {(r["figure"], r.get("impl")): r for r in rows}
    out = []
    for r in rows:
        if not r["figure"].startswith("sft_lora_") or r["unit"] not in RATIO_UNITS:
            continue
        suffix = r["figure"].removeprefix("sft_lora_")
        other = full.get((f"sft_{suffix}", r.get("impl")))
        if other and other["value"]:
            out.append(
                {
                    "figure": f"lora_vs_full_{suffix}",
                    "value": r["value"] / other["value"],
                    "unit": "sft_lora / sft",
                    "impl": r.get("impl"),
                    "method": r.get("method"),
                }
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="train,sft,sft_lora,prefill,decode")
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
        if PEERS[what] in MULTI:
            peer_cmd += ["--what", what]
        if PEERS[what] == "benchmarks.peer_infer":
            peer_cmd += shapes
        peer = {_key(r): r for r in _rows(peer_cmd)}
        rows += ours + list(peer.values())
        for r in ours:
            other = peer.get(_key(r))
            if other and r["unit"] in RATIO_UNITS and other["value"]:
                ratio = {
                    "figure": f"{r['figure']}_ratio",
                    "value": r["value"] / other["value"],
                    "unit": f"qwen-jax / {other['impl']}",
                    "batch": r.get("batch"),
                    "shape": r.get("shape", "bench"),
                }
                rows.append(_emit(ratio))
    rows += [_emit(r) for r in lora_vs_full(rows)]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
