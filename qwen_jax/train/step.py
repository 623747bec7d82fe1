"""The one train step and eval step, pure and jitted, for any `Objective` (objectives.py).

`build_steps` turns (TrainConfig, model config, mesh) into a frozen `Steps`: the abstract state,
its shardings, per-feature batch shardings and the jitted init / train / eval functions. The
loop, `qwen-jax compile`, the bench and the tests all use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import logical_spec, tree_shardings
from qwen_jax.train.objectives import Batch, Objective, make_objective
from qwen_jax.train.optim import make_optimizer

if TYPE_CHECKING:
    from qwen_jax.train.config import TrainConfig

TrainState = dict[str, Any]  # {"params": nnx.State, "opt_state": optax state, "step": int32}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    microbatches: int = 1  # gradient accumulation: the batch is split along B


def new_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    """A training state around `params`: a fresh optimizer state and step 0."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def init_state(model: Qwen, tx: optax.GradientTransformation) -> TrainState:
    """`new_state` of a model's parameters."""
    return new_state(nnx.state(model, nnx.Param), tx)


def abstract_train_state(
    model_cfg: QwenConfig, tx: optax.GradientTransformation, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef of the model's Params, the state as ShapeDtypeStructs with logical-axis
    metadata): built from one abstract model, nothing allocated."""
    graphdef, params = nnx.split(abstract_model(model_cfg, seed=seed), nnx.Param)
    return graphdef, jax.eval_shape(lambda p: new_state(p, tx), params)


def make_train_step(
    graphdef, tx: optax.GradientTransformation, objective: Objective, microbatches: int = 1
):
    """Return step(state, batch) -> (state, metrics).

    With (o, m, W) the objective, metric and weight sums over the microbatches mb:
      grads = (sum_mb d o_mb / d params) / W,  metrics[k] = (sum_mb m_k) / W,
    so accumulation is exact (the result does not depend on how the batch is split): the sums
    are accumulated in fp32 and divided by the total weight once. Metrics also hold W itself
    (under the objective's `weight_name`), the norm of the averaged gradient (before the
    optimizer clips it) and the norm of the updated parameters.
    """
    weight = objective.weight_name

    def grads_of(params, mb):
        def f(p):
            return objective.loss_sums(nnx.merge(graphdef, p), mb)

        return jax.grad(f, has_aux=True)(params)

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        if microbatches == 1:
            grads, sums = grads_of(params, batch)
        else:
            n = microbatches
            split = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
            first = jax.eval_shape(grads_of, params, jax.tree.map(lambda x: x[0], split))

            def body(acc, mb):
                return jax.tree.map(jnp.add, acc, grads_of(params, mb)), None

            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), first)
            (grads, sums), _ = jax.lax.scan(body, zeros, split)
        denom = jnp.maximum(sums[weight], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {k: (v if k == weight else v / denom) for k, v in sums.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new_params)
        new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    return step


def make_eval_step(graphdef, objective: Objective):
    """Return eval(params, batch) -> the objective's metric sums (divide by the weight sum
    after the loop over eval batches)."""

    def evaluate(params, batch: Batch):
        return objective.loss_sums(nnx.merge(graphdef, params), batch)[1]

    return evaluate


@dataclasses.dataclass(frozen=True)
class Steps:
    """Everything built for one (config, model config, mesh): what the loop, AOT and the bench
    share. `init()` materialises the state directly sharded; `init_with(params)` starts a fresh
    state (new optimizer, step 0) from given params (donated); `train(state, batch)` donates the
    state; `evaluate(params, batch)` returns metric sums."""

    objective: Objective
    mesh: Mesh
    abstract_state: TrainState  # ShapeDtypeStructs, no shardings
    state_shardings: TrainState
    batch_shardings: Mapping[str, NamedSharding]  # per feature
    init: Callable[[], TrainState]
    init_with: Callable[[Any], TrainState]
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[Any, Batch], dict[str, jax.Array]]

    def sharded_abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the target of a restore, the input of AOT."""
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )

    def abstract_batch(self, batch: int, seq_len: int) -> Batch:
        """The objective's global batch as sharded ShapeDtypeStructs."""
        return {
            k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.batch_shardings[k])
            for k, a in self.objective.abstract_batch(batch, seq_len).items()
        }

    def device_batch(self, local: Mapping[str, np.ndarray]) -> Batch:
        """This process's rows of every feature -> global arrays (rows concatenated in process
        order)."""
        return {
            k: jax.make_array_from_process_local_data(sh, np.asarray(local[k]))
            for k, sh in self.batch_shardings.items()
        }


def build_steps(
    config: TrainConfig,
    model_cfg: QwenConfig,
    mesh: Mesh,
    objective: Objective | None = None,
) -> Steps:
    """The abstract state, shardings and jitted steps of `config` on `mesh`.

    `objective` defaults to `make_objective(config.objective)`.
    """
    objective = objective or make_objective(config.objective)
    tx = make_optimizer(config.optim)
    graphdef, abstract = abstract_train_state(model_cfg, tx, seed=config.run.seed)
    state_sh = tree_shardings(abstract, mesh)
    row = logical_spec("batch", mesh=mesh)  # per-example features [B]
    rows_by_pos = logical_spec("batch", None, mesh=mesh)  # per-token features [B, T]
    batch_sh = {
        f.name: NamedSharding(mesh, rows_by_pos if f.per_token else row) for f in objective.features
    }

    def init():
        return init_state(Qwen(model_cfg, rngs=nnx.Rngs(config.run.seed)), tx)

    return Steps(
        objective=objective,
        mesh=mesh,
        abstract_state=abstract,
        state_shardings=state_sh,
        batch_shardings=batch_sh,
        init=jax.jit(init, out_shardings=state_sh),
        init_with=jax.jit(
            lambda params: new_state(params, tx),
            in_shardings=(state_sh["params"],),
            out_shardings=state_sh,
            donate_argnums=0,
        ),
        train=jax.jit(
            make_train_step(graphdef, tx, objective, config.step.microbatches),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        ),
        evaluate=jax.jit(
            make_eval_step(graphdef, objective), in_shardings=(state_sh["params"], batch_sh)
        ),
    )
