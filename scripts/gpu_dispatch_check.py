"""GPU check of the kernel dispatch inside the model (qwen_jax.model.dispatch).

On an H100/H200 host (jax with CUDA), the dispatch picks the Triton kernels without interpret
mode:
    python scripts/gpu_dispatch_check.py --out gpu_dispatch_check.json
On CPU the same checks run with the kernels interpreted (the tests' path; about a minute).

1. Decode: the engine's greedy generation with attention_impl="pallas" (decode kernel on the
   left-padded GQA + per-layer-window batch of tests/test_decode_dispatch.py) equals
   attention_impl="xla": same tokens, log-probs within 1e-5.
2. Matmul: matmul_impl="pallas" logits and parameter gradients equal "xla" on the tiny GQA +
   window + packed case of tests/test_attention_dispatch.py (1e-4 abs logits, 1e-5 rel grads).
Both sides use full fp32 matmuls (no TF32). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path


def check_decode() -> dict:
    from qwen_jax.infer.engine import Engine
    from qwen_jax.model.factory import create_model
    from qwen_jax.testing import generation as g

    want = g.xla_greedy(2)
    model = create_model(g.decode_config(2, "pallas"), seed=3)
    got = Engine(model).generate(g.PROMPTS, max_new_tokens=g.DECODE_NEW)
    g.assert_same_generation(got, want)
    err = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    return {"name": "engine decode pallas == xla", "max_abs_logprob_err": err}


def check_matmul() -> dict:
    import jax

    from qwen_jax.model.factory import create_model
    from qwen_jax.testing.batches import packed_batch
    from qwen_jax.testing.configs import tiny_dispatch
    from qwen_jax.testing.model_parity import assert_matches_xla

    cfg = tiny_dispatch()
    err = assert_matches_xla(cfg, dict(matmul_impl="pallas"), 2, 24)
    row = {"name": "model matmul pallas == xla", "max_abs_logit_err": err}
    model = create_model(cfg.replace(matmul_impl="pallas"))
    tokens, pos, _ = packed_batch(2, 24, cfg.vocab_size)
    if jax.default_backend() == "gpu":  # the pallas side must really hold Triton kernels
        from flax import nnx

        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions_bt=pos)[0])
        text = forward.lower(state).as_text()
        row["triton_kernels_in_program"] = text.count("xla.gpu.triton")
        if not row["triton_kernels_in_program"]:
            raise AssertionError("matmul_impl='pallas' lowered without a Triton kernel")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import jax

    rows, ok = [{"platform": jax.default_backend(), "device": str(jax.devices()[0])}], True
    with jax.default_matmul_precision("float32"):
        for check in (check_decode, check_matmul):
            try:
                rows.append({**check(), "ok": True})
            except Exception:  # noqa: BLE001 - every failure is reported in the JSON
                ok = False
                rows.append({"name": check.__name__, "ok": False, "error": traceback.format_exc()})
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
