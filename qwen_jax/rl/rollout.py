"""Rollouts for PPO / GRPO through the project's generation engine, on the policy's current
weights.

Shapes: P prompts, n samples per prompt, N = P * n rows, T the run's fixed sequence length
bucket_length(max_prompt_len + max_new_tokens).

One `RolloutEngine` serves a whole run: its `Engine` (qwen_jax.infer.engine) is built once with
its own copy of the weights (donate=False: the training state keeps its arrays, and a train step
may donate them), and each iteration `refresh`es that copy in place from the training state's
params, so nothing is rebuilt or recompiled. Every call pads the prompts to the bucket of
max_prompt_len and the cache to that plus max_new_tokens, so with a fixed number of prompts per
call (the run's prompts_per_step) every call runs the same compiled prefill / decode programs,
and the host arrays it returns have one shape [N, T] for the run: the jitted scoring and update
steps downstream compile once.

The policy is sampled as it is trained: the engine runs the model with its long-context
switches (dynamic NTK, LogN) off, because the training forward (qwen_jax.rl.scoring) never
applies them; within the trained context they change nothing, beyond it they would make the
sampling policy differ from the one whose log-probabilities the loss uses.

Log-probabilities: `sample_logp` is what the engine's sampler reports, the log-probability
under the model's RAW distribution (log_softmax of the unprocessed logits;
qwen_jax.infer.sampling), i.e. exactly `scoring.sequence_logprobs` of the rollout. With
temperature 1 and top_p 1 that is the distribution the tokens were drawn from; with
temperature != 1 or top_p < 1 the tokens come from the tempered / nucleus-truncated
distribution while the log-probs stay the model's (as TRL and OpenRLHF use them: the PPO ratio
is between two raw policies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from qwen_jax.infer.engine import Engine, bucket_length
from qwen_jax.infer.longctx import with_long_context
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model.transformer import Qwen


class RolloutError(ValueError):
    """Rollout input the run cannot serve (a prompt over the budget, no prompts, bad n)."""


@dataclasses.dataclass
class Rollouts:
    """Host numpy arrays of one rollout batch; N = len(prompts) * n rows, row = prompt_index *
    n + j. Sequences are prompt + response, right-padded with pad_id to the run's fixed T."""

    tokens: np.ndarray  # int32 [N, T]
    prompt_lengths: np.ndarray  # int32 [N]
    lengths: np.ndarray  # int32 [N]: prompt + response (with the stop token when it stopped)
    finished: np.ndarray  # bool [N]: the response ended at a stop id (else max_new_tokens ran out)
    group: np.ndarray  # int32 [N]: the row's prompt index
    sample_logp: np.ndarray  # fp32 [N, T]: sampler's raw log-prob at response positions, else 0

    def response_mask(self) -> np.ndarray:
        """fp32 [N, T]: 1 at t in [prompt_length, length) (the response, stop token included)."""
        t = np.arange(self.tokens.shape[1])[None, :]
        inside = (t >= self.prompt_lengths[:, None]) & (t < self.lengths[:, None])
        return inside.astype(np.float32)

    def responses(self) -> list[list[int]]:
        """Each row's response ids without the stop token (what a rule reward reads)."""
        ends = self.lengths - self.finished.astype(np.int32)
        return [
            self.tokens[r, p:e].tolist()
            for r, (p, e) in enumerate(zip(self.prompt_lengths, ends, strict=True))
        ]


