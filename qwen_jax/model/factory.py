"""State lifecycle: abstract model -> shardings -> one jitted, directly sharded init.

Full-size presets are only ever built abstractly here (`abstract_model`), never allocated.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import tree_shardings


def abstract_model(cfg: QwenConfig, seed: int = 0) -> Qwen:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and axis metadata, no memory."""
    return nnx.eval_shape(lambda: Qwen(cfg, rngs=nnx.Rngs(seed)))


def param_count(cfg: QwenConfig) -> int:
    """Parameters counted from the abstract model (nothing allocated)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(x.size for x in jax.tree.leaves(state))


def state_shardings(model: Qwen, mesh: Mesh):
    """An nnx.State of NamedShardings matching `nnx.state(model)` (from logical axis metadata)."""
    return tree_shardings(nnx.state(model), mesh)


def create_model(cfg: QwenConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Qwen:
    """Initialise parameters; under `mesh` each is created directly in its sharding."""
    if mesh is None:
        return Qwen(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract_state = nnx.split(abstract_model(cfg, seed))
    shardings = tree_shardings(abstract_state, mesh)

    @jax.jit(out_shardings=shardings)
    def init():
        return nnx.state(Qwen(cfg, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)
