"""The serve phase of scripts/gpu_perf.py: decode tokens/s of our Engine and its bandwidth
fraction, for a random Qwen-7B-shape model (bf16 weights, then int8 weight-only).

Decode rate without the prefill: t(new) - t(1) over new - 1 steps of `Engine.generate`
(greedy, every row makes exactly `new` tokens: random weights with no stop ids), each the best
of two runs after a warm-up (which compiles). Bytes read per decode step: every weight array
the engine holds but the embedding table (one row per sequence instead), plus K and V of the
mean cached context (prompt + new / 2); the fraction divides bytes / step time by the chip's
published HBM bandwidth, and by the read rate measured in the same run.
"""

from __future__ import annotations

import time

from gpu_perf_train import _short

from qwen_jax.hardware import CHIPS


def serve_shape(smoke: bool) -> dict:
    """The 7B shape (bf16) or, in smoke runs, a tiny one; prompt and new-token counts."""
    from qwen_jax.model import config as C

    kw = dict(dtype="bfloat16", param_dtype="bfloat16")
    if smoke:
        return dict(cfg=C.tiny(C.QWEN_7B, **kw), prompt=16, new=8, batches=(1, 4))
    return dict(cfg=C.QWEN_7B.replace(**kw), prompt=128, new=64, batches=(1, 64))


def _step_bytes(engine, batch: int, context: int) -> int:
    import jax
    import numpy as np

    cfg = engine.cfg
    held = sum(x.nbytes for x in jax.tree.leaves((engine.state, engine.layers)))
    table = cfg.vocab_size * cfg.hidden_size * np.dtype(cfg.param_dtype).itemsize
    embed_rows = batch * cfg.hidden_size * np.dtype(cfg.param_dtype).itemsize
    kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    return held - table + embed_rows + kv * np.dtype(cfg.dtype).itemsize


def _timed(engine, prompts, new: int) -> float:
    best = float("inf")
    for _ in range(3):  # the first run compiles and warms up
        t = time.perf_counter()
        out = engine.generate(prompts, max_new_tokens=new)
        best = min(best, time.perf_counter() - t)
        if any(len(o.token_ids) != new for o in out):
            raise AssertionError("a row stopped early: the timing would not be comparable")
    return best


def serve_phase(budget, smoke: bool, chip: str | None, emit) -> dict:
    import jax
    import numpy as np

    from qwen_jax.infer.bench import memory_bandwidth_gbs
    from qwen_jax.infer.engine import Engine
    from qwen_jax.model.factory import create_model
    from qwen_jax.model.quantize import quantize_int8

    shape = serve_shape(smoke)
    cfg, prompt, new = shape["cfg"], shape["prompt"], shape["new"]
    read_gbs = None  # measured before the first row that runs
    hbm = CHIPS[chip].hbm_bytes_per_s if chip in CHIPS else None
    rows = []
    for weights in ("bfloat16", "int8"):
        engine = None
        for batch in shape["batches"]:
            rec = dict(impl="qwen-jax", weights=weights, batch=batch, prompt=prompt, new=new)
            rec["params"] = cfg.num_params()
            if not budget.fits():
                rows.append({**rec, "status": "skipped: budget"})
                emit(rows)
                continue
            t0 = time.perf_counter()
            try:
                if read_gbs is None:
                    read_gbs = memory_bandwidth_gbs(mib=64 if smoke else 2048)
                rec["measured_read_gbs"] = round(read_gbs, 1)
                if engine is None:
                    model = create_model(cfg, seed=0)
                    if weights == "int8":
                        model = quantize_int8(model)
                    engine = Engine(model, max_context=prompt + new + 16)
                    del model
                rng = np.random.default_rng(batch)
                prompts = rng.integers(0, 151_643 if not smoke else cfg.vocab_size, (batch, prompt))
                prompts = prompts.tolist()
                t_new, t_one = _timed(engine, prompts, new), _timed(engine, prompts, 1)
                step = (t_new - t_one) / (new - 1)
                nbytes = _step_bytes(engine, batch, prompt + new // 2)
                rec.update(
                    status="ok",
                    decode_step_ms=round(step * 1e3, 3),
                    decode_tokens_per_s=round(batch / step, 1),
                    generate_s=round(t_new, 3),
                    bytes_per_step=nbytes,
                    bandwidth_fraction=round(nbytes / step / hbm, 4) if hbm else None,
                    measured_read_fraction=round(nbytes / step / (read_gbs * 1e9), 4),
                )
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                import traceback

                traceback.print_exc()
                rec.update(status="error", error=_short(e))
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            budget.took(rec["wall_s"])
            rows.append(rec)
            emit(rows)
        del engine
        jax.clear_caches()
    return {"rows": rows, "hbm_bytes_per_s": hbm}
