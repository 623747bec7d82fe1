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

from qwen_jax.model import lora
from qwen_jax.model.config import QwenConfig
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import logical_spec, tree_shardings
from qwen_jax.train.objectives import Batch, Objective, StepContext, make_objective
from qwen_jax.train.optim import make_optimizer

if TYPE_CHECKING:
    from qwen_jax.train.config import TrainConfig

# {"params": the trained parameters, "opt_state": optax state over them, "step": int32} and,
# when the run has them, "frozen": parameters held fixed (LoRA's base model, possibly int8) and
# "reference": a frozen copy of the starting weights (DPO's reference model, without LoRA).
TrainState = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    microbatches: int = 1  # gradient accumulation: the batch is split along B


def base_config(model_cfg: QwenConfig) -> QwenConfig:
    """The architecture without what training adds (adapters, a reward head): the shape of the
    weights a run starts from (`init_from`) and of what it exports after merging."""
    return model_cfg.replace(lora_rank=0, lora_targets=(), lora_int8_base=False, reward_head=False)


def prepared(model: Qwen) -> Qwen:
    """The model as training holds it: with LoRA and `lora_int8_base`, the frozen base's dense
    block weights quantized to int8 (the head stays float: the loss needs its weights)."""
    if model.cfg.lora_rank and model.cfg.lora_int8_base:
        from qwen_jax.model.quantize import quantize_int8

        return quantize_int8(model, head=False)
    return model


def split_model(model: Qwen) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained params, frozen params or None) of a prepared model."""
    if not model.cfg.lora_rank:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, params, None
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(model.cfg), ...)
    return graphdef, params, frozen


def new_state(
    params: nnx.State,
    tx: optax.GradientTransformation,
    frozen: nnx.State | None = None,
    reference: nnx.State | None = None,
) -> TrainState:
    """A training state around `params`: a fresh optimizer state and step 0 (+ the frozen
    parameters and the reference weights when given)."""
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if frozen is not None:
        state["frozen"] = frozen
    if reference is not None:
        state["reference"] = reference
    return state


def model_state(
    model: Qwen, tx: optax.GradientTransformation, objective: Objective | None = None
) -> TrainState:
    """The training state of a (prepared) model. An objective that needs a reference model and
    a run without a frozen base keeps a copy of the starting weights (with LoRA the reference
    is the base itself: the policy with its adapters off, `reference_model`)."""
    _, params, frozen = split_model(model)
    reference = None
    if objective is not None and objective.needs_reference and frozen is None:
        reference = jax.tree.map(jnp.copy, params)
    return new_state(params, tx, frozen, reference)


def init_state(model: Qwen, tx: optax.GradientTransformation) -> TrainState:
    """`new_state` of a model's parameters (all trained)."""
    return new_state(nnx.state(model, nnx.Param), tx)


