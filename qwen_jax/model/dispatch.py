"""The one place that chooses the attention implementation and the Pallas kernels, and shards them.

The model calls two attention entry points and one matmul, and never picks an implementation
itself:
  * `attention`: no KV cache (training, scoring; T == S, packed segment ids). "xla" is
    `qwen_jax.model.attention`'s einsum path, "pallas" the flash kernel (`pallas_attention`).
  * `cache_attention`: T new tokens per row against a KV cache (qwen_jax.model.cache: per-row
    starts and query slots). With attention_impl="pallas" and T == 1 (a decode step) it runs the
    Pallas decode kernel, fed each row's length and start; otherwise (prefill into a cache, or
    "xla") the XLA path with `attention.cache_mask`. Prefill into a cache stays on XLA: its
    queries sit at per-row offsets into a longer cache, a layout neither kernel serves.
  * `matmul`: the dense projections (q/k/v/o, MLP, LM head) when `matmul_impl="pallas"`.
On TPU they run the TPU (Mosaic) kernels, on GPU the Triton kernels, and on CPU the TPU kernels
in interpret mode (slow; for tests: CPU configs default to "xla"). The platform is the active
mesh's (`block_sizes.current_chip`), so compiling for a TPU topology from a CPU host picks the TPU
kernel. Kernels are single-device programs, so under an active multi-device mesh each call is
wrapped in `jax.shard_map` over the axes named by the logical rules in qwen_jax.sharding.

Attention (flash and decode) shards over batch and heads; the sequence axis stays whole (causal
attention over a sharded sequence would need ring/context parallelism, which this project does
not use). The flash kernel serves T == S with q_slot == arange(T), which the model guarantees
whenever it has no KV cache; the kernels derive positions from tile indices, so `q_slot_bt` is
accepted for signature parity and unused.

Matmul: x's leading axis is the batch and is split over the mesh; the weight must be replicated.
A weight that the rules table shards (FSDP's "embed", tensor parallelism's heads / mlp / vocab)
is refused with a ValueError naming matmul_impl rather than gathered on every call, which would
silently undo the sharding. So matmul_impl="pallas" runs single-device or data-parallel (the "dp"
mesh preset); with FSDP or tensor parallelism use "xla". The weight's logical axes are read from
the einsum's letters (the legend of qwen_jax.model.config: d embed, n heads, k kv heads,
h head dim, f mlp, v vocab). On CPU the matmul runs in the HLO interpreter rather than the TPU
simulator (reasons at `matmul`). "xla" stays the default everywhere: on the H200 the tiled kernel
reached 0.85 of XLA's (cuBLAS) bf16 matmul (WORKSPACE.md), and no TPU has timed it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen_jax.kernels.block_sizes import current_chip
from qwen_jax.model.attention import attention_mask, cache_mask, xla_attention
from qwen_jax.sharding import current_mesh, logical_spec

# Einsum letter of a weight axis -> its logical parameter axis (qwen_jax.sharding.RULES).
_WEIGHT_AXES = {
    "d": "embed",
    "n": "heads",
    "k": "kv_heads",
    "h": "head_dim",
    "f": "mlp",
    "v": "vocab",
}


def _backend() -> tuple[str, bool]:
    """(kernel backend, interpret) for the platform being compiled for."""
    chip = current_chip()
    if chip == "gpu":
        return "gpu", False
    return "tpu", chip == "cpu"


def _multi_device_mesh():
    mesh = current_mesh()
    return None if mesh is None or mesh.size == 1 else mesh


# ------------------------------------------------------------------ flash (training/prefill)


def _kernel_for_platform():
    """The flash kernel for the platform being compiled for.

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
            f"T={t}, S={s}. Decoding against a cache goes through dispatch.decode_attention "
            "(T == 1); prefill into a cache uses impl='xla' (the model does both)."
        )
    kernel = _kernel_for_platform()
    window = jnp.asarray(window, jnp.int32)

    def run(q, k, v, q_seg, kv_seg, w):
        return kernel(q, k, v, q_seg, window=w, kv_segment_ids_bt=kv_seg)

    mesh = _multi_device_mesh()
    if mesh is None:
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


# --------------------------------------------------------------------- the model's entries


def attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    impl: str,
    q_slot_bt: jax.Array,
    q_segment_bt: jax.Array,
    kv_segment_bs: jax.Array,
    window: jax.Array | int = 0,
) -> jax.Array:
    """Attention without a KV cache (T == S): segment/causal/window mask, [B,T,N,H] out.

    impl "xla": `attention.xla_attention` with `attention.attention_mask`; "pallas": the flash
    kernel (`pallas_attention`).
    """
    if impl == "xla":
        mask = attention_mask(q_slot_bt, q_segment_bt, kv_segment_bs, window)
        return xla_attention(q_btnh, k_bskh, v_bskh, mask)
    if impl == "pallas":
        return pallas_attention(
            q_btnh,
            k_bskh,
            v_bskh,
            q_slot_bt=q_slot_bt,
            q_segment_bt=q_segment_bt,
            kv_segment_bs=kv_segment_bs,
            window=window,
        )
    raise ValueError(f"unknown attention impl {impl!r}; expected 'xla' or 'pallas'")


def cache_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    impl: str,
    q_slot_bt: jax.Array,
    starts_b: jax.Array,
    window: jax.Array | int = 0,
) -> jax.Array:
    """T new tokens per row against a KV cache whose buffers already hold them; [B,T,N,H] out.

    q_slot_bt [B, T]: each query's cache slot (rows may differ); starts_b [B]: each row's first
    valid slot. impl "pallas" with T == 1 runs the decode kernel (`decode_attention`);
    everything else the XLA path with `attention.cache_mask`.
    """
    if impl not in ("xla", "pallas"):
        raise ValueError(f"unknown attention impl {impl!r}; expected 'xla' or 'pallas'")
    if impl == "pallas" and q_btnh.shape[1] == 1:
        return decode_attention(
            q_btnh, k_bskh, v_bskh, q_slot_b=q_slot_bt[:, 0], starts_b=starts_b, window=window
        )
    mask = cache_mask(q_slot_bt, starts_b, k_bskh.shape[1], window)
    return xla_attention(q_btnh, k_bskh, v_bskh, mask)


# ------------------------------------------------------------------------------------ decode


def decode_attention(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    *,
    q_slot_b: jax.Array,
    starts_b: jax.Array,
    window: jax.Array | int = 0,
) -> jax.Array:
    """One new token per row against a KV cache; returns [B,1,N,H] in q's dtype.

    q [B,1,N,H]; k/v [B,S,K,H] the cache with row b's new token already written at slot
    q_slot_b[b] (rows may sit at different slots); starts_b [B] the first valid slot of each
    row. Row b attends to slots [max(start_b, q_slot_b + 1 - window), q_slot_b], the model's
    cache mask (`attention.cache_mask`); the kernel gets lengths q_slot_b + 1.
    """
    b, t, n, h = q_btnh.shape
    if t != 1:
        raise ValueError(f"decode_attention takes one new token per row (T == 1), got T={t}")
    from qwen_jax.kernels import decode_attention as da

    backend, interpret = _backend()
    lengths_b = q_slot_b.astype(jnp.int32) + 1
    window = jnp.asarray(window, jnp.int32)

    def run(q, k, v, lengths, starts, w):
        return da.decode_attention(
            q, k, v, lengths, window=w, starts_b=starts, backend=backend, interpret=interpret
        )

    q_bnh = q_btnh[:, 0]
    mesh = _multi_device_mesh()
    if mesh is None:
        o_bnh = run(q_bnh, k_bskh, v_bskh, lengths_b, starts_b.astype(jnp.int32), window)
        return o_bnh[:, None]

    q_spec = logical_spec("batch", "act_heads", None, shape=q_bnh.shape, mesh=mesh)
    kv_spec = logical_spec("batch", None, "act_kv_heads", None, shape=k_bskh.shape, mesh=mesh)
    if q_spec[1] != kv_spec[2]:
        # kv heads do not split like the query heads (e.g. 1 kv head on a 2-way tensor axis).
        # Copying the cache per query head (what pallas_attention does) would multiply the bytes
        # a decode step reads; instead the query heads follow the kv heads, so each tensor shard
        # computes every head of its rows (one query token: the repeated work is small).
        q_spec = P(q_spec[0], kv_spec[2], None)
    row_spec = P(q_spec[0])
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec, P()),
        out_specs=q_spec,
        check_vma=False,  # opaque kernels: nothing for the vma check to verify
    )
    o_bnh = sharded(q_bnh, k_bskh, v_bskh, lengths_b, starts_b.astype(jnp.int32), window)
    return o_bnh[:, None]


# ------------------------------------------------------------------------------------ matmul


