"""`qwen-jax rm score`: score preference pairs or single responses with a reward model.

  qwen-jax rm score --checkpoint DIR --data FILE [--tokenizer SPEC] [--batch N]
                    [--max-length T]

DIR: a reward export (`Qwen2ForSequenceClassification` directory, qwen_jax.checkpoint.seqcls),
a params export of a reward model, or the workdir of a reward training run (its newest
checkpoint). FILE: jsonl, one record a line, each either a pair
    {"prompt": str | [messages], "chosen": str, "rejected": str, "system"?: str}
or a single response
    {"prompt": str | [messages], "response": str, "system"?: str}
("messages" may stand for "prompt"). Each is tokenized as training does
(chatml.preference_tokens: the reward is read at the reply's closing <|im_end|>).

Output, jsonl on stdout, one line per record in file order:
    {"line": n, "chosen": r_c, "rejected": r_r, "margin": r_c - r_r, "correct": r_c > r_r}
    {"line": n, "score": r}
then, if there were pairs, {"pairs": N, "accuracy": ..., "mean_margin": ...}. A bad record
stops the run before any scoring with a one-line error naming FILE:LINE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax.tokenizer import chatml


class RecordError(ValueError):
    """A jsonl record that cannot be scored; the message names FILE:LINE."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-jax rm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score pairs (accuracy) or single responses")
    s.add_argument("--checkpoint", required=True, help="reward export or run workdir")
    s.add_argument("--data", type=Path, required=True, help="jsonl of pairs or responses")
    s.add_argument("--tokenizer", default=None, help="default: the checkpoint's own")
    s.add_argument("--batch", type=int, default=8, help="sequences per forward pass")
    s.add_argument(
        "--max-length", type=int, default=None, help="longest sequence (default: the model's)"
    )
    return p


# ------------------------------------------------------------------------------ records