def abstract_train_state(
    model_cfg: QwenConfig,
    tx: optax.GradientTransformation,
    seed: int = 0,
    objective: Objective | None = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef of the model's Params, the state as ShapeDtypeStructs with logical-axis
    metadata): built from one abstract model, nothing allocated."""
    model = nnx.eval_shape(lambda: prepared(Qwen(model_cfg, rngs=nnx.Rngs(seed))))
    graphdef, params, frozen = split_model(model)
    needs_copy = objective is not None and objective.needs_reference and frozen is None
    reference = params if needs_copy else None
    return graphdef, jax.eval_shape(
        lambda p, f, r: new_state(p, tx, f, r), params, frozen, reference
    )


def _model(graphdef, state: TrainState, params=None) -> Qwen:
    """The model of a state (its trained params replaced by `params` when given)."""
    params = state["params"] if params is None else params
    if "frozen" in state:
        return nnx.merge(graphdef, params, state["frozen"])
    return nnx.merge(graphdef, params)


def reference_model(graphdef, state: TrainState) -> Qwen:
    """The frozen reference: the copy of the starting weights, or with LoRA the base model
    (every trained parameter zeroed: a zero adapter adds nothing)."""
    if "reference" in state:
        return nnx.merge(graphdef, state["reference"])
    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    return nnx.merge(graphdef, zeros, state["frozen"])


def _dropout_on(model_cfg: QwenConfig) -> bool:
    return model_cfg.dropout > 0 or (model_cfg.lora_rank > 0 and model_cfg.lora_dropout > 0)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    objective: Objective,
    microbatches: int = 1,
    *,
    dropout_seed: int | None = None,
):
    """Return step(state, batch) -> (state, metrics).

    With (o, m, W) the objective, metric and weight sums over the microbatches mb:
      grads = (sum_mb d o_mb / d params) / W,  metrics[k] = (sum_mb m_k) / W,
    so accumulation is exact (the result does not depend on how the batch is split): the sums
    are accumulated in fp32 and divided by the total weight once. Metrics also hold W itself
    (under the objective's `weight_name`), the norm of the averaged gradient (before the
    optimizer clips it) and the norm of the updated parameters.

    dropout_seed: None = no dropout; else microbatch i of step s draws its dropout masks from
    fold_in(fold_in(key(seed), s), i): a resumed run draws the same masks.
    """
    weight = objective.weight_name

    def grads_of(state, mb, i):
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(
                jax.random.fold_in(jax.random.key(dropout_seed), state["step"]), i
            )
        reference = reference_model(graphdef, state) if objective.needs_reference else None
        ctx = StepContext(rng=rng, reference=reference)

        def f(p):
            return objective.loss_sums(_model(graphdef, state, p), mb, ctx)

        return jax.grad(f, has_aux=True)(state["params"])

    def step(state: TrainState, batch: Batch):
        params = state["params"]
        if microbatches == 1:
            grads, sums = grads_of(state, batch, 0)
        else:
            n = microbatches
            split = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
            first = jax.eval_shape(grads_of, state, jax.tree.map(lambda x: x[0], split), 0)

            def body(acc, xs):
                mb, i = xs
                return jax.tree.map(jnp.add, acc, grads_of(state, mb, i)), None

            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), first)
            (grads, sums), _ = jax.lax.scan(body, zeros, (split, jnp.arange(n)))
        denom = jnp.maximum(sums[weight], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {k: (v if k == weight else v / denom) for k, v in sums.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(new_params)
        new_state = {**state, "params": new_params, "opt_state": opt_state}
        new_state["step"] = state["step"] + 1
        return new_state, metrics

    return step


def make_eval_step(graphdef, objective: Objective):
    """Return eval(state, batch) -> the objective's metric sums (divide by the weight sum
    after the loop over eval batches). No dropout."""

    def evaluate(state: TrainState, batch: Batch):
        reference = reference_model(graphdef, state) if objective.needs_reference else None
        ctx = StepContext(rng=None, reference=reference)
        return objective.loss_sums(_model(graphdef, state), batch, ctx)[1]

    return evaluate


@dataclasses.dataclass(frozen=True)
class Steps:
    """Everything built for one (config, model config, mesh): what the loop, AOT and the bench
    share. `init()` materialises the state directly sharded; `init_with(base)` starts a fresh
    state (new optimizer, step 0) from the weights of the base model (`base_config`: without
    adapters or a reward head, which start fresh), donating them; `train(state, batch)` donates
    the state; `evaluate(state, batch)` returns metric sums."""

    objective: Objective
    mesh: Mesh
    abstract_state: TrainState  # ShapeDtypeStructs, no shardings
    state_shardings: TrainState
    base_params: nnx.State  # the base model's params: sharded ShapeDtypeStructs (init_with's)
    batch_shardings: Mapping[str, NamedSharding]  # per feature
    init: Callable[[], TrainState]
    init_with: Callable[[Any], TrainState]
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    evaluate: Callable[[TrainState, Batch], dict[str, jax.Array]]

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
    seed = config.run.seed
    graphdef, abstract = abstract_train_state(model_cfg, tx, seed=seed, objective=objective)
    state_sh = tree_shardings(abstract, mesh)
    base_abstract = nnx.state(abstract_model(base_config(model_cfg), seed=seed), nnx.Param)
    base_sh = tree_shardings(base_abstract, mesh)
    row = logical_spec("batch", mesh=mesh)  # per-example features [B]
    rows_by_pos = logical_spec("batch", None, mesh=mesh)  # per-token features [B, T]
    batch_sh = {
        f.name: NamedSharding(mesh, rows_by_pos if f.per_token else row) for f in objective.features
    }

    def init():
        return model_state(prepared(Qwen(model_cfg, rngs=nnx.Rngs(seed))), tx, objective)

    def init_with(base):
        # Fresh adapters / reward head (their random init), then the given weights on top: the
        # overwritten random base weights are dead code XLA drops.
        model = Qwen(model_cfg, rngs=nnx.Rngs(seed))
        nnx.update(model, base)
        return model_state(prepared(model), tx, objective)

    dropout_seed = seed if _dropout_on(model_cfg) else None
    return Steps(
        objective=objective,
        mesh=mesh,
        abstract_state=abstract,
        state_shardings=state_sh,
        base_params=jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), base_abstract, base_sh
        ),
        batch_shardings=batch_sh,
        init=jax.jit(init, out_shardings=state_sh),
        init_with=jax.jit(
            init_with, in_shardings=(base_sh,), out_shardings=state_sh, donate_argnums=0
        ),
        train=jax.jit(
            make_train_step(
                graphdef, tx, objective, config.step.microbatches, dropout_seed=dropout_seed
            ),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        ),
        evaluate=jax.jit(make_eval_step(graphdef, objective), in_shardings=(state_sh, batch_sh)),
    )
