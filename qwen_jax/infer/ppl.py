"""`qwen-jax eval ppl`: perplexity versus context length, the protocol of the paper's Table 3.

  qwen-jax eval ppl --checkpoint DIR --data PATH --lengths 1024,2048,4096,8192
      [--ntk/--no-ntk] [--logn/--no-logn] [--window SPEC] [--ladder] [--max-tokens N] [--json]

Protocol (spec §2.4): the data is tokenized (documents joined by <|endoftext|>) and the same
first N tokens are scored at every length L: they are cut into N / L consecutive windows of L
tokens, each window is one forward pass of L positions (so dynamic NTK sees a context of L, as
in the reference's single forward), and PPL = exp(mean NLL of the L - 1 next-token predictions
of every window). N defaults to 4 x the largest length (--max-tokens), rounded down to a
multiple of it. A window is run through the KV cache in chunks of at most 512 queries, which
gives the same logits as one pass while bounding attention memory to 512 x L.

Without --ladder, one row is printed: the checkpoint's long-context config with the flags
applied. With --ladder, the paper's rows: plain, + dynamic ntk, + dynamic ntk + logn, and
+ window when windows are set (--window, or the checkpoint's config).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.infer.longctx import with_long_context
from qwen_jax.model import rope
from qwen_jax.model.cache import KVCache
from qwen_jax.model.transformer import Qwen

MAX_CHUNK = 512


# ------------------------------------------------------------------------------------ data


def load_tokens(path: str | Path, tokenizer=None) -> np.ndarray:
    """Token ids [N] from a .npy of ids, or text (.txt file = one document, .jsonl = one
    document per line's "text", a folder = its .txt/.jsonl files in name order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if path.suffix == ".npy":
        return np.asarray(np.load(path), np.int64).reshape(-1)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"--data folder {path} has no .txt or .jsonl files")
    else:
        files = [path]
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            lines = f.read_text(encoding="utf-8").splitlines()
            docs += [json.loads(line)["text"] for line in lines if line.strip()]
        else:
            docs.append(f.read_text(encoding="utf-8"))
    if tokenizer is None:
        raise ValueError(f"--data {path} is text: a tokenizer is needed (pass --tokenizer)")
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d, allowed_special=set()) + [tokenizer.eod_id]
    return np.asarray(ids, np.int64)


# ------------------------------------------------------------------------------------ math


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _nll_chunk(graphdef, state, tokens_bc, targets_bc, alpha_b, cache):
    """Token NLL [B, C] of one chunk of windows, appended to the cache (positions = slots)."""
    model: Qwen = nnx.merge(graphdef, state)
    h_bcd, cache = model(
        tokens_bc,
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
    )
    # One block of C <= MAX_CHUNK positions through the head, as the forward itself ran.
    logp_bc, _ = model.token_logprobs(h_bcd, targets_bc, chunk=h_bcd.shape[1])
    return -logp_bc, cache


def window_nll(model: Qwen, windows_bl: np.ndarray) -> np.ndarray:
    """Summed next-token NLL [B] of whole windows [B, L] (L - 1 predictions each).

    The dynamic-NTK alpha (if the config enables it) is the reference's at a forward over L
    positions; LogN and windows follow the config.
    """
    cfg = model.cfg
    b, length = windows_bl.shape
    chunk = max(c for c in range(1, min(length, MAX_CHUNK) + 1) if length % c == 0)
    graphdef, state = nnx.split(model)
    alpha_b = None
    if cfg.use_dynamic_ntk:
        alpha_b = rope.ntk_alpha(jnp.full((b,), length, jnp.int32), cfg.seq_length)
    tokens = jnp.asarray(windows_bl, jnp.int32)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # last one is dropped
    cache = KVCache.init(cfg, b, length)
    total = np.zeros((b,), np.float64)
    for c in range(0, length, chunk):
        nll_bc, cache = _nll_chunk(
            graphdef, state, tokens[:, c : c + chunk], targets[:, c : c + chunk], alpha_b, cache
        )
        nll = np.asarray(nll_bc, np.float64)
        if c + chunk == length:
            nll = nll[:, :-1]
        total += nll.sum(-1)
    return total


def perplexity(model: Qwen, tokens: np.ndarray, length: int, batch: int = 1) -> float:
    """exp(mean NLL) over consecutive `length`-token windows of `tokens` (a multiple of it)."""
    windows = np.asarray(tokens).reshape(-1, length)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        part = windows[i : i + batch]
        total += float(window_nll(model, part).sum())
        count += part.shape[0] * (length - 1)
    return math.exp(total / count)


