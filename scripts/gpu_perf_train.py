"""The train phase of scripts/gpu_perf.py: full-depth train steps, one row per lever setting.

Rows (`train_rows`, in priority order: the phase budget drops the tail): per shape a base row
(attention "pallas", remat "full", the current loss, packed rows) and one row per lever,
changing only that lever. Run inside a phase process of gpu_perf.py (rows with XLA flags in a
process started with those flags).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
import traceback
from pathlib import Path

TOKENS_PER_STEP = 16_384
# MaxText's XLA flags for GPUs (its GPU guides and scripts), those that act on one GPU: the
# collective ones (combine thresholds, pipelined all-gather / reduce-scatter) have nothing to
# combine here. An unknown flag aborts the backend at start: the flag process records that.
XLA_FLAG_SETS = {
    "maxtext": (
        "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
        " --xla_gpu_enable_command_buffer= --xla_gpu_enable_while_loop_double_buffering=true"
    ),
}


@dataclasses.dataclass(frozen=True)
class TrainRow:
    """One train-step measurement: the model, the shape and the setting of every lever."""

    label: str
    model: str  # "1.8b" | "7b"
    layers: int
    seq: int
    batch: int
    packed: bool = True
    attention: str = "pallas"  # "xla" | "pallas" | "cudnn"
    remat: str = "full"
    loss: str = "current"  # "current" (LMObjective) | "fused" (train/chunked_loss.py)
    flags: str = ""  # a key of XLA_FLAG_SETS: run in a subprocess with those XLA_FLAGS
    lever: str = "base"
    profile: bool = False


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) < 600 else text[:600] + " ..."


class Budget:
    """A phase's time budget: `fits()` says whether one more item like the slowest so far
    still fits; `took(s)` records one."""

    def __init__(self, seconds: float):
        self.seconds, self.start, self.slowest = seconds, time.perf_counter(), 0.0

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self) -> bool:
        return self.left() > self.slowest

    def took(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)


# ----------------------------------------------------------------------------------- train


def train_rows(smoke: bool) -> list[TrainRow]:
    """The rows in priority order (the budget drops the tail): the base row and the main
    levers (pallas vs cuDNN on unpacked rows, the fused loss, remat save_qkv_proj) of 1.8B at
    2048; the base rows of 1.8B at 8192 and of the 7B cut; their main levers; the remaining
    settings of 1.8B at 2048 (attention xla, remat none). The XLA-flag row (1.8B at 2048) runs
    in its own process."""
    shapes = [("1.8b", 64), ("1.8b", 128), ("7b", 64)] if smoke else [
        ("1.8b", 2048), ("1.8b", 8192), ("7b", 2048)
    ]  # fmt: skip
    main = [
        ("attention_unpacked", dict(packed=False)),
        ("attention_unpacked", dict(packed=False, attention="cudnn")),
        ("loss", dict(loss="fused")),
        ("remat", dict(remat="save_qkv_proj")),
    ]
    rest = [("attention", dict(attention="xla")), ("remat", dict(remat="none"))]
    flags = [("xla_flags", dict(flags=name)) for name in XLA_FLAG_SETS]
    tiers = [[], [], [], []]
    for i, (model, seq) in enumerate(shapes):
        layers = (2 if model == "1.8b" else 1) if smoke else (24 if model == "1.8b" else 16)
        batch = (256 if smoke else TOKENS_PER_STEP) // seq
        tag = f"{model}-L{layers}-T{seq}"
        base = TrainRow(f"{tag} base", model, layers, seq, batch)
        tiers[0 if i == 0 else 1].append(base)
        for tier, levers in ((0 if i == 0 else 2, main), (3, rest + flags if i == 0 else [])):
            for lever, change in levers:
                name = ",".join(f"{k}={v}" for k, v in change.items())
                row = dataclasses.replace(base, label=f"{tag} {name}", lever=lever, **change)
                tiers[0 if lever == "xla_flags" else tier].append(row)
    return [row for tier in tiers for row in tier]


def selected_rows(smoke: bool, levers=None, max_rows=None, flag_set: str = "") -> list[TrainRow]:
    """The rows one train process runs: those of `flag_set`, of `levers` if given, the first
    `max_rows` (the peer phase takes its shapes from the flag-less selection)."""
    rows = [r for r in train_rows(smoke) if r.flags == flag_set]
    if levers:
        rows = [r for r in rows if r.lever in levers]
    return rows[:max_rows]


def _model_config(row: TrainRow, smoke: bool):
    from qwen_jax.model import config as C

    base = C.QWEN_1_8B if row.model == "1.8b" else C.QWEN_7B
    changes = dict(
        num_layers=row.layers,
        seq_length=row.seq,
        dtype="bfloat16",
        param_dtype="float32",
        remat_policy=row.remat,
        # Smoke runs put XLA attention in the pallas rows: the interpret-mode flash kernel
        # takes minutes to compile on CPU (its own tests cover it; the GPU run uses it).
        attention_impl="xla" if row.attention == "cudnn" or smoke else row.attention,
    )
    if smoke:
        return C.tiny(base, max_position_embeddings=max(256, row.seq), **changes)
    return base.replace(
        max_position_embeddings=max(base.max_position_embeddings, row.seq), **changes
    )


def train_batch(batch: int, seq: int, vocab: int, packed: bool, seed: int = 0) -> dict:
    """Random tokens, every target weighted; packed: 1-4 documents per row (positions restart,
    segment ids 1..), else one document per row."""
    import numpy as np

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    seg = np.ones((batch, seq), np.int32)
    pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    if packed:
        for r in range(batch):
            cuts = sorted(rng.choice(np.arange(16, seq - 16), int(rng.integers(0, 4)), False))
            for c in cuts:
                seg[r, c:] += 1
                pos[r, c:] = np.arange(seq - c)
    return {
        "decoder_input_tokens": toks[:, :-1],
        "decoder_target_tokens": toks[:, 1:],
        "decoder_loss_weights": np.ones((batch, seq), np.int32),
        "decoder_segment_ids": seg,
        "decoder_positions": pos,
    }


@contextlib.contextmanager
def cudnn_attention(smoke: bool):
    """Route the model's training attention (qwen_jax.model.dispatch.attention, looked up at
    trace time) to jax.nn.dot_product_attention: cuDNN on a GPU, its XLA path in smoke runs.
    Causal only: valid for unpacked rows without windows (the caller guarantees both)."""
    import jax

    from qwen_jax.model import dispatch

    def attention(q, k, v, *, impl, q_slot_bt, q_segment_bt, kv_segment_bs, window=0):
        del impl, q_slot_bt, q_segment_bt, kv_segment_bs, window
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=None if smoke else "cudnn"
        )

    saved = dispatch.attention
    dispatch.attention = attention
    try:
        yield
    finally:
        dispatch.attention = saved


def check_cudnn_parity(smoke: bool) -> float:
    """The patched attention equals the model's XLA attention on a causal GQA case (bf16,
    the kernels' 2e-2 max-norm relative tolerance); returns the relative error."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen_jax.model import dispatch

    ks = jax.random.split(jax.random.key(0), 3)
    b, t, k, g, h = 2, 256, 2, 4, 128
    q = jax.random.normal(ks[0], (b, t, k * g, h), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (b, t, k, h), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, k, h), jnp.bfloat16)
    ones = jnp.ones((b, t), jnp.int32)
    slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kw = dict(q_slot_bt=slot, q_segment_bt=ones, kv_segment_bs=ones)
    want = np.asarray(dispatch.attention(q, kk, v, impl="xla", **kw), np.float32)
    with cudnn_attention(smoke):
        got = np.asarray(jax.jit(lambda *a: dispatch.attention(*a, impl="xla", **kw))(q, kk, v))
    err = float(np.max(np.abs(got.astype(np.float32) - want)) / np.max(np.abs(want)))
    if not err <= 2e-2:
        raise AssertionError(f"cudnn attention differs from xla: relative error {err:.3g}")
    return err