def read_records(path: Path, tok, max_length: int) -> list[tuple[int, list[list[int]]]]:
    """(line number, token sequences) per record: [chosen, rejected] for a pair, [response]
    for a single response. Raises RecordError naming the first bad line."""
    if not path.is_file():
        raise RecordError(f"data file {path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                seqs = _record_tokens(json.loads(line), tok)
            except (ValueError, KeyError, TypeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                if isinstance(e, KeyError):  # a message without "role"/"content" keys
                    msg = f"missing field {e.args[0]!r}"
                raise RecordError(f"{path}:{n}: {msg}") from None
            longest = max(map(len, seqs))
            if longest > max_length:
                raise RecordError(
                    f"{path}:{n}: {longest} tokens, more than --max-length {max_length}"
                )
            out.append((n, seqs))
    if not out:
        raise RecordError(f"{path}: no records")
    return out


def _record_tokens(rec, tok) -> list[list[int]]:
    if not isinstance(rec, dict):
        raise ValueError(f"a record is a JSON object, got {type(rec).__name__}")
    if ("prompt" in rec) == ("messages" in rec):
        raise ValueError('a record has exactly one of "prompt" and "messages"')
    prompt = rec["prompt"] if "prompt" in rec else rec["messages"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("the prompt is a string or a non-empty list of messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} is not an object with a role")
        if not isinstance(m.get("content"), str) or not m["content"]:
            raise ValueError(f"message {i} ({m['role']}) has no content")
    if "response" in rec:
        if "chosen" in rec or "rejected" in rec:
            raise ValueError('a record is a pair ("chosen", "rejected") or has a "response"')
        replies = [rec["response"]]
    elif "chosen" in rec and "rejected" in rec:
        replies = [rec["chosen"], rec["rejected"]]
        if replies[0] == replies[1]:
            raise ValueError("chosen equals rejected")
    else:
        raise ValueError('a record needs "chosen" and "rejected", or "response"')
    for r in replies:
        if not isinstance(r, str) or not r:
            raise ValueError("a reply is a non-empty string")
    system = rec.get("system", chatml.DEFAULT_SYSTEM)
    if not isinstance(system, str):
        raise ValueError('"system" is a string')
    return [chatml.preference_tokens(tok, prompt, r, system)[0] for r in replies]


# ------------------------------------------------------------------------------ scoring


def score_sequences(model, seqs: list[list[int]], pad_id: int, batch: int) -> np.ndarray:
    """Rewards fp32 [len(seqs)]: each sequence right-padded with `pad_id` in batches of
    `batch` rows, the reward read at its last token (index length-1). Row counts and lengths
    are padded to a fixed batch and a power-of-two length (at least 16), so compiles stay
    few; padding rows have length 0 and are dropped."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_bt, lengths_b):
        m = nnx.merge(graphdef, state)
        t = tokens_bt.shape[1]
        mask_bt = (jnp.arange(t)[None, :] < lengths_b[:, None]).astype(jnp.int32)
        h, _ = m(tokens_bt, segment_ids_bt=mask_bt, return_hidden=True)
        return m.rewards(h, jnp.maximum(lengths_b - 1, 0))

    # Similar lengths share a batch (less padding, fewer buckets); results go back in order.
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros(len(seqs), np.float32)
    for lo in range(0, len(seqs), batch):
        rows = order[lo : lo + batch]
        t = max(16, 1 << (max(len(seqs[i]) for i in rows) - 1).bit_length())
        tokens = np.full((batch, t), pad_id, np.int32)
        lengths = np.zeros(batch, np.int32)
        for j, i in enumerate(rows):
            tokens[j, : len(seqs[i])] = seqs[i]
            lengths[j] = len(seqs[i])
        rewards = run(state, jnp.asarray(tokens), jnp.asarray(lengths))
        out[rows] = np.asarray(rewards)[: len(rows)]
    return out


def load_reward(checkpoint: str | Path, tokenizer: str | None):
    """(reward model, tokenizer) from a reward export, a params export or a run workdir."""
    from qwen_jax.checkpoint import CheckpointError, load_model
    from qwen_jax.checkpoint.seqcls import is_reward_dir, load_reward_model
    from qwen_jax.infer.load import check_vocab, find_tokenizer, is_training_workdir
    from qwen_jax.train.checkpointing import workdir_path

    checkpoint = workdir_path(checkpoint)  # a local path, or a gs:// run workdir
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} is not a directory")
    tok = find_tokenizer(checkpoint, tokenizer)
    if tok is None:
        raise CheckpointError(f"{checkpoint} has no tokenizer files: pass --tokenizer")
    if is_training_workdir(checkpoint):
        from qwen_jax.train.export import restore_model

        _, model, _ = restore_model(checkpoint, mesh=None)
    elif is_reward_dir(checkpoint):
        _, model = load_reward_model(checkpoint)
    else:
        _, model = load_model(checkpoint)
    if not model.cfg.reward_head:
        raise CheckpointError(f"{checkpoint} is a language model, not a reward model")
    check_vocab(tok, model.cfg.vocab_size, f"checkpoint {checkpoint}")
    return model, tok


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from qwen_jax.checkpoint import CheckpointError

    if args.batch < 1:
        print("qwen-jax rm score: error: --batch must be at least 1", file=sys.stderr)
        return 2
    try:
        model, tok = load_reward(args.checkpoint, args.tokenizer)
        max_length = args.max_length or model.cfg.max_position_embeddings
        records = read_records(args.data, tok, max_length)
    except (CheckpointError, RecordError, FileNotFoundError, ValueError) as e:
        print(f"qwen-jax rm score: error: {e}", file=sys.stderr)
        return 1
    seqs = [s for _, rec in records for s in rec]
    rewards = iter(score_sequences(model, seqs, tok.pad_id, args.batch).tolist())
    margins = []
    for n, rec in records:
        if len(rec) == 1:
            print(json.dumps({"line": n, "score": next(rewards)}))
            continue
        c, r = next(rewards), next(rewards)
        margins.append(c - r)
        row = {"line": n, "chosen": c, "rejected": r, "margin": c - r, "correct": c > r}
        print(json.dumps(row))
    if margins:
        acc = float(np.mean(np.asarray(margins) > 0))
        print(
            json.dumps(
                {"pairs": len(margins), "accuracy": acc, "mean_margin": float(np.mean(margins))}
            )
        )
    return 0
