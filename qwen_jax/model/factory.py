"""State lifecycle: abstract model -> shardings -> one jitted, directly sharded init.

Full-size presets are only ever built abstractly here (`abstract_model`), never allocated. With
cfg.lora_int8_base the model is built with its dense block weights int8 (quantize.quantize_int8
with head=False: the Q-LoRA-style frozen base), abstractly and for real alike.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from qwen_jax.model.config import QwenConfig
from qwen_jax.model.quantize import quantize_int8
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import tree_shardings


def _build(cfg: QwenConfig, seed: int) -> Qwen:
    model = Qwen(cfg, rngs=nnx.Rngs(seed))
    return quantize_int8(model, head=False) if cfg.lora_int8_base else model


def _counted(path, x) -> bool:
    return isinstance(x, nnx.Param) and not str(path[-1]).endswith("_scale")


def abstract_model(cfg: QwenConfig, seed: int = 0) -> Qwen:
    """The model with ShapeDtypeStruct leaves: shapes, dtypes and axis metadata, no memory."""
    return nnx.eval_shape(lambda: _build(cfg, seed))


def param_count(cfg: QwenConfig) -> int:
    """Parameters counted from the abstract model (nothing allocated); int8 scales are
    quantization metadata, not parameters (QwenConfig.num_params)."""
    state = nnx.state(abstract_model(cfg), _counted)
    return sum(x.size for x in jax.tree.leaves(state))


def state_shardings(model: Qwen, mesh: Mesh):
    """An nnx.State of NamedShardings matching `nnx.state(model)` (from logical axis metadata)."""
    return tree_shardings(nnx.state(model), mesh)


def create_model(cfg: QwenConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Qwen:
    """Initialise parameters; under `mesh` each is created directly in its sharding."""
    if mesh is None:
        return _build(cfg, seed)
    graphdef, abstract_state = nnx.split(abstract_model(cfg, seed))
    shardings = tree_shardings(abstract_state, mesh)

    @jax.jit(out_shardings=shardings)
    def init():
        return nnx.state(_build(cfg, seed))

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)
