"""The rollout engine's programs of one RL iteration, lowered from abstract inputs (AOT).

`RolloutEngine` (rl/rollout.py) runs qwen_jax.infer.engine's jitted steps on its own copy of
the policy's weights (donate=False: per-layer arrays, the stacked block parameters split one
array per layer). An iteration's rollout of N = prompts_per_step x samples_per_prompt rows
calls, always at the same shapes (Bp = bucket_batch(N) rows, prompts left-padded to
Tp = bucket_length(max_prompt_len), chunk C = min(Tp, CHUNK), cache S = bucket_length(Tp +
max_new_tokens)):
    rollout_new_cache    the empty KV cache [Bp, S] (new_cache)
    rollout_prefill      one prompt chunk [Bp, C] into the cache (prefill_chunk; Tp / C calls)
    rollout_first_token  sample the first response token from the prefill's logits [Bp, V]
    rollout_decode       one token per row through the cache + sampling (decode_step)
`rollout_programs` lowers each with the abstract engine weights and cache, sharded as the
engine holds them (the weights as the training params, the cache by the "cache_*" rules), so
`qwen-jax compile` of an RL experiment compiles what `generate` runs. Host inputs (prompt
tokens, positions, sampling knobs, the key) are replicated. `engine_abstract` is the engine's
resident weight copy (per-device bytes for the HBM total).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen_jax.infer import engine as eng
from qwen_jax.infer.longctx import with_long_context
from qwen_jax.infer.sampling import SamplingParams
from qwen_jax.model.cache import KVCache


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def engine_abstract(graphdef, params_abstract, mesh: Mesh):
    """(engine graphdef, state, layers) of a RolloutEngine built on `params_abstract` (a
    training state's sharded abstract "params"): the same long-context view and layer split as
    the engine, as ShapeDtypeStructs. Per-layer arrays keep the stacked array's sharding minus
    its (unsharded) layer axis, as `unstack_layers` leaves them."""
    model = with_long_context(nnx.merge(graphdef, params_abstract), ntk=False, logn=False)
    egraphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    stacked = pure["blocks"]
    layers_n = next(iter(stacked.values())).shape[0]
    layers: list[dict] = [{} for _ in range(layers_n)]
    rep = NamedSharding(mesh, PartitionSpec())
    for name, x in stacked.items():
        spec = tuple(x.sharding.spec) + (None,) * (len(x.shape) - len(x.sharding.spec))
        if spec[0] is not None:  # the engine would gather it per layer: not what runs
            raise ValueError(f"blocks.{name}: the layer axis is sharded ({spec[0]})")
        part = NamedSharding(mesh, PartitionSpec(*spec[1:]))
        for layer in layers:
            layer[name] = _struct(x.shape[1:], x.dtype, part)
    pure["blocks"] = {k: _struct((0,), v.dtype, rep) for k, v in stacked.items()}
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return egraphdef, state, layers


def rollout_programs(rl, mesh: Mesh) -> tuple[dict[str, jax.stages.Lowered], object]:
    """(name -> Lowered of each engine program an iteration runs (module docstring), the
    engine's abstract resident weights (state, layers)) for `rl` (algo.RL, load=False).
    Call outside a mesh context: this enters `mesh` itself."""
    cfg_rl = rl.rl
    rows = cfg_rl.prompts_per_step * cfg_rl.samples_per_prompt
    bp = eng.bucket_batch(rows)
    tp = eng.bucket_length(cfg_rl.max_prompt_len)
    chunk = min(tp, eng.CHUNK)
    cache_len = eng.bucket_length(tp + cfg_rl.max_new_tokens)
    sampling = SamplingParams(temperature=cfg_rl.temperature, top_p=cfg_rl.top_p)
    spec = sampling.spec()
    rep = NamedSharding(mesh, PartitionSpec())
    knobs = _struct((3,), jnp.float32, rep)
    key = _struct((), jax.random.key(0).dtype, rep)
    out: dict[str, jax.stages.Lowered] = {}
    with jax.set_mesh(mesh):
        graphdef, state, layers = engine_abstract(rl.graphdef, rl.policy_abstract["params"], mesh)
        cfg = nnx.merge(graphdef, state).cfg  # the engine's config (long-context switches off)
        starts = _struct((bp,), jnp.int32, rep)
        cache = jax.eval_shape(lambda s: KVCache.init(cfg, bp, cache_len, starts_b=s), starts)
        cache = jax.tree.map(
            lambda a, s: _struct(a.shape, a.dtype, s), cache, cache.shardings(mesh)
        )
        out["rollout_new_cache"] = eng.new_cache.lower(cfg, bp, cache_len, starts)
        tokens_c = _struct((bp, chunk), jnp.int32, rep)
        prefill = eng.prefill_chunk.lower(graphdef, state, layers, tokens_c, tokens_c, None, cache)
        out["rollout_prefill"] = prefill
        logits = jax.tree.leaves(prefill.out_info)[0]
        logits = _struct(logits.shape, logits.dtype, rep)
        tokens_t = _struct((bp, tp), jnp.int32, rep)
        out["rollout_first_token"] = eng.first_token.lower(
            logits, tokens_t, tokens_t, key, knobs, spec, cfg.vocab_size
        )
        tok_b = _struct((bp,), jnp.int32, rep)
        step = _struct((), jnp.int32, rep)
        seen = _struct((bp, cfg.vocab_size), jnp.bool_, rep) if spec.penalty else None
        out["rollout_decode"] = eng.decode_step.lower(
            graphdef, spec, state, layers, tok_b, step, None, cache, seen, key, knobs
        )
    return out, (state, layers)