class RolloutEngine:
    """Sample n responses per prompt from a policy whose weights are refreshed in place.

    Args:
      model: the policy (a `Qwen`; its arrays are copied, never taken).
      mesh: run under this mesh (the engine's KV cache is sharded by the "cache_*" axes).
      max_prompt_len: the longest prompt allowed (longer: RolloutError before any compile).
      max_new_tokens: response budget per row.
      stop_ids: a row ends at the first of these it samples (`<|im_end|>` and the tokenizer's
        end-of-text: qwen_jax.tokenizer.chatml.stop_ids); the stop token is part of the
        response (the reward model reads it, the policy learns to emit it).
      sampling: temperature / top_p / top_k of every rollout; its seed is replaced by
        `generate`'s.
      pad_id: fills [length, T) of every row of `Rollouts.tokens`.
    """

    def __init__(
        self,
        model: Qwen,
        *,
        mesh=None,
        max_prompt_len: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        sampling: SamplingParams,
        pad_id: int,
    ):
        if max_prompt_len < 1 or max_new_tokens < 1:
            raise RolloutError(
                f"max_prompt_len and max_new_tokens must be >= 1, got {max_prompt_len} and "
                f"{max_new_tokens}"
            )
        vocab = model.cfg.vocab_size
        bad = [int(s) for s in (*stop_ids, pad_id) if not 0 <= int(s) < vocab]
        if bad:
            raise RolloutError(f"stop / pad ids outside the vocabulary [0, {vocab}): {bad}")
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.seq_len = bucket_length(max_prompt_len + max_new_tokens)  # T
        self.stop_ids = tuple(int(s) for s in stop_ids)
        self.sampling = sampling
        self.pad_id = int(pad_id)
        policy = with_long_context(model, ntk=False, logn=False)
        self.engine = Engine(policy, mesh=mesh, max_context=self.seq_len, donate=False)

    def refresh(self, params) -> None:
        """New policy weights (a training state's "params": stacked layers, nnx.State or pure
        dict), copied in place into the engine's buffers: nothing recompiles (Engine.refresh)."""
        self.engine.refresh(params)

    def check(self, prompts: Sequence[Sequence[int]], n: int) -> None:
        """RolloutError naming the first problem of a request (checked before any compile)."""
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise RolloutError("no prompts given: pass a list of token-id lists")
        if n < 1:
            raise RolloutError(f"n (samples per prompt) must be >= 1, got {n}")
        for i, p in enumerate(prompts):
            if not len(p):
                raise RolloutError(f"prompt {i} is empty")
            if len(p) > self.max_prompt_len:
                raise RolloutError(
                    f"prompt {i} has {len(p)} tokens, more than max_prompt_len="
                    f"{self.max_prompt_len}: shorten or drop it, or raise max_prompt_len"
                )

    def generate(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> Rollouts:
        """n samples of each prompt (rows prompt_index * n + j), drawn with `seed`: the same
        weights, prompts and seed give the same rollouts (a resumed run regenerates them)."""
        self.check(prompts, n)
        rows = [[int(t) for t in p] for p in prompts for _ in range(n)]
        sampling = dataclasses.replace(self.sampling, seed=int(seed))
        gens = self.engine.generate(
            rows,
            max_new_tokens=self.max_new_tokens,
            sampling=sampling,
            stop_ids=self.stop_ids,
            pad_prompts_to=self.max_prompt_len,
        )
        num, t = len(rows), self.seq_len
        tokens = np.full((num, t), self.pad_id, np.int32)
        sample_logp = np.zeros((num, t), np.float32)
        prompt_lengths = np.zeros(num, np.int32)
        lengths = np.zeros(num, np.int32)
        for r, (prompt, g) in enumerate(zip(rows, gens, strict=True)):
            p, e = len(prompt), len(prompt) + len(g.token_ids)
            tokens[r, :p], tokens[r, p:e] = prompt, g.token_ids
            sample_logp[r, p:e] = g.logprobs
            prompt_lengths[r], lengths[r] = p, e
        return Rollouts(
            tokens=tokens,
            prompt_lengths=prompt_lengths,
            lengths=lengths,
            finished=np.asarray([g.finish_reason == "stop" for g in gens], bool),
            group=np.repeat(np.arange(len(prompts), dtype=np.int32), n),
            sample_logp=sample_logp,
        )
