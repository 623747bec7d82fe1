"""KV-cache generation: pure jitted prefill / decode steps and the host loop that drives them.

Shapes: B batch, T prompt (bucket) length, C prefill chunk, S cache length, V vocab.

Prompts of different lengths are left-padded to one bucket length T (powers of two from 16 up to
1024, then multiples of 1024) and the batch to a bucket size, so a new prompt length reuses the
compiled code of its bucket. Padding slots carry segment id 0 (never attended); RoPE positions
count real tokens only (`positions_from_mask`), as transformers' `generate` does. Prompts longer
than one chunk are prefilled chunk by chunk into the cache (attention memory stays C x S).

The decode loop is Python: each step is one jitted call (forward + sampling, cache donated),
dispatched before the host looks at the previous step's tokens so host work (streaming callbacks,
stop checks, detokenization) overlaps device work.

The engine holds the layer weights as L separate arrays (`unstack_layers`) and runs the layers
as an unrolled loop, not the training layer scan: XLA:CPU copies each scanned layer's weight
slice out of the stacked array before its matmuls, which at decode batch sizes cost more than
the matmuls (bench shape, 8 layers, batch 1: layer stack 30 ms scanned vs 12 ms unrolled over
separate arrays; jax-llm-examples' inference also loops over per-layer weights).

Long context (qwen_jax.infer.longctx): the dynamic-NTK alpha is computed per row from the real
prompt length at prefill and held fixed while decoding; LogN and per-layer windows come from the
model config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.infer.longctx import prefill_alpha
from qwen_jax.infer.sampling import SamplerSpec, SamplingParams, sample, seen_tokens
from qwen_jax.infer.text import StopChecker
from qwen_jax.model.transformer import (
    Qwen,
    init_cache,
    positions_from_mask,
    restack_layers,
    unstack_layers,
)
from qwen_jax.sharding import shard

CHUNK = 1024  # prefill chunk; also the bucket step beyond it, so chunks tile every bucket
GREEDY = SamplingParams()

# on_token(row, token_id, logprob, text_delta): called once per generated token, in order.
OnToken = Callable[[int, int, float, str], None]


class GenerationError(ValueError):
    """A request the engine cannot serve (empty prompt, too long, bad ids); says which."""


@dataclasses.dataclass
class Generation:
    """One row's result. `token_ids` include a stop token if one ended the row; `text` (only
    with a tokenizer) excludes stop tokens and is cut before a stop string."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # raw model log-probability of each generated token
    finish_reason: str  # "stop" | "length"
    stop: int | str | None = None  # the stop id or string that ended the row
    text: str | None = None


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt / cache length bucket: next power of two (>= minimum) up to CHUNK, then the next
    multiple of CHUNK."""
    if n <= CHUNK:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    return -(-n // CHUNK) * CHUNK


def bucket_batch(b: int) -> int:
    """Batch bucket: 1, 2, 4, 8, then multiples of 8."""
    return 1 << max(0, b - 1).bit_length() if b <= 8 else -(-b // 8) * 8


# ------------------------------------------------------------------------ pure jitted steps


def _constrain_cache(cache: dict) -> dict:
    kv = (None, "cache_batch", "cache_seq", "cache_kv_heads", None)
    return {
        "k": shard(cache["k"], *kv),
        "v": shard(cache["v"], *kv),
        "segment_ids": shard(cache["segment_ids"], "cache_batch", "cache_seq"),
        "index": cache["index"],
    }


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "length"))
def new_cache(cfg, batch: int, length: int) -> dict:
    """An empty cache, created sharded under the active mesh."""
    return _constrain_cache(init_cache(cfg, batch, length))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, layers, tokens_bc, positions_bc, segments_bc, alpha_b, cache):
    """Write one chunk [B, C] into the cache; returns (last-position logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)
    h_bcd, cache = model(
        tokens_bc,
        positions_bt=positions_bc,
        segment_ids_bt=segments_bc,
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    return model.logits(h_bcd[:, -1:])[:, 0], _constrain_cache(cache)


@functools.partial(jax.jit, static_argnames=("spec", "vocab"))
def first_token(logits_bv, tokens_bt, mask_bt, key, knobs, spec: SamplerSpec, vocab: int):
    """Sample the first new token after prefill; returns (token [B], logprob [B], seen [B, V])."""
    seen_bv = seen_tokens(tokens_bt, mask_bt, vocab) if spec.penalty else None
    tok_b, logp_b = sample(logits_bv, jax.random.fold_in(key, 0), knobs, spec, seen_bv)
    return tok_b, logp_b, seen_bv


@functools.partial(
    jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("cache", "seen_bv")
)
def decode_step(
    graphdef, spec, state, layers, tok_b, lengths_b, step, alpha_b, cache, seen_bv, key, knobs
):
    """Feed the previous tokens [B] at position length + step, sample the next ones.

    Returns (tokens [B], raw logprobs [B], cache, seen [B, V] or None).
    """
    model = nnx.merge(graphdef, state)
    pos_b1 = (lengths_b + step)[:, None]
    h_b1d, cache = model(
        tok_b[:, None],
        positions_bt=pos_b1,
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    logits_bv = model.logits(h_b1d)[:, 0]
    if spec.penalty:
        seen_bv = seen_bv.at[jnp.arange(tok_b.shape[0]), tok_b].set(True)
    nxt_b, logp_b = sample(logits_bv, jax.random.fold_in(key, step + 1), knobs, spec, seen_bv)
    return nxt_b, logp_b, _constrain_cache(cache), seen_bv


# ------------------------------------------------------------------------------- the engine


class Engine:
    """Generation over one model.

    Args:
      model: a `Qwen` (parameters may be sharded over `mesh`); its config's long-context
        switches apply (see `longctx.with_long_context` to override them).
      mesh: run under this mesh (the KV cache is sharded by the "cache_*" logical axes).
      max_context: the most positions a row may reach (prompt + new tokens); defaults to the
        config's max_position_embeddings. Dynamic NTK is what makes larger values sensible.
    """

    def __init__(self, model: Qwen, *, mesh: Mesh | None = None, max_context: int | None = None):
        self.cfg = model.cfg
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        with self._mesh():
            self.state, self.layers = unstack_layers(state)
        self.max_context = max_context or self.cfg.max_position_embeddings

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def model(self) -> Qwen:
        """The full model (its stacked layer weights are rebuilt: a copy of the layers)."""
        with self._mesh():
            return nnx.merge(self.graphdef, restack_layers(self.state, self.layers))

    def _check(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise GenerationError("no prompts given: pass a list of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            ids = [int(t) for t in p]
            if not ids:
                raise GenerationError(f"prompt {i} is empty: give at least one token")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise GenerationError(
                    f"prompt {i} has token ids outside the model's vocabulary "
                    f"[0, {self.cfg.vocab_size}): {bad[:5]}"
                )
            if len(ids) >= self.max_context:
                raise GenerationError(
                    f"prompt {i} has {len(ids)} tokens; the context budget is {self.max_context} "
                    "(prompt + at least one new token). Shorten it or raise max_context."
                )
            out.append(ids)
        return out

    def prefill(self, prompts: Sequence[Sequence[int]], cache_len: int | None = None):
        """Left-pad, bucket and prefill. Returns (last logits [Bp, V], cache, padded tokens
        [Bp, T], mask [Bp, T], lengths [Bp], alpha [Bp] or None); Bp, T are bucket sizes."""
        prompts = self._check(prompts)
        lengths = [len(p) for p in prompts]
        t = bucket_length(max(lengths))
        bp = bucket_batch(len(prompts))
        tokens = np.zeros((bp, t), np.int32)
        mask = np.zeros((bp, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, t - len(p) :] = p
            mask[i, t - len(p) :] = 1
        lengths_b = mask.sum(-1).astype(np.int32)
        alpha_b = prefill_alpha(self.cfg, lengths_b)
        positions = positions_from_mask(jnp.asarray(mask))
        cache_len = max(cache_len or 0, t)
        with self._mesh():
            cache = new_cache(self.cfg, bp, cache_len)
            step = min(t, CHUNK)
            for c in range(0, t, step):
                logits_bv, cache = prefill_chunk(
                    self.graphdef,
                    self.state,
                    self.layers,
                    jnp.asarray(tokens[:, c : c + step]),
                    positions[:, c : c + step],
                    jnp.asarray(mask[:, c : c + step]),
                    alpha_b,
                    cache,
                )
        return logits_bv, cache, tokens, mask, lengths_b, alpha_b

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Log-probabilities [P, V] of the token after each prompt (one batched prefill)."""
        logits_bv = self.prefill(prompts)[0]
        return np.asarray(jax.nn.log_softmax(logits_bv, axis=-1))[: len(prompts)]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = GREEDY,
        stop_ids: Sequence[int] = (),
        stop_strings: Sequence[str] = (),
        tokenizer=None,
        on_token: OnToken | None = None,
    ) -> list[Generation]:
        """Continue each prompt (token ids) by up to `max_new_tokens` tokens.

        A row ends at a token in `stop_ids`, when its text contains a string of `stop_strings`
        (needs `tokenizer`, used for `decode`), or when it runs out of budget: max_new_tokens,
        or fewer when the prompt is so long that max_context would be passed. `on_token`
        streams every generated token as it is produced (text deltas hold back anything that
        could still turn out to start a stop string).
        """
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the generated text")
        prompts = self._check(prompts)
        n = len(prompts)
        budgets = [min(max_new_tokens, self.max_context - len(p)) for p in prompts]
        steps = max(budgets)
        t = bucket_length(max(len(p) for p in prompts))
        logits_bv, cache, tokens, mask, lengths_b, alpha_b = self.prefill(
            prompts, cache_len=bucket_length(t + steps)
        )
        spec, knobs = sampling.spec(), sampling.knobs()
        key = jax.random.key(sampling.seed)
        lengths_dev = jnp.asarray(lengths_b)
        with self._mesh():
            tok_b, logp_b, seen_bv = first_token(
                logits_bv,
                jnp.asarray(tokens),
                jnp.asarray(mask),
                key,
                knobs,
                spec,
                self.cfg.vocab_size,
            )
        checkers = [
            None if tokenizer is None else StopChecker(tokenizer, stop_strings) for _ in prompts
        ]
        results = [Generation(p, [], [], "length") for p in prompts]
        live = set(range(n))
        stop_set = {int(s) for s in stop_ids}
        for i in range(steps):
            if i + 1 < steps:  # dispatch step i+1 before reading step i: overlap host and device
                with self._mesh():
                    nxt = decode_step(
                        self.graphdef, spec, self.state, self.layers, tok_b, lengths_dev, i,
                        alpha_b, cache, seen_bv, key, knobs,
                    )  # fmt: skip
            toks, logps = np.asarray(tok_b), np.asarray(logp_b)
            for r in sorted(live):
                res, tok = results[r], int(toks[r])
                res.token_ids.append(tok)
                res.logprobs.append(float(logps[r]))
                delta, checker = "", checkers[r]
                if tok in stop_set:
                    res.finish_reason, res.stop = "stop", tok
                elif checker is not None:
                    delta, hit = checker.push(tok)
                    if hit is not None:
                        res.finish_reason, res.stop = "stop", hit
                if res.finish_reason == "stop" or len(res.token_ids) >= budgets[r]:
                    live.discard(r)
                    delta += checker.finish() if checker is not None else ""
                if on_token is not None:
                    on_token(r, tok, res.logprobs[-1], delta)
            if not live:
                break
            tok_b, logp_b, cache, seen_bv = nxt
        for r, res in enumerate(results):
            if checkers[r] is not None:
                res.text = checkers[r].text
        return results
