"""Load a checkpoint (params export or HF directory) and its tokenizer into an `Engine`."""

from __future__ import annotations

import os
from pathlib import Path

from jax.sharding import Mesh

from qwen_jax.checkpoint import checkpoint_config, load_model
from qwen_jax.infer.engine import GREEDY, Engine
from qwen_jax.infer.longctx import long_context_config
from qwen_jax.infer.sampling import SamplingParams


class TokenizerMismatch(ValueError):
    """The tokenizer can produce ids the checkpoint's embedding does not have."""


def find_tokenizer(checkpoint: str | os.PathLike, spec: str | None = None):
    """The tokenizer for a checkpoint: `spec` if given (see `load_tokenizer`), else the
    `tokenizer/` folder of a params export, else tokenizer files in an HF directory, else None.
    """
    from qwen_jax.tokenizer.load import load_tokenizer

    if spec:
        return load_tokenizer(spec)
    for where in (Path(checkpoint) / "tokenizer", Path(checkpoint)):
        if where.is_dir() and any(
            (where / f).exists()
            for f in ("qwen.tiktoken", "tokenizer.json", "vocab.json", "tokenizer.model")
        ):
            return load_tokenizer(where)
    return None


def check_vocab(tokenizer, vocab_size: int, what: str = "the checkpoint") -> None:
    """Refuse a tokenizer whose ids do not all index the model's embedding."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but {what} has only "
            f"{vocab_size} embedding rows: they were not trained together (pass the matching "
            "--tokenizer)"
        )


def load_engine(
    checkpoint: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    ntk: bool | None = None,
    logn: bool | None = None,
    windows: tuple[int, ...] | None = None,
    dtype: str | None = None,
    max_context: int | None = None,
    mesh: Mesh | None = None,
    int8: bool = False,
):
    """(Engine, tokenizer or None) for a checkpoint directory.

    The long-context switches default to the checkpoint's config (None = keep); `dtype`
    overrides the compute dtype (e.g. "bfloat16"). The tokenizer is checked against the
    embedding size before any weight is read. `int8` serves weight-only int8 dense weights
    (qwen_jax.model.quantize; the config's matmul_impl picks the kernel or XLA).
    """
    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} is not a directory")
    cfg = checkpoint_config(checkpoint)
    tok = find_tokenizer(checkpoint, tokenizer)
    check_vocab(tok, cfg.vocab_size, f"checkpoint {checkpoint}")
    new_cfg = long_context_config(cfg, ntk=ntk, logn=logn, windows=windows)
    new_cfg = new_cfg.replace(dtype=dtype) if dtype else new_cfg
    fields = ("use_dynamic_ntk", "use_logn_attn", "attn_windows", "dtype")
    overrides = {f: getattr(new_cfg, f) for f in fields if getattr(new_cfg, f) != getattr(cfg, f)}
    _, model = load_model(checkpoint, mesh=mesh, **overrides)
    if int8:
        from qwen_jax.model.quantize import quantize_int8

        model = quantize_int8(model, mesh=mesh)
    return Engine(model, mesh=mesh, max_context=max_context), tok


def generate_text(
    checkpoint: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    sampling: SamplingParams = GREEDY,
    stop: tuple[str, ...] = (),
) -> str:
    """One-shot convenience: the continuation of `prompt` (greedy by default), ending at the
    tokenizer's end-of-text token, a stop string or the budget."""
    engine, tok = load_engine(checkpoint)
    if tok is None:
        raise TokenizerMismatch(f"{checkpoint} has no tokenizer files to encode a text prompt")
    (res,) = engine.generate(
        [tok.encode(prompt, allowed_special="all")],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=[tok.eod_id],
        stop_strings=stop,
        tokenizer=tok,
    )
    return res.text
