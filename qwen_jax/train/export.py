"""`qwen-jax export`: a training checkpoint -> params-only Orbax checkpoint or HF directory.

  qwen-jax export --workdir DIR [--step N] --to DIR [--hf [--layout {qwen,qwen2}] [--dtype D]]

The model comes from the run's resolved config (workdir/config.json); the tokenizer files the run
used are copied next to the weights so the export is self-contained.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
from flax import nnx

from qwen_jax.checkpoint import CheckpointError, save_hf, save_params
from qwen_jax.checkpoint.params import config_from_json
from qwen_jax.model.factory import abstract_model
from qwen_jax.sharding import make_mesh, tree_shardings
from qwen_jax.train.checkpointing import restore_params


def run_model_config(workdir: Path):
    resolved = workdir / "config.json"
    if not resolved.exists():
        raise CheckpointError(f"{resolved} not found: {workdir} is not a training workdir")
    data = json.loads(resolved.read_text())
    return config_from_json(json.dumps(data["resolved_model"])), data


def restore_model(workdir: Path, step: int | None = None):
    """The params of a training checkpoint (newest restorable step, or `step`) as a model on all
    local devices, FSDP-sharded. Only the params are read, not the optimizer state."""
    model_cfg, run = run_model_config(workdir)
    mesh = make_mesh("fsdp")
    graphdef, params = nnx.split(abstract_model(model_cfg), nnx.Param)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        params,
        tree_shardings(params, mesh),
    )
    found = restore_params(workdir / "checkpoints", target, step=step)
    if found is None:
        raise CheckpointError(f"no restorable checkpoint in {workdir / 'checkpoints'}")
    step, params = found
    return step, nnx.merge(graphdef, params), run


def tokenizer_files(spec: str) -> list[Path]:
    """Files to ship with an export for the tokenizer spec a run used."""
    if spec == "qwen":
        from qwen_jax.tokenizer.assets import qwen_tiktoken_path

        return [qwen_tiktoken_path()]
    path = Path(spec)
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    siblings = [path.with_suffix(".vocab")] if path.suffix == ".model" else []
    return [path, *[s for s in siblings if s.exists()]]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qwen-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--hf", action="store_true", help="write an HF safetensors directory")
    p.add_argument("--layout", choices=["qwen", "qwen2"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    args = p.parse_args(argv)
    if args.to.exists():
        print(f"qwen-jax export: error: {args.to} already exists", file=sys.stderr)
        return 1
    try:
        step, model, run = restore_model(args.workdir, args.step)
        files = tokenizer_files(run["data"]["tokenizer"])
        if args.hf:
            save_hf(
                model,
                args.to,
                layout=args.layout,
                dtype=args.dtype,
                extra_files={f.name: f for f in files},
            )
        else:
            save_params(model, args.to, tokenizer_files=files)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"qwen-jax export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {args.to}")
    return 0
