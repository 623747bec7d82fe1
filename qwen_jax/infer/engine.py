"""KV-cache generation: pure jitted prefill / decode steps and the host loop that drives them.

Shapes: B batch, T prompt (bucket) length, C prefill chunk, S cache length, V vocab.

Prompts of different lengths are left-padded to one bucket length T (powers of two from 16 up to
1024, then multiples of 1024) and the batch to a bucket size, so a new prompt length reuses the
compiled code of its bucket. The KV cache (qwen_jax.model.cache.KVCache) records each row's
padding as its `starts` (never attended) and its next write slot as its `lengths`; RoPE
positions count real tokens only (`positions_from_mask` at prefill, lengths - starts while
decoding), as transformers' `generate` does. Prompts longer than one chunk are prefilled chunk
by chunk into the cache (attention memory stays C x S). Every row decodes at its own slot and
position, so rows at different lengths share a decode batch: `insert_rows` moves a row prefilled
elsewhere into a running batch, `reset_rows` frees rows (the pieces of continuous batching).

The decode loop is Python: each step is one jitted call (forward + sampling, cache donated),
dispatched before the host looks at the previous step's tokens so host work (streaming callbacks,
stop checks, detokenization) overlaps device work.

The engine holds the layer weights as L separate arrays (`unstack_layers`) and runs the layers
as an unrolled loop, not the training layer scan: XLA:CPU copies each scanned layer's weight
slice out of the stacked array before its matmuls, which at decode batch sizes cost more than
the matmuls (bench shape, 8 layers, batch 1: layer stack 30 ms scanned vs 12 ms unrolled over
separate arrays; jax-llm-examples' inference also loops over per-layer weights). The KV cache is
per layer too, so each layer's buffer is updated in place. By default the engine takes the
model's weights (`donate=True`: one copy exists); `refresh` puts new weights (a training
state's params) into the same buffers' shapes and shardings, so nothing recompiles.

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
from qwen_jax.infer.sampling import (
    SamplerSpec,
    SamplingParams,
    sample,
    sample_rows,
    seen_tokens,
)
from qwen_jax.infer.text import StopChecker
from qwen_jax.model.cache import KVCache
from qwen_jax.model.transformer import (
    Qwen,
    copy_arrays,
    positions_from_mask,
    restack_layers,
    split_layers,
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


@functools.partial(jax.jit, static_argnames=("cfg", "batch", "length"))
def new_cache(cfg, batch: int, length: int, starts_b) -> KVCache:
    """An empty cache with left padding starts_b [B], created sharded under the active mesh."""
    return KVCache.init(cfg, batch, length, starts_b=starts_b)


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: KVCache, row, rows: KVCache) -> KVCache:
    """`cache` with `rows` (R rows, at most as many slots) copied into rows [row, row + R)."""
    return cache.insert(row, rows).constrain()


@functools.partial(jax.jit, donate_argnames=("cache",))
def reset_rows(cache: KVCache, rows_b) -> KVCache:
    """`cache` with the rows where rows_b [B] bool is True emptied (free for a new request)."""
    return cache.reset(rows_b).constrain()


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_chunk(graphdef, state, layers, tokens_bc, positions_bc, alpha_b, cache):
    """Write one chunk [B, C] into the cache; returns (last-position logits [B, V], cache)."""
    model = nnx.merge(graphdef, state)
    h_bcd, cache = model(
        tokens_bc,
        positions_bt=positions_bc,
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    return model.logits(h_bcd[:, -1:])[:, 0], cache.constrain()


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_logprobs(graphdef, state, layers, tokens_bt, mask_bt, alpha_b):
    """log p(tokens[:, t + 1] | tokens[:, :t + 1]) [B, T] (the last column is padding) of a
    right-padded batch (mask 1 = real), one forward without a cache."""
    model = nnx.merge(graphdef, state)
    h_btd, _ = model(
        tokens_bt,
        segment_ids_bt=mask_bt,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    targets_bt = jnp.concatenate([tokens_bt[:, 1:], tokens_bt[:, :1]], axis=1)
    return model.token_logprobs(h_btd, targets_bt)[0]


@functools.partial(jax.jit, static_argnames=("spec", "vocab"))
def first_token(logits_bv, tokens_bt, mask_bt, key, knobs, spec: SamplerSpec, vocab: int):
    """Sample the first new token after prefill; returns (token [B], logprob [B], seen [B, V])."""
    seen_bv = seen_tokens(tokens_bt, mask_bt, vocab) if spec.penalty else None
    tok_b, logp_b = sample(logits_bv, jax.random.fold_in(key, 0), knobs, spec, seen_bv)
    return tok_b, logp_b, seen_bv


@functools.partial(
    jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("cache", "seen_bv")
)
def decode_step(graphdef, spec, state, layers, tok_b, step, alpha_b, cache, seen_bv, key, knobs):
    """Feed the previous tokens [B], each row at its own cache slot and position (the cache's
    lengths - starts), and sample the next ones; `step` seeds the sampler.

    Returns (tokens [B], raw logprobs [B], cache, seen [B, V] or None).
    """
    model = nnx.merge(graphdef, state)
    h_b1d, cache = model(
        tok_b[:, None],
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
    return nxt_b, logp_b, cache.constrain(), seen_bv


# ----------------------------------------------------- steps of the scheduler (qwen_jax.serve)
# Rows are right-padded here: a prompt sits at slots [0, n) of its row (start 0), so a row
# needs exactly n + new tokens - 1 slots and a cache of bucket_length(max_context) holds any
# request the context budget admits (left padding would add up to a bucket's worth).


# The serving batch's per-row [B, V] state (seen tokens) is sharded like the cache's rows, the
# same way wherever it is made or updated, so its steps compile once under a mesh too.
ROWS_AXES = ("cache_batch", None)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill_rows_chunk(graphdef, state, layers, tokens_bc, alpha_b, cache, lengths_b):
    """Write one right-padded chunk [B, C] at each row's length (positions slot - start).

    lengths_b [B]: each row's real prompt length n; the cache's lengths end at min(length + C,
    n), so padding written past n stays invisible (and is overwritten by decoding). Returns
    (logits [B, V] at each row's last real column in this chunk, cache).
    """
    model = nnx.merge(graphdef, state)
    before_b = cache.lengths
    h_bcd, cache = model(
        tokens_bc,
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    after_b = jnp.minimum(cache.lengths, lengths_b)
    last_b = jnp.clip(after_b - before_b - 1, 0, tokens_bc.shape[1] - 1)
    h_b1d = jnp.take_along_axis(h_bcd, last_b[:, None, None], axis=1)
    cache = KVCache(cache.k, cache.v, cache.starts, after_b)
    return model.logits(h_b1d)[:, 0], cache.constrain()


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache", "seen_bv"))
def decode_rows(
    graphdef,
    state,
    layers,
    tok_b,
    active_b,
    alpha_b,
    cache,
    seen_bv,
    knobs_bk,
    keys_b,
    steps_b,
    want_top,
):
    """One decode step of a serving batch: feed tokens [B] (rows where active_b [B] is False
    are free and keep their length), then sample every row with its own settings
    (`sampling.sample_rows`: knobs [B, K], key data [B, ...], draw index steps [B]; want_top
    a scalar bool: some row asked for top log-probs).

    Returns (tokens [B], raw logprobs [B], top ids [B, TOP_LOGPROBS], top logprobs
    [B, TOP_LOGPROBS], cache, seen [B, V]).
    """
    model = nnx.merge(graphdef, state)
    before_b = cache.lengths
    h_b1d, cache = model(
        tok_b[:, None],
        cache=cache,
        rope_alpha_b=alpha_b,
        logn=model.cfg.use_logn_attn,
        return_hidden=True,
        layers=layers,
    )
    cache = KVCache(cache.k, cache.v, cache.starts, jnp.where(active_b, cache.lengths, before_b))
    seen_bv = shard(seen_bv.at[jnp.arange(tok_b.shape[0]), tok_b].set(True), *ROWS_AXES)
    out = sample_rows(model.logits(h_b1d)[:, 0], knobs_bk, keys_b, steps_b, seen_bv, want_top)
    return (*out, cache.constrain(), seen_bv)


sample_first = jax.jit(sample_rows)  # a prefilled request's first token: sample_rows, batch 1


@functools.partial(jax.jit, donate_argnames=("x_b",))
def put_row(x_b, row, value):
    """x_b with row `row` replaced by `value` (one row of the serving batch's [B, V] state)."""
    return shard(x_b.at[row].set(value), *ROWS_AXES)


# ------------------------------------------------------------------------------- the engine


class Engine:
    """Generation over one model.

    Args:
      model: a `Qwen` (parameters may be sharded over `mesh`); its config's long-context
        switches apply (see `longctx.with_long_context` to override them).
      mesh: run under this mesh (the KV cache is sharded by the "cache_*" logical axes).
      max_context: the most positions a row may reach (prompt + new tokens); defaults to the
        config's max_position_embeddings. Dynamic NTK is what makes larger values sensible.
      donate: True (default) takes the model's weights: its stacked layer arrays are deleted
        as they are split into the engine's per-layer arrays, so one copy of the weights
        exists and `model` can no longer run (`Engine.model()` rebuilds one). False copies
        every weight and leaves `model` (and anything sharing its arrays, e.g. a training
        state) untouched.
    """

    def __init__(
        self,
        model: Qwen,
        *,
        mesh: Mesh | None = None,
        max_context: int | None = None,
        donate: bool = True,
    ):
        self.cfg = model.cfg
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        with self._mesh():
            self.state, self.layers = unstack_layers(state, donate=donate)
        self.max_context = max_context or self.cfg.max_position_embeddings

    def _mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def model(self) -> Qwen:
        """The full model (its stacked layer weights are rebuilt: a copy of the layers)."""
        with self._mesh():
            return nnx.merge(self.graphdef, restack_layers(self.state, self.layers))

    def refresh(self, params) -> None:
        """Put new weights into the engine in place: no rebuild, no recompilation.

        params: the model's parameters with stacked layers, as an `nnx.State` of Params (a
        training state's "params", `nnx.state(model, nnx.Param)`) or its pure dict. Every array
        must have the engine's shape and dtype (ValueError naming each mismatch); the values
        are copied into fresh buffers with the engine's shardings, one parameter at a time, so
        later training steps may donate `params` and the old weights are freed as they go.
        """
        new = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        new = jax.tree.map(lambda x: x.get_value() if isinstance(x, nnx.Variable) else x, new)
        held = nnx.to_pure_dict(self.state)
        self._check_refresh(new, held)
        with self._mesh():
            for name in held["blocks"]:
                parts = split_layers(new["blocks"][name])
                for layer, part in zip(self.layers, parts):
                    layer[name] = _like(part, layer[name])
            others = {k: v for k, v in new.items() if k != "blocks"}
            copied = copy_arrays(others)
            held.update(jax.tree.map(_like, copied, {k: held[k] for k in others}))
        state = jax.tree.map(lambda x: x, self.state)
        nnx.replace_by_pure_dict(state, held)
        self.state = state

    def _check_refresh(self, new: dict, held: dict) -> None:
        want = {k: v for k, v in held.items() if k != "blocks"}
        want["blocks"] = {k: (len(self.layers), *v.shape) for k, v in self.layers[0].items()}
        dtypes = {k: v.dtype for k, v in self.layers[0].items()}
        problems = []
        if set(new) != set(want) or set(new.get("blocks", {})) != set(want["blocks"]):
            problems.append(
                f"parameter names differ: engine has {sorted(want)} + blocks "
                f"{sorted(want['blocks'])}, got {sorted(new)} + blocks "
                f"{sorted(new.get('blocks', {}))}"
            )
        else:
            for k, v in want.items():
                if k == "blocks":
                    continue
                if new[k].shape != v.shape or new[k].dtype != v.dtype:
                    problems.append(
                        f"{k}: engine {v.shape} {v.dtype}, got {new[k].shape} {new[k].dtype}"
                    )
            for k, shape in want["blocks"].items():
                x = new["blocks"][k]
                if tuple(x.shape) != shape or x.dtype != dtypes[k]:
                    problems.append(
                        f"blocks.{k}: engine {shape} {dtypes[k]}, got {x.shape} {x.dtype}"
                    )
        if problems:
            raise ValueError(
                "refresh needs weights of the engine's shapes and dtypes (an int8 engine takes "
                "quantized weights): " + "; ".join(problems)
            )

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

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        cache_len: int | None = None,
        pad_prompts_to: int = 0,
    ):
        """Left-pad, bucket and prefill. Returns (last logits [Bp, V], KVCache (every row at
        length T, starts T - prompt length), padded tokens [Bp, T], mask [Bp, T], prompt lengths
        [Bp], alpha [Bp] or None); Bp, T are bucket sizes, T the bucket of the longest prompt
        or of `pad_prompts_to` if that is longer (a fixed T: one compiled prefill for a run)."""
        prompts = self._check(prompts)
        lengths = [len(p) for p in prompts]
        t = bucket_length(max(*lengths, pad_prompts_to))
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
            cache = new_cache(self.cfg, bp, cache_len, jnp.asarray(t - lengths_b))
            step = min(t, CHUNK)
            for c in range(0, t, step):
                logits_bv, cache = prefill_chunk(
                    self.graphdef,
                    self.state,
                    self.layers,
                    jnp.asarray(tokens[:, c : c + step]),
                    positions[:, c : c + step],
                    alpha_b,
                    cache,
                )
        return logits_bv, cache, tokens, mask, lengths_b, alpha_b

    def score(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Log-probabilities of each continuation's tokens after its prompt: one fp32 array
        [len(continuation)] per pair (reference scoring for PPO / DPO, likelihood evals).

        One forward over the right-padded, bucketed batch of prompt + continuation, without a
        cache; the head runs through `qwen_jax.model.logprobs.token_logprobs` (no [B, T, V]
        logits). Long-context switches apply as in `generate`, with the dynamic-NTK alpha taken
        from the prompt length, so scoring a generated continuation gives `generate`'s
        log-probs.
        """
        prompts = self._check(prompts)
        if len(continuations) != len(prompts):
            raise GenerationError(
                f"got {len(prompts)} prompts and {len(continuations)} continuations"
            )
        seqs = self._check([p + [int(t) for t in c] for p, c in zip(prompts, continuations)])
        t = bucket_length(max(map(len, seqs)))
        bp = bucket_batch(len(seqs))
        tokens = np.zeros((bp, t), np.int32)
        mask = np.zeros((bp, t), np.int32)
        for i, seq in enumerate(seqs):
            tokens[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        alpha_b = prefill_alpha(self.cfg, [len(p) for p in prompts] + [1] * (bp - len(prompts)))
        with self._mesh():
            logp_bt = score_logprobs(
                self.graphdef,
                self.state,
                self.layers,
                jnp.asarray(tokens),
                jnp.asarray(mask),
                alpha_b,
            )
        logp_bt = np.asarray(logp_bt)
        return [logp_bt[i, len(p) - 1 : len(s) - 1] for i, (p, s) in enumerate(zip(prompts, seqs))]

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
        pad_prompts_to: int = 0,
    ) -> list[Generation]:
        """Continue each prompt (token ids) by up to `max_new_tokens` tokens.

        A row ends at a token in `stop_ids`, when its text contains a string of `stop_strings`
        (needs `tokenizer`, used for `decode`), or when it runs out of budget: max_new_tokens,
        or fewer when the prompt is so long that max_context would be passed. `on_token`
        streams every generated token as it is produced (text deltas hold back anything that
        could still turn out to start a stop string). `pad_prompts_to` left-pads the prompts to
        at least that length's bucket (RL rollouts: prompts of any length up to it, with the
        same batch size, reuse one set of compiled programs; padding changes no result).
        """
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and tokenizer is None:
            raise GenerationError("stop strings need a tokenizer to decode the generated text")
        prompts = self._check(prompts)
        n = len(prompts)
        budgets = [min(max_new_tokens, self.max_context - len(p)) for p in prompts]
        steps = max(budgets)
        t = bucket_length(max(*(len(p) for p in prompts), pad_prompts_to))
        logits_bv, cache, tokens, mask, lengths_b, alpha_b = self.prefill(
            prompts, cache_len=bucket_length(t + steps), pad_prompts_to=pad_prompts_to
        )
        spec, knobs = sampling.spec(), sampling.knobs()
        key = jax.random.key(sampling.seed)
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
                        self.graphdef, spec, self.state, self.layers, tok_b, i,
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


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """x placed with ref's sharding (a no-op when it already has it): a refreshed weight must
    look exactly like the one it replaces, or the jitted steps would compile again."""
    return x if x.sharding == ref.sharding else jax.device_put(x, ref.sharding)
