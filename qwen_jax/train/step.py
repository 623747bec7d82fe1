"""Pure, jitted train and eval steps over a TrainState pytree.

A batch holds the seqio decoder features, int32 [B, T]: decoder_input_tokens,
decoder_target_tokens, decoder_loss_weights, decoder_segment_ids, decoder_positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qwen_jax.model.transformer import Qwen
from qwen_jax.train.losses import chunked_cross_entropy

TrainState = dict[str, Any]  # {"params": nnx.State, "opt_state": optax state, "step": int32}
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    microbatches: int = 1  # gradient accumulation: the batch is split along B
    z_loss: float = 0.0
    loss_chunk: int = 256  # sequence positions per cross-entropy block


def init_state(model: Qwen, tx: optax.GradientTransformation) -> TrainState:
    params = nnx.state(model, nnx.Param)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _loss_sums(graphdef, params, batch: Batch, cfg: StepConfig):
    """(sum ce, sum z, sum weights) of one (micro)batch."""
    model = nnx.merge(graphdef, params)
    h, _ = model(
        batch["decoder_input_tokens"],
        positions_bt=batch["decoder_positions"],
        segment_ids_bt=batch["decoder_segment_ids"],
        return_hidden=True,
    )
    return chunked_cross_entropy(
        h,
        model.head_weight().astype(h.dtype),
        batch["decoder_target_tokens"],
        batch["decoder_loss_weights"],
        chunk=cfg.loss_chunk,
        z_loss=cfg.z_loss,
        matmul_impl=model.cfg.matmul_impl,
    )


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig):
    """Return step(state, batch) -> (state, metrics).

    loss = (sum_mb sum_t w*ce) / (sum_mb sum_t w): microbatch gradients of the summed loss are
    accumulated in fp32 and divided by the total weight once, so accumulation is exact (the
    result does not depend on how the batch is split). z-loss is added to the objective.
    """

    def grads_of(params, mb):
        def objective(p):
            ce, z, w = _loss_sums(graphdef, p, mb, cfg)
            return ce + z, (ce, z, w)

        return jax.grad(objective, has_aux=True)(params)

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        n = cfg.microbatches
        if n == 1:
            grads, (ce, z, w) = grads_of(params, batch)
        else:
            split = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

            def body(acc, mb):
                g, sums = grads_of(params, mb)
                return jax.tree.map(jnp.add, acc, (g, sums)), None

            zeros = (
                jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                (jnp.zeros((), jnp.float32),) * 3,
            )
            (grads, (ce, z, w)), _ = jax.lax.scan(body, zeros, split)
        denom = jnp.maximum(w, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": ce / denom,
            "z_loss": z / denom,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_params),
            "tokens": w,
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return step


def make_eval_step(graphdef, cfg: StepConfig):
    """Return eval(params, batch) -> {"loss_sum", "weight_sum"} (sums; divide after the loop)."""

    def evaluate(params, batch: Batch):
        ce, _, w = _loss_sums(graphdef, params, batch, cfg)
        return {"loss_sum": ce, "weight_sum": w}

    return evaluate
