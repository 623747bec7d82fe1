"""Device meshes and the ONE logical-axis rules table.

Model code names array axes logically ("embed", "heads", "batch", ...) and never mentions a mesh
axis. This module maps logical names to the mesh axes (`data`, `fsdp`, `tensor`) through `RULES`,
builds meshes from named presets, and turns parameter metadata into `NamedSharding`s.

A logical axis whose mesh axes do not divide the array dimension is replicated instead (e.g. two
kv heads on a 4-way tensor axis): GSPMD would otherwise pad, and `device_put` refuses outright.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (a tuple shards over their product, in order). One table for params
# and activations; activation-only names are prefixed "act_" where a param name would collide.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("act_seq", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
    # parameters
    ("layers", ()),
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("norm", ()),
    # KV cache
    ("cache_batch", ("data", "fsdp")),
    ("cache_seq", ()),
    ("cache_kv_heads", ("tensor",)),
)


def _check_rules(rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the rules table")
        unknown = set(axes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"logical axis {name!r} maps to unknown mesh axes {sorted(unknown)}")
        table[name] = tuple(axes)
    return table


_TABLE = _check_rules(RULES)


def mesh_axes_for(logical: Sequence[str | None]) -> list[tuple[str, ...]]:
    """Mesh axes of each logical name; raises if two dims would use one mesh axis (collision)."""
    out, used = [], {}
    for dim, name in enumerate(logical):
        if name is None:
            out.append(())
            continue
        if name not in _TABLE:
            raise KeyError(f"logical axis {name!r} is not in sharding.RULES ({sorted(_TABLE)})")
        axes = _TABLE[name]
        for a in axes:
            if a in used:
                raise ValueError(
                    f"logical axes {logical}: mesh axis {a!r} used by dim {used[a]} and dim {dim}"
                )
            used[a] = dim
        out.append(axes)
    return out


def logical_spec(
    *logical: str | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
) -> P:
    """PartitionSpec for logical axis names, dropping mesh axes of size 1 or that don't divide.

    `mesh` defaults to the active mesh (`jax.set_mesh`); with no mesh every axis is replicated.
    """
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None:
        return P(*([None] * len(logical)))
    spec = []
    for dim, axes in enumerate(mesh_axes_for(logical)):
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[dim] % size:
                axes = ()
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The (abstract) mesh installed by `jax.set_mesh`, or None outside one; valid inside jit."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def shard(x: jax.Array, *logical: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical axes; a no-op outside a mesh."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(*logical, shape=x.shape, mesh=mesh))


# --------------------------------------------------------------------------------- meshes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 in one axis takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        if dims.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide by {known} ({self})")
            dims[dims.index(-1)] = num_devices // known
        if math.prod(dims) != num_devices:
            raise ValueError(f"mesh {dims} needs {math.prod(dims)} devices, have {num_devices}")
        return tuple(dims)


MESH_PRESETS: dict[str, MeshConfig] = {
    "dp": MeshConfig(data=-1, fsdp=1, tensor=1),  # pure data parallel, params replicated
    "fsdp": MeshConfig(data=1, fsdp=-1, tensor=1),  # ZeRO-3 style: params sharded on "embed"
    "fsdp_tp": MeshConfig(data=1, fsdp=-1, tensor=4),  # FSDP x 4-way tensor (Megatron) parallel
}


def make_mesh(cfg: MeshConfig | str = "fsdp", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over (data, fsdp, tensor) with Auto axis types (GSPMD propagation)."""
    if isinstance(cfg, str):
        if cfg not in MESH_PRESETS:
            raise KeyError(f"unknown mesh preset {cfg!r}; choose from {sorted(MESH_PRESETS)}")
        cfg = MESH_PRESETS[cfg]
    devices = list(devices if devices is not None else jax.devices())
    shape = cfg.resolve(len(devices))
    if devices[0].platform == "cpu":
        grid = np.asarray(devices).reshape(shape)
    else:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def sharding_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(*logical, shape=shape, mesh=mesh))


def tree_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for an nnx.State of abstract Variables (logical axes in `out_sharding`).

    Variables without axis metadata (e.g. scalars, RNG counts) are replicated.
    """
    from flax import nnx

    def one(var):
        if not isinstance(var, nnx.Variable):
            return sharding_for((None,) * len(var.shape), var.shape, mesh)
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") or (None,) * len(value.shape)
        return var.replace(sharding_for(axes, value.shape, mesh))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