def _objective(loss: str):
    from qwen_jax.train.chunked_loss import fused_cross_entropy
    from qwen_jax.train.objectives import LMObjective

    if loss == "current":
        return LMObjective(chunk=512)

    class FusedLM(LMObjective):
        """LMObjective with the fused head + cross-entropy (what the proposed config knob
        would switch on); same features, sums and metrics."""

        def loss_sums(self, model, batch, ctx):
            h_btd, _ = model(
                batch["decoder_input_tokens"],
                positions_bt=batch["decoder_positions"],
                segment_ids_bt=batch["decoder_segment_ids"],
                return_hidden=True,
                dropout_rng=ctx.rng,
            )
            obj, ce, z, w = fused_cross_entropy(
                h_btd,
                model.head_weight().astype(h_btd.dtype),
                batch["decoder_target_tokens"],
                batch["decoder_loss_weights"],
                chunk=self.chunk,
                z_loss=self.z_loss,
            )
            return obj, {"loss": ce, "z_loss": z, "tokens": w}

    return FusedLM(chunk=512)


def run_train_row(row: TrainRow, smoke: bool, peak: float | None, profile_dir=None) -> dict:
    """Compile, warm up and time one train step in this process; the row's figures."""
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax.model.factory import create_model
    from qwen_jax.train.optim import OptimConfig, make_optimizer
    from qwen_jax.train.step import init_state, make_train_step

    if row.attention == "cudnn" and row.packed:
        raise ValueError("cudnn attention has no segment ids: unpacked rows only")
    cfg = _model_config(row, smoke)
    out = {"params": cfg.num_params()}
    if row.attention == "cudnn":
        out["cudnn_parity_rel_err"] = check_cudnn_parity(smoke)
    patch = cudnn_attention(smoke) if row.attention == "cudnn" else contextlib.nullcontext()
    t0 = time.perf_counter()
    with patch:
        model = create_model(cfg)
        graphdef, _ = nnx.split(model)
        tx = make_optimizer(OptimConfig(peak_lr=1e-4, warmup_steps=1, total_steps=100))
        step = jax.jit(make_train_step(graphdef, tx, _objective(row.loss)), donate_argnums=0)
        state = init_state(model, tx)
        del model
        data = jax.device_put(train_batch(row.batch, row.seq, cfg.vocab_size, row.packed))
        compiled = step.lower(state, data).compile()
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        mem = compiled.memory_analysis()
        if mem is not None:
            out["temp_bytes"] = int(mem.temp_size_in_bytes)
        state, metrics = compiled(state, data)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(2 if smoke else 5):
            t = time.perf_counter()
            state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        if profile_dir is not None:
            with jax.profiler.trace(str(Path(profile_dir) / row.label.replace(" ", "_"))):
                for _ in range(2):
                    state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise AssertionError(f"non-finite loss {loss}")
    sec = statistics.median(times)
    tokens = row.batch * row.seq
    flops = cfg.flops_per_token(row.seq) * tokens / sec
    stats = jax.devices()[0].memory_stats() or {}
    out.update(
        step_ms=round(sec * 1e3, 2),
        tokens_per_s=round(tokens / sec, 1),
        model_tflops=float(f"{flops / 1e12:.4g}"),
        mfu=round(flops / peak, 4) if peak else None,
        loss=round(loss, 4),
        peak_bytes_in_use=stats.get("peak_bytes_in_use"),
    )
    del state, compiled, step
    gc.collect()
    return out


def train_phase(
    budget: Budget, smoke: bool, peak, levers, flag_set, profile_dir, emit, max_rows=None
) -> dict:
    """The train rows of `flag_set` ("" = the rows without XLA flags; the parent started this
    process with that set's XLA_FLAGS), restricted to `levers` if given, the first `max_rows`."""
    rows = selected_rows(smoke, levers, max_rows, flag_set)
    results = []
    for row in rows:
        rec = {**dataclasses.asdict(row), "xla_flags": XLA_FLAG_SETS.get(row.flags)}
        if not budget.fits():
            rec["status"] = "skipped: budget"
        else:
            t0 = time.perf_counter()
            try:
                prof = profile_dir if row.lever == "base" else None
                rec.update(run_train_row(row, smoke, peak, prof))
                rec["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                traceback.print_exc()
                rec.update(status="error", error=_short(e))
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            budget.took(rec["wall_s"])
        results.append(rec)
        emit(results)
    return {"rows": results}
