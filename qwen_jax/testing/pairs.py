"""Rule-based preference pairs as token arrays: the pair-batch layout of qwen_jax.data.pipeline
without a tokenizer, for objective tests (reward model, DPO)."""

from __future__ import annotations

import numpy as np

PAD, END, GOOD, BAD = 0, 1, 2, 3  # END stands for the `<|im_end|>` closing the reply
FIRST_FREE = 4  # prompt and reply tokens are drawn from [FIRST_FREE, vocab)


def rule_pairs(
    n: int, seq_len: int, vocab: int, seed: int = 0, padding_rows: int = 0
) -> dict[str, np.ndarray]:
    """`n` real pairs (+ `padding_rows` empty rows) of a learnable rule.

    Each sequence = prompt (2-5 random tokens) + reply (1-4 random tokens, drawn independently
    for chosen and rejected) + GOOD (chosen) or BAD (rejected) + END, right-padded with PAD to
    `seq_len` (>= 11). Returns the pair batch: chosen_tokens, rejected_tokens int32
    [n + padding_rows, seq_len]; chosen_lengths, rejected_lengths, prompt_lengths int32 [rows],
    0 on padding rows.
    """
    rng = np.random.default_rng(seed)
    rows = n + padding_rows
    out = {k: np.full((rows, seq_len), PAD, np.int32) for k in ("chosen_tokens", "rejected_tokens")}
    out |= {k: np.zeros(rows, np.int32) for k in ("chosen_lengths", "rejected_lengths")}
    out["prompt_lengths"] = np.zeros(rows, np.int32)
    for i in range(n):
        prompt = rng.integers(FIRST_FREE, vocab, int(rng.integers(2, 6)))
        out["prompt_lengths"][i] = len(prompt)
        for kind, last in (("chosen", GOOD), ("rejected", BAD)):
            reply = rng.integers(FIRST_FREE, vocab, int(rng.integers(1, 5)))
            seq = np.concatenate([prompt, reply, [last, END]])
            out[f"{kind}_tokens"][i, : len(seq)] = seq
            out[f"{kind}_lengths"][i] = len(seq)
    return out
