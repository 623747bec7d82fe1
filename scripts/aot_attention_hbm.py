"""Per-device HBM of a Qwen-7B train step with Pallas vs XLA attention, compiled AOT for its TPU.

Compiles the experiment's full train step (forward, backward, AdamW update; the real shapes and
shardings, nothing allocated) twice for the experiment's TPU topology from this CPU host, once
with model.attention_impl="xla" and once with "pallas", and prints the compiler's per-device
memory for both (qwen_jax.train.aot.compile_for_topology). A program that does not fit fails to
compile with RESOURCE_EXHAUSTED, which is reported as such.

  JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_ACCELERATOR_TYPE=v5litepod-4 \
  TPU_WORKER_HOSTNAMES=localhost python scripts/aot_attention_hbm.py \
      [--config experiments/pretrain/qwen_7b.py] [--topology v5p-256] [--seq-len 8192] \
      [--global-batch 512] [--remat full] [--fast]

--fast compiles at XLA O0 (several times faster; memory within a few %, shared/notes/tpu_aot.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

for key, value in (
    ("JAX_PLATFORMS", "cpu"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),  # these two only silence libtpu's host probing
    ("TPU_WORKER_HOSTNAMES", "localhost"),
):
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments/pretrain/qwen_7b.py"))
    parser.add_argument("--topology", default=None, help="default: the experiment's")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=None)
    parser.add_argument("--remat", default=None, help="model.remat_policy override")
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)

    from qwen_jax.train.aot import compile_for_topology
    from qwen_jax.train.config import TrainConfig, load_experiment

    reports = {}
    for impl in ("xla", "pallas"):
        c = load_experiment(args.config)
        c.model.attention_impl = impl
        if args.seq_len:
            c.data.seq_len = args.seq_len
        if args.global_batch:
            c.data.global_batch = args.global_batch
        if args.remat:
            c.model.remat_policy = args.remat
        config = TrainConfig.from_config_dict(c)
        topology = args.topology or config.tpu.topology
        report = compile_for_topology(config, topology, fast=args.fast)
        reports[impl] = report
        m = config.model_config()
        print(
            f"== attention_impl={impl}: {config.model_preset} L={m.num_layers} "
            f"seq {config.data.seq_len} x global batch {config.data.global_batch}, "
            f"remat={m.remat_policy}, dtype={m.dtype}"
        )
        print(report.summary(), flush=True)

    xla, pallas = reports["xla"], reports["pallas"]
    print("\nper-device HBM (GiB): peak = args + out - aliased + temp")
    print(f"{'impl':8s} {'peak':>8s} {'temp':>8s} {'args':>8s} {'fits':>6s}")
    for impl, r in reports.items():
        peak = "-" if r.error else f"{r.peak_bytes / GIB:8.2f}"
        temp = "-" if r.error else f"{r.temp_bytes / GIB:8.2f}"
        print(f"{impl:8s} {peak:>8s} {temp:>8s} {r.argument_bytes / GIB:8.2f} {r.fits!s:>6s}")
    if xla.error or pallas.error:
        return 0 if not pallas.error else 1
    delta = (pallas.peak_bytes - xla.peak_bytes) / GIB
    print(f"pallas - xla: {delta:+.2f} GiB per device")
    return 0 if pallas.peak_bytes <= xla.peak_bytes else 1


if __name__ == "__main__":
    sys.exit(main())