def ladder(windows: tuple[int, ...] | None) -> list[tuple[str, dict]]:
    """The paper's Table 3 rows: (label, long-context switches)."""
    rows = [
        ("plain", dict(ntk=False, logn=False, windows=())),
        ("+ dynamic ntk", dict(ntk=True, logn=False, windows=())),
        ("+ dynamic ntk + logn", dict(ntk=True, logn=True, windows=())),
    ]
    if windows:
        rows.append(("+ dynamic ntk + logn + window", dict(ntk=True, logn=True, windows=windows)))
    return rows


def format_table(lengths: list[int], rows: list[tuple[str, list[float]]]) -> str:
    width = max(len(label) for label, _ in rows)
    head = "| " + "model".ljust(width) + " | " + " | ".join(f"{n:>8d}" for n in lengths) + " |"
    sep = "|" + "-" * (width + 2) + "|" + "|".join("-" * 10 for _ in lengths) + "|"
    body = [
        "| " + label.ljust(width) + " | " + " | ".join(f"{v:8.3f}" for v in vals) + " |"
        for label, vals in rows
    ]
    return "\n".join([head, sep, *body])


# ------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from qwen_jax.infer.options import add_model_args

    p = argparse.ArgumentParser(
        prog="qwen-jax eval ppl",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help=".txt / .jsonl / folder of them / .npy of ids")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="comma list of lengths")
    p.add_argument("--max-tokens", type=int, help="tokens scored per length (default 4 x max)")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass")
    p.add_argument("--ladder", action="store_true", help="the paper's rows (see above)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per cell")
    return p


def run(args: argparse.Namespace) -> int:
    from qwen_jax.infer.options import UsageError, load_from_args

    try:
        lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    except ValueError:
        raise UsageError(
            f"--lengths must be comma-separated integers, got {args.lengths!r}"
        ) from None
    if not lengths or lengths[0] < 2:
        raise UsageError(f"--lengths must be integers >= 2, got {args.lengths!r}")
    if args.ladder and (args.ntk is not None or args.logn is not None):
        raise UsageError("--ladder sets --ntk/--logn itself for each row; drop them")
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    engine, tok = load_from_args(args)
    model = engine.model()
    try:
        tokens = load_tokens(args.data, tok)
    except (ValueError, KeyError) as e:  # no tokenizer for text, a .jsonl line without "text"
        raise UsageError(f"cannot read --data {args.data}: {e!r}") from None
    if tokens.size and tokens.max() >= model.cfg.vocab_size:
        raise UsageError(f"--data has token id {tokens.max()} >= vocab {model.cfg.vocab_size}")
    top = lengths[-1]
    budget = args.max_tokens or 4 * top
    n = min(budget, tokens.size) // top * top
    if n == 0:
        raise UsageError(f"--data has {tokens.size} tokens, fewer than the longest length {top}")
    tokens = tokens[:n]

    if args.ladder:  # the window row uses the effective windows (--window or the config's)
        rows = ladder(model.cfg.attn_windows)
    else:
        cfg = model.cfg
        label = ", ".join(
            [f"ntk={'on' if cfg.use_dynamic_ntk else 'off'}"]
            + [f"logn={'on' if cfg.use_logn_attn else 'off'}"]
            + [f"window={','.join(map(str, cfg.attn_windows)) or 'off'}"]
        )
        rows = [(label, {})]
    base = with_long_context(model, ntk=False, logn=False, windows=()) if args.ladder else model
    print(f"perplexity on {n} tokens of {args.data} ({args.checkpoint})", file=sys.stderr)
    table = []
    for label, switches in rows:
        m = with_long_context(base, **switches) if switches else model
        vals = []
        for length in lengths:
            ppl = perplexity(m, tokens, length, batch=args.batch)
            vals.append(ppl)
            if args.json:
                cfg = m.cfg
                print(
                    json.dumps(
                        {
                            "row": label,
                            "length": length,
                            "ppl": ppl,
                            "tokens": n,
                            "ntk": cfg.use_dynamic_ntk,
                            "logn": cfg.use_logn_attn,
                            "windows": list(cfg.attn_windows),
                        }
                    ),
                    flush=True,
                )
        table.append((label, vals))
    print(format_table(lengths, table))
    return 0


def main(argv: list[str]) -> int:
    from qwen_jax.infer.options import run_cli

    return run_cli("qwen-jax eval ppl", build_parser(), run, argv)
