"""Load a checkpoint (params export or HF directory) and its tokenizer into an `Engine`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jax.sharding import Mesh

from qwen_jax.checkpoint import checkpoint_config, load_model
from qwen_jax.infer.engine import GREEDY, Engine
from qwen_jax.infer.longctx import long_context_config
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model.config import QwenConfig


class TokenizerMismatch(ValueError):
    """The tokenizer and the checkpoint's embedding do not belong together."""


def is_training_workdir(path: str | os.PathLike) -> bool:
    """Whether `path` is a `qwen-jax train` workdir (its config.json is the run's resolved
    config, with `resolved_model`), not an export. A gs:// workdir is read through epath."""
    from qwen_jax.train.checkpointing import workdir_path

    try:
        cfg = workdir_path(path) / "config.json"
        return cfg.is_file() and "resolved_model" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def model_config(checkpoint: str | os.PathLike) -> QwenConfig:
    """The architecture of a params export, an HF directory or a training workdir, read
    without loading weights."""
    if is_training_workdir(checkpoint):
        from qwen_jax.train.export import run_model_config

        return run_model_config(checkpoint)[0]
    return checkpoint_config(checkpoint)


def find_tokenizer(checkpoint: str | os.PathLike, spec: str | None = None):
    """The tokenizer for a checkpoint: `spec` if given (see `load_tokenizer`), else the
    `tokenizer/` folder of a params export, else tokenizer files in an HF directory, else the
    run's `data.tokenizer` for a training workdir, else None.
    """
    from qwen_jax.tokenizer.load import load_tokenizer

    if spec:
        return load_tokenizer(spec)
    for where in (Path(checkpoint) / "tokenizer", Path(checkpoint)):
        if where.is_dir() and (
            any(
                (where / f).exists()
                for f in ("qwen.tiktoken", "tokenizer.json", "vocab.json", "tokenizer.model")
            )
            or any(where.glob("*.model"))  # a run's SentencePiece model keeps its own name
        ):
            return load_tokenizer(where)
    if is_training_workdir(checkpoint):
        from qwen_jax.train.export import run_model_config

        run_spec = run_model_config(checkpoint)[1]["data"]["tokenizer"]
        if run_spec != "qwen" and not Path(run_spec).expanduser().exists():
            raise FileNotFoundError(
                f"the run's tokenizer {run_spec!r} (data.tokenizer in {checkpoint}/config.json) "
                "is not found from here: pass --tokenizer"
            )
        return load_tokenizer(run_spec)
    return None


def max_embedding_rows(tokenizer_ids: int) -> int:
    """The most embedding rows a checkpoint may have for a tokenizer of `tokenizer_ids` ids.

    Embeddings are padded past the tokenizer for fast matmuls, and the padding rows are never
    trained. The rule: up to the next multiple of 128 (our tiny models; Qwen v1's 151,851 ids
    on 151,936 rows) or up to 1% more rows than ids (Qwen2/2.5/3's 151,646-151,669 ids on
    151,936 or 152,064 rows: 0.2-0.3%), whichever is larger. More rows than that means the
    model was trained with another, larger tokenizer (a 1,024-piece SentencePiece vocab on a
    151,936-row checkpoint): it would generate ids this tokenizer cannot decode.
    """
    return max(-(-tokenizer_ids // 128) * 128, tokenizer_ids + tokenizer_ids // 100)


def check_vocab(
    tokenizer, vocab_size: int, what: str = "the checkpoint", *, allow_mismatch: bool = False
) -> None:
    """Refuse a tokenizer that does not belong to an embedding of `vocab_size` rows.

    Always refused: a tokenizer with more ids than rows (its ids would index nothing). Refused
    unless `allow_mismatch`: more rows than `max_embedding_rows` allows for the tokenizer (the
    model then generates ids the tokenizer has no text for; with `allow_mismatch` they are
    shown as `<unk:ID>` markers, see tokenizer.base.StreamDetokenizer).
    """
    if tokenizer is None:
        return
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerMismatch(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but {what} has only "
            f"{vocab_size} embedding rows: they were not trained together (pass the matching "
            "--tokenizer)"
        )
    limit = max_embedding_rows(tokenizer.vocab_size)
    if vocab_size > limit and not allow_mismatch:
        raise TokenizerMismatch(
            f"{what} has {vocab_size} embedding rows but tokenizer {tokenizer.name} has only "
            f"{tokenizer.vocab_size} ids (padding allows at most {limit} rows): the model would "
            "generate ids this tokenizer cannot decode; pass the matching --tokenizer, or "
            "--allow-vocab-mismatch to show such ids as <unk:ID>"
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
    allow_vocab_mismatch: bool = False,
):
    """(Engine, tokenizer or None) for a checkpoint directory.

    `checkpoint` is a params export, an HF directory or a training workdir (its newest step
    whose params restore, with the run's tokenizer). The long-context switches default to the
    checkpoint's config (None = keep); `dtype` overrides the compute dtype (e.g. "bfloat16").
    The tokenizer is checked against the embedding size before any weight is read
    (`check_vocab`; `allow_vocab_mismatch` relaxes the too-many-rows direction). `int8` serves
    weight-only int8 dense weights (qwen_jax.model.quantize; the config's matmul_impl picks the
    kernel or XLA).
    """
    from qwen_jax.train.checkpointing import workdir_path

    if not workdir_path(checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} is not a directory")
    workdir = is_training_workdir(checkpoint)
    cfg = model_config(checkpoint)
    tok = find_tokenizer(checkpoint, tokenizer)
    check_vocab(
        tok, cfg.vocab_size, f"checkpoint {checkpoint}", allow_mismatch=allow_vocab_mismatch
    )
    new_cfg = long_context_config(cfg, ntk=ntk, logn=logn, windows=windows)
    new_cfg = new_cfg.replace(dtype=dtype) if dtype else new_cfg
    fields = ("use_dynamic_ntk", "use_logn_attn", "attn_windows", "dtype")
    overrides = {f: getattr(new_cfg, f) for f in fields if getattr(new_cfg, f) != getattr(cfg, f)}
    if workdir:
        from qwen_jax.train.export import restore_model

        _, model, _ = restore_model(checkpoint, mesh=mesh, **overrides)
    else:
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
