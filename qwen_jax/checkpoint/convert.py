"""`qwen-jax convert`: HF safetensors directory <-> params-only Orbax checkpoint.

  qwen-jax convert --from-hf DIR --to DIR
  qwen-jax convert --from-orbax DIR --to-hf DIR [--layout {qwen,qwen2}] [--dtype D]

Both directions validate everything first (the output can be created, the input's tensors) and
write into a temporary directory renamed at the end: a failed conversion leaves nothing behind,
and an existing output is never overwritten. The tokenizer files travel with the weights. Tensors
stored as integers, or holding NaN/inf, are converted as asked and named in a warning each.
"""

from __future__ import annotations

import argparse
import contextlib
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
    from qwen_jax.checkpoint import CheckpointError

    try:
        _convert(args)
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"qwen-jax convert: error: {e}", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> None:
    from qwen_jax.checkpoint import (
        CheckpointError,
        check_output_dir,
        load_model,
        save_hf,
        save_params,
    )
    from qwen_jax.checkpoint.hf import SafetensorsDir, detect_layout, nonfinite_tensors

    if args.from_hf:
        if args.to is None or args.to_hf or args.layout:
            raise CheckpointError("--from-hf takes --to DIR (and optionally --dtype) only")
        check_output_dir(args.to)  # before any work: exists, a file on the way, read-only
        src = SafetensorsDir(args.from_hf)
        for name in sorted(src.weight_map):
            if src.dtype(name) not in _FLOAT_DTYPES:
                _warn(f"tensor {name} is stored as {src.dtype(name)}; it is converted to float")
        overrides = {"param_dtype": args.dtype} if args.dtype else {}
        cfg, model = load_model(args.from_hf, **overrides)
        _warn_nonfinite(nonfinite_tensors(model, detect_layout(src.weight_map)))
        tok = [args.from_hf / f for f in _TOKENIZER_FILES if (args.from_hf / f).exists()]
        _warn_if_no_tokenizer(tok, args.from_hf)
        with _writing(args.to):
            save_params(model, args.to, tokenizer_files=tok)
        print(f"wrote params checkpoint {args.to} ({cfg.num_params():,} parameters)")
    else:
        if args.to_hf is None or args.to:
            raise CheckpointError("--from-orbax takes --to-hf DIR [--layout] [--dtype]")
        check_output_dir(args.to_hf)
        cfg, model = load_model(args.from_orbax)
        layout = args.layout or cfg.model_type
        _warn_nonfinite(nonfinite_tensors(model, layout))
        # A params export keeps its tokenizer in tokenizer/: it travels into the HF directory.
        tok_dir = args.from_orbax / "tokenizer"
        tok = sorted(p for p in tok_dir.iterdir() if p.is_file()) if tok_dir.is_dir() else []
        _warn_if_no_tokenizer(tok, args.from_orbax)
        with _writing(args.to_hf):
            save_hf(
                model,
                args.to_hf,
                layout=args.layout,
                dtype=args.dtype,
                extra_files={p.name: p for p in tok},
            )
        print(f"wrote HF directory {args.to_hf} (layout {layout})")


@contextlib.contextmanager
def _writing(out: Path):
    """A write that fails (a full disk, a quota) is one line naming the output; the savers
    have already removed their temporary directory."""
    from qwen_jax.checkpoint import CheckpointError

    try:
        yield
    except OSError as e:
        raise CheckpointError(f"writing {out} failed: {e.strerror or e}") from None


def _warn(message: str) -> None:
    print(f"qwen-jax convert: warning: {message}", file=sys.stderr)


def _warn_nonfinite(names: list[str]) -> None:
    for name in names:
        _warn(f"tensor {name} has NaN or infinite values (written as they are)")


def _warn_if_no_tokenizer(files: list[Path], src: Path) -> None:
    if not files:
        _warn(f"{src} has no tokenizer files: nor will the output (generate needs --tokenizer)")


# safetensors dtype names of what a model's weights may be stored as.
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_TOKENIZER_FILES = (
    "qwen.tiktoken",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
