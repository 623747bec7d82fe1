"""`qwen-jax tokenizer {encode,decode,info,fetch,train}`: check data by hand, get the vocab,
train a SentencePiece model.

    qwen-jax tokenizer encode --tokenizer qwen "Observation:"        -> 37763 367 25
    qwen-jax tokenizer encode --tokenizer qwen --no-special 'print("<|endoftext|>")'
    qwen-jax tokenizer decode --tokenizer qwen 37763 367 25
    qwen-jax tokenizer train --input a.jsonl b.txt --vocab-size 4096 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from qwen_jax.cli import UsageError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-jax tokenizer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encode", help="print the ids of TEXT ('-' reads stdin)")
    enc.add_argument("text")
    enc.add_argument(
        "--no-special",
        action="store_true",
        help="treat special-token surface forms as plain text (user content)",
    )
    enc.add_argument("--pieces", action="store_true", help="also print each token's bytes")
    enc.add_argument(
        "--strict",
        action="store_true",
        help="refuse input that is not valid UTF-8 (default: replace it with U+FFFD and warn)",
    )
    dec = sub.add_parser("decode", help="print the text of IDS")
    dec.add_argument("ids", nargs="+", type=int)
    sub.add_parser("info", help="vocab size and special ids")
    for s in (enc, dec, sub.choices["info"]):
        s.add_argument("--tokenizer", default="qwen", help="'qwen' or a path (default qwen)")
    sub.add_parser("fetch", help="fetch + verify qwen.tiktoken into the cache; print its path")
    tr = sub.add_parser("train", help="train a BPE SentencePiece model")
    tr.add_argument("--input", nargs="+", required=True, help="jsonl / text files, or dirs")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", required=True, help="output directory (tokenizer.model)")
    tr.add_argument("--num-extra", type=int, default=8, help="<|extra_i|> tokens to reserve")
    tr.add_argument(
        "--max-chars",
        type=int,
        default=20_000_000,
        help="train on a seeded sample of at most this many characters",
    )
    tr.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "fetch":
        from qwen_jax.tokenizer.assets import qwen_tiktoken_path

        print(qwen_tiktoken_path())
        return 0
    if args.cmd == "train":
        from qwen_jax.tokenizer.load import load_tokenizer
        from qwen_jax.tokenizer.spm import train_sentencepiece

        t0 = time.perf_counter()
        path = train_sentencepiece(
            args.input,
            args.out,
            args.vocab_size,
            num_extra=args.num_extra,
            max_chars=args.max_chars,
            seed=args.seed,
        )
        tok = load_tokenizer(path)
        print(
            json.dumps(
                {
                    "model": str(path),
                    "vocab_size": tok.vocab_size,
                    "special_ids": {k: v for k, v in tok.special_ids.items()},
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
        )
        return 0
    from qwen_jax.tokenizer.load import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    if args.cmd == "info":
        print(
            json.dumps(
                {
                    "name": tok.name,
                    "vocab_size": tok.vocab_size,
                    "eod_id": tok.eod_id,
                    "im_start_id": tok.im_start_id,
                    "im_end_id": tok.im_end_id,
                    "pad_id": tok.pad_id,
                    "num_special": len(tok.special_ids),
                }
            )
        )
    elif args.cmd == "encode":
        # The bytes the user gave: argv arrives surrogate-escaped, stdin is read raw.
        raw = sys.stdin.buffer.read() if args.text == "-" else os.fsencode(args.text)
        text, bad = decode_utf8(raw)
        if bad and args.strict:
            raise UsageError(f"the input is not valid UTF-8 ({bad} invalid byte(s))")
        if bad:
            print(
                f"qwen-jax tokenizer: warning: replaced {bad} invalid UTF-8 byte(s) with U+FFFD "
                "(--strict refuses such input)",
                file=sys.stderr,
            )
        ids = tok.encode(text, allowed_special=set() if args.no_special else "all")
        print(" ".join(map(str, ids)))
        if args.pieces:
            for i in ids:
                print(f"{i}\t{tok.token_bytes(i)!r}")
    else:
        outside = [i for i in args.ids if not 0 <= i < tok.vocab_size]
        if outside:
            raise UsageError(
                f"token id {outside[0]} is outside the vocabulary of {args.tokenizer!r} "
                f"(vocab size {tok.vocab_size}: ids 0..{tok.vocab_size - 1})"
            )
        print(tok.decode(args.ids))
    return 0


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with each invalid byte sequence replaced by U+FFFD, and how many bytes were
    invalid (0 for valid input)."""
    parts, bad, start = [], 0, 0
    while True:
        try:
            parts.append(raw[start:].decode("utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as e:
            parts.append(raw[start : start + e.start].decode("utf-8") + "\ufffd")
            bad += e.end - e.start
            start += e.end