@functools.cache
def _parse(spec: str) -> tuple[int, str]:
    """(number of contracted axes, weight letters) of '<batch><c>,<c><out>-><batch><out>'."""
    lhs, _, out = spec.replace(" ", "").partition("->")
    xs, _, ws = lhs.partition(",")
    nc = sum(1 for c in xs if c in ws and c not in out)
    if not 0 < nc <= len(ws) or xs[-nc:] != ws[:nc] or out != xs[:-nc] + ws[nc:]:
        raise ValueError(
            f"matmul spec {spec!r} must read '<batch><contracted>,<contracted><out>->"
            "<batch><out>' (x's trailing axes contract with the weight's leading axes)"
        )
    return nc, ws


def matmul(
    spec: str,
    x: jax.Array,
    w: jax.Array,
    *,
    impl: str = "xla",
    out_dtype=None,
    scale: jax.Array | None = None,
) -> jax.Array:
    """A dense projection written as an einsum, e.g. "btd,dnh->btnh" (x [B,T,D], w [D,N,H]).

    x's trailing axes contract with w's leading ones; x's leading axis is the batch. "xla" is
    `jnp.einsum(spec, x, w, preferred_element_type=out_dtype)`; "pallas" flattens to
    [..., K] @ [K, N] and runs qwen_jax.kernels.matmul (fp32 accumulation; out_dtype defaults
    to x's dtype), differentiable through the kernel's custom VJP.

    Weight-only int8 (qwen_jax.model.quantize): w int8 and `scale` fp32 with w's output shape
    (e.g. [N, H]); y = (x @ w) * scale with fp32 accumulation. "pallas" runs the kernel's
    int8_matmul, which reads the int8 weight and converts it tile by tile; "xla" converts the
    whole weight to x's dtype first (exact: |w| <= 127).
    """
    if (scale is not None) != (w.dtype == jnp.int8):
        raise ValueError(f"int8 weights need a scale and only they take one; got {w.dtype}")
    if impl == "xla":
        if scale is None:
            return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
        y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * scale.astype(jnp.float32)).astype(out_dtype or x.dtype)
    if impl != "pallas":
        raise ValueError(f"unknown matmul impl {impl!r}; expected 'xla' or 'pallas'")
    nc, w_letters = _parse(spec)
    from qwen_jax.kernels import matmul as mm

    backend, interpret = _backend()
    # CPU: the generic interpreter, not the TPU simulator (kernels.decode_attention's
    # HLO_INTERPRET comment): a layer has several independent matmuls that the simulator's
    # per-kernel global barrier deadlocks on under a mesh, and remat'd training needs a kernel
    # without side effects.
    interpret = mm.HLO_INTERPRET if interpret else False

    def run(x, w, *scale):
        lead, k = x.shape[:-nc], math.prod(w.shape[:nc])
        x2, w2 = x.reshape(*lead, k), w.reshape(k, -1)
        kw = dict(out_dtype=out_dtype, backend=backend, interpret=interpret)
        if scale:
            y = mm.int8_matmul(x2, w2, scale[0].reshape(-1), **kw)
        else:
            y = mm.matmul(x2, w2, **kw)
        return y.reshape(*lead, *w.shape[nc:])

    operands = (x, w) if scale is None else (x, w, scale)
    mesh = _multi_device_mesh()
    if mesh is None:
        return run(*operands)
    w_axes = tuple(_WEIGHT_AXES.get(c) for c in w_letters)
    if None in w_axes:
        raise ValueError(
            f"matmul_impl='pallas' under a mesh needs the weight's logical axes, read from the "
            f"letters of {spec!r}; known letters are {sorted(_WEIGHT_AXES)}"
        )
    w_spec = logical_spec(*w_axes, shape=w.shape, mesh=mesh)
    if any(a is not None for a in w_spec):
        raise ValueError(
            f"matmul_impl='pallas' runs a single-device kernel, but the weight of {spec!r} "
            f"(shape {w.shape}, logical axes {w_axes}) is sharded on this mesh "
            f"({dict(mesh.shape)}) as {w_spec}; gathering it on every call would undo the "
            "sharding. Use matmul_impl='xla' with FSDP or tensor parallelism, or a mesh that "
            "replicates the weights (the 'dp' preset)."
        )
    x_spec = logical_spec("batch", *[None] * (x.ndim - 1), shape=x.shape, mesh=mesh)
    out_spec = P(x_spec[0], *[None] * (x.ndim - nc + w.ndim - nc - 1))
    sharded = jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(x_spec, *[P()] * (len(operands) - 1)),
        out_specs=out_spec,
        # Opaque kernels. The replicated weight's cotangent is summed over the mesh by
        # shard_map's transpose (checked against XLA in tests/test_matmul_dispatch.py).
        check_vma=False,
    )
    return sharded(*operands)
