"""The one place that picks a Pallas attention kernel for the platform and shards it.

`pallas_attention` is what `qwen_jax.model.attention.attention(impl="pallas")` calls. It runs
the TPU kernel on TPU, the GPU (Triton) kernel on GPU, and the TPU kernel in interpret mode on
CPU (slow; for tests: CPU configs default to impl="xla"). The platform is the active mesh's
(`block_sizes.current_chip`), so compiling for a TPU topology from a CPU host picks the TPU
kernel. Kernels are single-device programs, so under an active mesh the call is wrapped in
`jax.shard_map` over the batch and head axes named by the logical rules in qwen_jax.sharding
(the sequence axis stays whole: causal attention over a sharded sequence would need
ring/context parallelism, which this project does not use).

Only the training/prefill layout is served: T == S and q_slot == arange(T), which the model
guarantees whenever it has no KV cache (with a cache it always takes the XLA path). The kernels
derive positions from tile indices, so `q_slot_bt` is accepted for signature parity and unused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_jax.kernels.block_sizes import current_chip
from qwen_jax.sharding import current_mesh, logical_spec


def _kernel_for_platform():
    """The kernel for the platform being compiled for.

    That is the active mesh's device kind when there is one (so an ahead-of-time compile for a
    TPU topology from a CPU host gets the TPU kernel), else `jax.default_backend()`.
    """
    chip = current_chip()
    if chip == "gpu":
        from qwen_jax.kernels import flash_attention_gpu

        return flash_attention_gpu.flash_attention
    from qwen_jax.kernels import flash_attention_tpu

    if chip == "cpu":
        return functools.partial(flash_attention_tpu.flash_attention, interpret=True)
    return flash_attention_tpu.flash_attention


def default_attention_impl() -> str:
    """The `attention_impl` to use on the current platform: "pallas" on TPU and GPU, "xla" on CPU.

    (On CPU the kernels only run in interpret mode, which is for tests, not for speed.)
    """
    return "xla" if current_chip() == "cpu" else "pallas"


def pallas_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_slot_bt: jax.Array,
    q_segment_bt: jax.Array,
    kv_segment_bs: jax.Array,
    window: jax.Array | int = 0,
) -> jax.Array:
    """Flash attention with the model's mask semantics; returns [B,T,N,H] in q's dtype."""
    del q_slot_bt  # == arange(T) in the only layout served here (module docstring)
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    if t != s:
        raise ValueError(
            f"attention_impl='pallas' serves training/prefill without a KV cache (T == S); got "
            f"T={t}, S={s}. Decoding against a cache must use impl='xla' (the model does so)."
        )
    kernel = _kernel_for_platform()
    window = jnp.asarray(window, jnp.int32)

    def run(q, k, v, q_seg, kv_seg, w):
        return kernel(q, k, v, q_seg, window=w, kv_segment_ids_bt=kv_seg)

    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return run(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, window)

    q_spec = logical_spec("batch", None, "act_heads", None, shape=q_btnh.shape, mesh=mesh)
    kv_spec = logical_spec("batch", None, "act_kv_heads", None, shape=k_bskh.shape, mesh=mesh)
    if q_spec[2] != kv_spec[2]:
        # kv heads do not split like the query heads (e.g. 2 kv heads on a 4-way tensor axis):
        # give every query head its own copy of its kv head, which then shards identically.
        groups = q_btnh.shape[2] // k_bskh.shape[2]
        k_bskh, v_bskh = (jnp.repeat(x, groups, axis=2) for x in (k_bskh, v_bskh))
        kv_spec = q_spec
    seg_spec = logical_spec("batch", None, shape=q_segment_bt.shape, mesh=mesh)
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec, P()),
        out_specs=q_spec,
        # The kernels are opaque custom calls; there is nothing for the vma check to verify.
        check_vma=False,
    )
    return sharded(q_btnh, k_bskh, v_bskh, q_segment_bt, kv_segment_bs, window)
