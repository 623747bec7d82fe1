"""Model-level GPU check: the Qwen model with attention_impl="pallas" (Triton flash) vs "xla".

On an H100/H200 host (jax with CUDA):
    python scripts/gpu_model_check.py --out gpu_model_check.json
CPU smoke test (interpret mode, tiny timing shape): add --interpret --small.

1. Parity: the tiny GQA + window + packed-rows case of tests/test_attention_dispatch.py (through
   qwen_jax.testing.model_parity), logits
   and parameter gradients of impl="pallas" against impl="xla" at that test's tolerances, with
   fp32 matmuls at full precision (no TF32) on both sides.
2. Timing: the full train step (forward, backward, clip, AdamW; bf16 compute, fp32 master
   weights) of a Qwen-1.8B-wide model cut to 4 layers (vocab 151,936), one batch of 16,384
   tokens at sequence 2,048 and 8,192, attention by XLA and by the Pallas kernel; median step
   time after compile and warm-up, tokens/s and the pallas/xla ratio.

Exit status 1 when a check fails or a timing errors; the JSON holds every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path


def parity() -> dict:
    import jax

    from qwen_jax.testing.configs import tiny_dispatch
    from qwen_jax.testing.model_parity import assert_matches_xla

    with jax.default_matmul_precision("float32"):
        err = assert_matches_xla(tiny_dispatch(), dict(attention_impl="pallas"), 3, 40)
    return {"name": "model pallas == xla (tiny, GQA, window, packed)", "max_abs_logit_err": err}


def time_train_step(impl: str, batch: int, seq: int, small: bool) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from qwen_jax.model import config as C
    from qwen_jax.model.factory import create_model
    from qwen_jax.train.objectives import LMObjective
    from qwen_jax.train.optim import OptimConfig, make_optimizer
    from qwen_jax.train.step import init_state, make_train_step

    layers = dict(num_layers=4, dtype="bfloat16", param_dtype="float32", attention_impl=impl)
    if small:
        cfg = C.tiny(C.QWEN_1_8B, **layers)
    else:
        cfg = C.QWEN_1_8B.replace(seq_length=seq, **layers)
    model = create_model(cfg)
    graphdef, _ = nnx.split(model)
    tx = make_optimizer(OptimConfig(peak_lr=1e-4, warmup_steps=1, total_steps=100))
    step = jax.jit(make_train_step(graphdef, tx, LMObjective(chunk=512)), donate_argnums=0)
    state = init_state(model, tx)
    del model
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    data = {
        "decoder_input_tokens": toks[:, :-1],
        "decoder_target_tokens": toks[:, 1:],
        "decoder_loss_weights": np.ones((batch, seq), np.int32),
        "decoder_segment_ids": np.ones((batch, seq), np.int32),
        "decoder_positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
    }
    data = jax.device_put(data)
    t0 = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(2 if small else 6):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise AssertionError(f"non-finite loss {loss}")
    tokens = batch * seq
    return {
        "impl": impl,
        "batch": batch,
        "seq": seq,
        "step_ms": round(sec * 1e3, 2),
        "tokens_per_s": round(tokens / sec),
        "model_tflops": round(cfg.flops_per_token(seq) * tokens / sec / 1e12, 1),
        "compile_s": round(compile_s, 1),
        "loss": round(loss, 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interpret", action="store_true", help="CPU smoke test")
    parser.add_argument("--small", action="store_true", help="tiny timing shape")
    args = parser.parse_args(argv)

    import jax

    if not args.interpret and jax.default_backend() != "gpu":
        print(f"gpu_model_check: no GPU (backend {jax.default_backend()!r})", file=sys.stderr)
        return 2
    result = {"jax": jax.__version__, "device_kind": jax.devices()[0].device_kind, "rows": []}
    ok = True
    try:
        row = parity()
        row["ok"] = True
    except Exception as e:  # noqa: BLE001 - recorded, fails the run
        traceback.print_exc()
        row, ok = {"name": "model parity", "ok": False, "error": f"{type(e).__name__}: {e}"}, False
    print(json.dumps(row), flush=True)
    result["rows"].append(row)

    shapes = [(2, 64)] if args.small else [(8, 2048), (2, 8192)]
    for batch, seq in shapes:
        by_impl = {}
        for impl in ("xla", "pallas"):
            try:
                row = time_train_step(impl, batch, seq, args.small)
                by_impl[impl] = row["step_ms"]
            except Exception as e:  # noqa: BLE001 - recorded, fails the run
                traceback.print_exc()
                row = {
                    "impl": impl,
                    "batch": batch,
                    "seq": seq,
                    "error": f"{type(e).__name__}: {e}",
                }
                ok = False
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        if len(by_impl) == 2:
            speedup = {
                "seq": seq,
                "pallas_speedup_over_xla": round(by_impl["xla"] / by_impl["pallas"], 3),
            }
            print(json.dumps(speedup), flush=True)
            result["rows"].append(speedup)
    result["ok"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"gpu_model_check: {'OK' if ok else 'FAILED'}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
