"""`qwen-jax convert`: HF safetensors directory <-> params-only Orbax checkpoint.

  qwen-jax convert --from-hf DIR --to DIR
  qwen-jax convert --from-orbax DIR --to-hf DIR [--layout {qwen,qwen2}] [--dtype D]

Both directions validate everything first and write into a temporary directory renamed at the
end: a failed conversion leaves nothing behind, and an existing output is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-jax convert", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", type=Path, help="HF directory (config.json + safetensors)")
    src.add_argument("--from-orbax", type=Path, help="params-only Orbax checkpoint directory")
    p.add_argument("--to", type=Path, help="output params directory (with --from-hf)")
    p.add_argument("--to-hf", type=Path, help="output HF directory (with --from-orbax)")
    p.add_argument("--layout", choices=["qwen", "qwen2"], help="HF tensor names (default: model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="stored dtype")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from qwen_jax.checkpoint import CheckpointError, load_model, save_hf, save_params

    try:
        if args.from_hf:
            if args.to is None or args.to_hf or args.layout:
                raise CheckpointError("--from-hf takes --to DIR (and optionally --dtype) only")
            _exists_check(args.to)
            overrides = {"param_dtype": args.dtype} if args.dtype else {}
            cfg, model = load_model(args.from_hf, **overrides)
            tok = [args.from_hf / f for f in _TOKENIZER_FILES if (args.from_hf / f).exists()]
            save_params(model, args.to, tokenizer_files=tok)
            print(f"wrote params checkpoint {args.to} ({cfg.num_params():,} parameters)")
        else:
            if args.to_hf is None or args.to:
                raise CheckpointError("--from-orbax takes --to-hf DIR [--layout] [--dtype]")
            _exists_check(args.to_hf)
            cfg, model = load_model(args.from_orbax)
            save_hf(model, args.to_hf, layout=args.layout, dtype=args.dtype)
            print(f"wrote HF directory {args.to_hf} (layout {args.layout or cfg.model_type})")
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"qwen-jax convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def _exists_check(path: Path) -> None:
    from qwen_jax.checkpoint import CheckpointError

    if path.exists():
        raise CheckpointError(f"output directory {path} already exists; refusing to overwrite")


_TOKENIZER_FILES = (
    "qwen.tiktoken",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
