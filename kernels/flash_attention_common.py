"""What the TPU and GPU flash-attention kernels share: the mask rule, the reference, the wrapper.

Semantics (identical to the model's XLA path, qwen_jax.model.attention with q_slot = arange(T)):
q [B,T,N,H], k/v [B,T,K,H] with N = K*G (GQA: query head n reads kv head n // G). Key t' is
visible to query t when

    t' <= t                          causal
    window <= 0 or t - t' < window   layer-wise window (may be a traced int32 scalar)
    kv_seg[t'] == q_seg[t] != 0      packed documents never attend across; 0 marks padding

scores are q.k / sqrt(H) in fp32, the softmax statistics are fp32, and masked scores take the
finite MASK_VALUE. A query with no visible key (a padding query, segment 0) therefore has an
all-masked row, whose softmax is uniform: its output is the mean of v over all T keys, exactly as
in the XLA path, so logits agree at every position (padding included). The kernels only visit
the tiles causality and the window allow, so `flash_core` fills such rows in (found from their
log-sum-exp) and routes their gradient. LogN scaling (spec §2.2) is a per-position factor the
model applies to q before calling attention; it needs nothing here.

The wrapper pads the sequence to a multiple of the blocks (padded keys get segment 0, padded
queries are dropped), normalises the window, and runs the kernels under one custom_vjp
(`flash_core`) whose forward/backward come from a backend's `KernelPlan`.

In interpret mode every kernel output is poisoned first (NaN for floats, via
input_output_aliases onto a NaN-filled buffer), so a block the kernel forgets to write fails the
finite-value checks in the tests instead of reading zeros.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from qwen_jax.kernels.block_sizes import FlashBlockSizes

# Same finite value as the model's XLA path: an all-masked row gives a uniform softmax, not NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def visible(q_pos, k_pos, q_seg, kv_seg, window):
    """The one mask rule, on broadcastable int32 operands (also used on kernel tiles)."""
    ok = k_pos <= q_pos
    ok &= (window <= 0) | (q_pos - k_pos < window)
    ok &= (q_seg == kv_seg) & (kv_seg != 0)
    return ok


def tile_visible(q_first, q_rows: int, k_first, k_rows: int, window):
    """Whether any (query, key) pair of a tile can be visible by position (causal and window)."""
    causal = k_first <= q_first + (q_rows - 1)
    in_window = (window <= 0) | (q_first - (k_first + (k_rows - 1)) < window)
    return causal & in_window


def kv_block_range(q_first, q_rows: int, k_rows: int, window):
    """[lo, hi] indices of the key blocks (of k_rows) that a query tile can see.

    hi: the block holding the tile's last query (causal); lo: the first block whose last key is
    inside the window of the tile's first query. All operands are non-negative int32 scalars.
    """
    hi = lax.div(q_first + (q_rows - 1), k_rows)
    lo = jnp.where(window > 0, lax.div(jnp.maximum(q_first - window + 1, 0), k_rows), 0)
    return lo, hi


def q_block_range(k_first, k_rows: int, q_rows: int, num_q_blocks: int, window):
    """[lo, hi] indices of the query blocks (of q_rows) that can see a key tile."""
    lo = lax.div(k_first, q_rows)
    last = num_q_blocks - 1
    hi = jnp.where(
        window > 0, jnp.minimum(lax.div(k_first + (k_rows - 2) + window, q_rows), last), last
    )
    return lo, hi


def flash_attention_reference(
    q_btnh: jax.Array,
    k_btkh: jax.Array,
    v_btkh: jax.Array,
    segment_ids_bt: jax.Array,
    *,
    window: jax.Array | int = 0,
    kv_segment_ids_bt: jax.Array | None = None,
) -> jax.Array:
    """Pure-jnp attention with the kernels' semantics (module docstring); returns [B,T,N,H]."""
    b, t, n, h = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    kv_seg = segment_ids_bt if kv_segment_ids_bt is None else kv_segment_ids_bt
    pos = jnp.arange(t, dtype=jnp.int32)
    mask_bts = visible(
        pos[None, :, None],
        pos[None, None, :],
        segment_ids_bt[:, :, None],
        kv_seg[:, None, :],
        jnp.asarray(window, jnp.int32),
    )
    q_btkgh = q_btnh.reshape(b, t, kv_heads, n // kv_heads, h)
    s = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh, preferred_element_type=jnp.float32)
    s = jnp.where(mask_bts[:, None, None], s * h**-0.5, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1).astype(v_btkh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", p, v_btkh).reshape(b, t, n, h)


# ------------------------------------------------------------------------------- wrapper


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """Static description of one backend's kernels for `flash_core` (hashable: a jit key).

    forward(q, k, v, q_seg, kv_seg, window, plan) -> (o [B,L,N,H], lse [B,N,L] fp32)
    backward(q, k, v, q_seg, kv_seg, window, o, lse, do, plan) -> (dq, dk, dv)
    All arrays are already padded to length L; `kv_length` is the unpadded length T.
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any]
    blocks: FlashBlockSizes
    interpret: bool
    kv_length: int
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


def _no_visible_key(lse_bnl):
    """[B, L, N, 1] bool: rows that saw no visible key (their lse sits near MASK_VALUE)."""
    # A row with a visible key has lse >= its largest real score; an all-masked row has
    # lse = MASK_VALUE + log(count), about -2.4e38.
    return (lse_bnl < 0.5 * MASK_VALUE).transpose(0, 2, 1)[..., None]


def _mean_over_keys(v, n: int, kv_length: int, dtype):
    """[B, 1, N, H]: mean of v over the real keys, repeated for the G query heads of each."""
    # Padded keys beyond kv_length are zeros, so summing all rows and dividing by the real
    # length gives the mean over the real keys.
    mean_bkh = jnp.sum(v.astype(jnp.float32), axis=1) / kv_length
    return jnp.repeat(mean_bkh, n // v.shape[2], axis=1)[:, None].astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def flash_core(q, k, v, q_seg, kv_seg, window, plan: KernelPlan):
    """Attention on padded [B,L,...] arrays with a backend's kernels; differentiable in q, k, v."""
    return _core_fwd(q, k, v, q_seg, kv_seg, window, plan)[0]


def _core_fwd(q, k, v, q_seg, kv_seg, window, plan):
    o, lse_bnl = plan.forward(q, k, v, q_seg, kv_seg, window, plan)
    # Rows with no visible key (padding queries) get the XLA path's uniform softmax: mean(v).
    masked = _no_visible_key(lse_bnl)
    o = jnp.where(masked, _mean_over_keys(v, q.shape[2], plan.kv_length, o.dtype), o)
    return o, (q, k, v, q_seg, kv_seg, window, o, lse_bnl)


def _core_bwd(plan, res, do):
    q, k, v, q_seg, kv_seg, window, o, lse_bnl = res
    # The kernels mask p to exactly 0 wherever a key is invisible, so all-masked rows add nothing
    # to dq/dk/dv there whatever their do; their output was mean(v), whose cotangent is added here.
    dq, dk, dv = plan.backward(q, k, v, q_seg, kv_seg, window, o, lse_bnl, do, plan)
    b, l, n, h = do.shape
    kv_heads = v.shape[2]
    do_masked = jnp.where(_no_visible_key(lse_bnl), do, jnp.zeros_like(do)).astype(jnp.float32)
    dmean_bkh = do_masked.reshape(b, l, kv_heads, n // kv_heads, h).sum(axis=(1, 3))
    real_key = (jnp.arange(l) < plan.kv_length)[None, :, None, None]
    dv = dv.astype(jnp.float32) + jnp.where(real_key, dmean_bkh[:, None] / plan.kv_length, 0.0)
    zeros = [np.zeros(x.shape, jax.dtypes.float0) for x in (q_seg, kv_seg, window)]
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *zeros)


flash_core.defvjp(_core_fwd, _core_bwd)


def padded_length(length: int, blocks: FlashBlockSizes) -> int:
    """Smallest multiple of every block that is >= length."""
    multiple = functools.reduce(np.lcm, [v for _, v in blocks.items()])
    return -(-length // int(multiple)) * int(multiple)


def check_inputs(q, k, v, segment_ids, kv_segment_ids) -> None:
    """Shape and dtype checks with messages that name the offending argument."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B,T,N,H], k/v [B,T,K,H]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k/v {k.shape} do not match q {q.shape} in batch or head dim")
    if k.shape[1] != t:
        raise ValueError(
            f"flash attention is the training/prefill kernel (query length == key length); got "
            f"T={t}, S={k.shape[1]}. Decoding against a KV cache belongs to decode attention."
        )
    if n % k.shape[2]:
        raise ValueError(f"num heads {n} is not a multiple of kv heads {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, seg in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if seg is not None and seg.shape != (b, t):
            raise ValueError(f"{name} has shape {seg.shape}; expected {(b, t)}")


def run_flash(plan_for, q, k, v, segment_ids, kv_segment_ids, window, blocks):
    """The public wrappers' body: pad to the blocks, run `flash_core`, slice back.

    `plan_for(blocks, length)` builds the backend's KernelPlan for the padded length.
    """
    check_inputs(q, k, v, segment_ids, kv_segment_ids)
    t = q.shape[1]
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    length = padded_length(t, blocks)
    plan = plan_for(blocks, length, t)
    pad = length - t
    # Padded keys get segment 0 (never visible); padded queries are sliced off below.
    q_seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    kv_seg = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    window = jnp.asarray(window, jnp.int32)
    # A window >= length is no window; clamping also keeps in-kernel index math far from int32
    # overflow.
    window = jnp.where((window <= 0) | (window >= length), 0, window)
    o = flash_core(q, k, v, q_seg, kv_seg, window, plan)
    return o[:, :t]


# ------------------------------------------------------------------------------ poisoning


def poisoned_call(
    kernel,
    *,
    out_shape: list[jax.ShapeDtypeStruct],
    num_inputs: int,
    num_scalar_prefetch: int,
    poison: bool,
):
    """Wrap a kernel so that, when `poison`, every output starts as NaN (int: min value).

    Returns (kernel, extra_in_specs, extra_args, input_output_aliases) to splice into a
    pallas_call whose real inputs (scalar-prefetch operands included) number `num_inputs`.
    The poison buffers are extra inputs in `pl.ANY` memory (never copied into the kernel) aliased
    to the outputs, so an output block the kernel does not write keeps its poison.
    """
    if not poison:
        return kernel, [], [], {}
    n_out = len(out_shape)
    first = num_inputs - num_scalar_prefetch  # kernel refs: prefetch, inputs, outputs, scratch

    def body(*refs):
        cut = num_scalar_prefetch + first
        return kernel(*refs[:cut], *refs[cut + n_out :])

    def fill(s):
        if jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.full(s.shape, jnp.nan, s.dtype)
        return jnp.full(s.shape, jnp.iinfo(s.dtype).min, s.dtype)

    specs = [pl.BlockSpec(memory_space=pl.ANY) for _ in out_shape]
    args = [fill(s) for s in out_shape]
    aliases = {num_inputs + i: i for i in range(n_out)}
    return body, specs, args, aliases
