"""GPU check for the Pallas kernels: parity without interpret mode, then timings vs XLA / cuDNN.

On an H100/H200 host (jax with CUDA):
    python scripts/gpu_check.py --out gpu_check.json
CPU smoke test (interpret mode, tiny shapes; tests/test_kernels_matmul_gpu_check.py runs it):
    python scripts/gpu_check.py --interpret --small --out /tmp/gpu_check.json

1. Parity. The kernel tests' own cases and assertions (qwen_jax.testing.kernel_cases), compiled
   for the GPU: every decode and matmul case (`check_decode`, `check_matmul`,
   `check_int8_matmul`; fp32 1e-5, bf16 2e-2 max-norm relative, non-finite values fail), and the
   GPU flash attention's forward and gradients (`check_gpu_flash`: packed segments with left and
   right padding, windows, GQA) on the test cases plus two at the default tiles. A missing flash
   module is skipped with a message.
2. Timings (median of repeated runs, after compile and warm-up), each checked against its
   baseline's output first: flash attention forward and forward+backward vs
   jax.nn.dot_product_attention (implementation "xla" and "cudnn"); decode attention vs its
   XLA reference; matmul and int8 matmul vs XLA's jnp.dot. TFLOP/s use nominal FLOPs (causal
   attention counts half the square; backward = 2.5x forward); decode also reports GB/s.

Self-checks, so nothing passes silently: without --interpret the default backend must be a GPU
(exit 2 otherwise) and every timed Pallas program must contain a GPU kernel custom call; any
failed check, timing error or missing figure makes the exit status 1, with the reason in the
table and in the JSON ("ok": false). fp32 references run at full fp32 precision (no TF32).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

# Flash cases at the GPU's default tiles (blocks=None): GQA 4 with a window across tiles (fp32),
# and MHA with 8 heads at bf16.
GPU_FLASH_DEFAULT_TILES = [
    dict(b=2, t=300, k=2, g=4, h=128, dtype="float32", window=96, seed=300),
    dict(b=1, t=512, k=8, g=1, h=128, dtype="bfloat16", window=0, seed=512),
]


@dataclasses.dataclass
class Report:
    checks: list = dataclasses.field(default_factory=list)
    timings: list = dataclasses.field(default_factory=list)

    def record_check(self, name, fn):
        t0 = time.perf_counter()
        try:
            fn()
            row = {"name": name, "ok": True}
        except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the run
            row = {"name": name, "ok": False, "error": _short(e)}
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 2)
        self.checks.append(row)
        print(f"[{'PASS' if row['ok'] else 'FAIL'}] {name} ({row['seconds']} s)", flush=True)
        return row["ok"]

    @property
    def ok(self):
        return all(r["ok"] for r in self.checks) and all(
            r.get("error") is None or r.get("skipped") for r in self.timings
        )


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"


# ---------------------------------------------------------------------------------- parity


def parity_checks(report: Report, interpret: bool, small: bool):
    from qwen_jax.testing import kernel_cases as kc

    for case in kc.DECODE_CASES[:1] if small else kc.DECODE_CASES:
        report.record_check(
            f"decode {case}", lambda c=case: kc.check_decode(c, backend="gpu", interpret=interpret)
        )
    for case in kc.MATMUL_CASES[:1] if small else kc.MATMUL_CASES:
        for check in (kc.check_matmul, kc.check_int8_matmul):
            report.record_check(
                f"{check.__name__.removeprefix('check_')} {case}",
                lambda c=case, f=check: f(c, backend="gpu", interpret=interpret),
            )
    if _flash_module() is None:
        return
    # The small-tile cases of the kernel tests, then two at the GPU's default tiles.
    cases = kc.GPU_FLASH_CASES[:1]
    if not small:
        cases = kc.GPU_FLASH_CASES + [kc.FlashCase(**c) for c in GPU_FLASH_DEFAULT_TILES]
    for case in cases:
        report.record_check(
            f"flash {case}", lambda c=case: kc.check_gpu_flash(c, interpret=interpret)
        )


def _flash_module():
    try:
        return importlib.import_module("qwen_jax.kernels.flash_attention_gpu")
    except ImportError as e:
        print(f"[SKIP] flash attention: qwen_jax.kernels.flash_attention_gpu missing ({e})")
        return None


# --------------------------------------------------------------------------------- timings


def _time(fn, args, *, min_seconds: float, reps: int, warmup: int) -> float:
    """Median seconds per call of jitted fn (compile and warm-up calls excluded)."""
    import jax

    for _ in range(1 + warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    iters = max(1, min(200, int(min_seconds / once)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def _has_gpu_kernel(jitted, args) -> bool:
    text = jitted.lower(*args).as_text()
    return "xla.gpu.triton" in text or "mosaic_gpu" in text


class Timer:
    def __init__(self, report: Report, interpret: bool, small: bool):
        self.report, self.interpret, self.small = report, interpret, small

    def row(self, group, impl, shape, fn, args, *, flops, bytes_=None, check=None, pallas=False):
        """Time fn(*args); check(out) first if given. Errors are recorded, never raised."""
        import jax

        row = {"group": group, "impl": impl, "shape": shape}
        if impl.endswith("cudnn") and self.interpret:
            row.update(error="skipped: cuDNN needs a GPU", skipped=True)
            return self._add(row)
        try:
            jitted = jax.jit(fn)
            if pallas and not self.interpret and not _has_gpu_kernel(jitted, args):
                raise RuntimeError("no Pallas GPU kernel in the lowered program")
            if check is not None:
                check(jax.block_until_ready(jitted(*args)))
            sec = _time(
                jitted,
                args,
                min_seconds=0.01 if self.small else 0.3,
                reps=1 if self.small else 5,
                warmup=0 if self.small else 2,
            )
            row.update(ms=sec * 1e3, tflops=flops / sec / 1e12)
            if bytes_:
                row["gbps"] = bytes_ / sec / 1e9
        except Exception as e:  # noqa: BLE001 - recorded, fails the run
            traceback.print_exc()
            row["error"] = _short(e)
        return self._add(row)

    def _add(self, row):
        self.report.timings.append(row)
        return row


def _rel_err(actual, expected) -> float:
    """Max-norm relative error; inf when `actual` has a non-finite value."""
    import numpy as np

    a, e = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if not np.isfinite(a).all():
        return math.inf
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))


def _rel_check(expected, rel):
    """A closure asserting that every array of `actual` is within `rel` of `expected`'s."""

    def check(actual):
        import jax

        for i, (a, e) in enumerate(zip(jax.tree.leaves(actual), jax.tree.leaves(expected))):
            err = _rel_err(a, e)
            if not err <= rel:
                raise AssertionError(f"output {i}: relative error {err:.3g} > {rel:.3g}")

    return check


def time_flash(timer: Timer, small: bool):
    import jax
    import jax.numpy as jnp

    flash = _flash_module()
    b, t, n, h = (1, 128, 4, 64) if small else (2, 4096, 32, 128)
    shape = f"B{b} T{t} N{n} H{h} causal bf16"
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in keys)
    seg = jnp.ones((b, t), jnp.int32)
    fwd_flops = 4.0 * b * n * t * t * h / 2

    impls = {}
    if flash is not None:
        impls["pallas"] = lambda q, k, v: flash.flash_attention(
            q, k, v, seg, interpret=timer.interpret
        )
    for impl in ("xla", "cudnn"):
        impls[impl] = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl
        )

    def fwd_bwd(f):
        return lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)

    # The yardstick is fp32 attention at full precision; an implementation may be off by bf16
    # rounding, bounded by 2e-2 or three times XLA's own bf16 error, whichever is larger.
    xla_fwd, xla_fwd_bwd = jax.jit(impls["xla"]), jax.jit(fwd_bwd(impls["xla"]))
    with jax.default_matmul_precision("float32"):  # precision is part of jit's cache key
        up = [x.astype(jnp.float32) for x in (q, k, v, do)]
        ref_o = xla_fwd(*up[:3])
        ref_g = xla_fwd_bwd(*up)
    tol_o = max(2e-2, 3 * _rel_err(xla_fwd(q, k, v), ref_o))
    xla_g = xla_fwd_bwd(q, k, v, do)
    tol_g = max(2e-2, 3 * max(_rel_err(g, r) for g, r in zip(xla_g, ref_g)))
    for impl, f in impls.items():
        pallas = impl == "pallas"
        timer.row(
            "flash fwd",
            impl,
            shape,
            f,
            (q, k, v),
            flops=fwd_flops,
            check=_rel_check(ref_o, tol_o),
            pallas=pallas,
        )
        timer.row(
            "flash fwd+bwd",
            impl,
            shape,
            fwd_bwd(f),
            (q, k, v, do),
            flops=3.5 * fwd_flops,
            check=_rel_check(ref_g, tol_g),
            pallas=pallas,
        )


def time_decode(timer: Timer, small: bool):
    import jax
    import jax.numpy as jnp

    from qwen_jax.kernels import decode_attention as da

    b, s, n, k, h = (2, 256, 4, 2, 64) if small else (8, 8192, 32, 32, 128)
    shape = f"B{b} S{s} N{n} K{k} H{h} bf16"
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, n, h), jnp.bfloat16)
    kc, vc = (jax.random.normal(kk, (b, s, k, h), jnp.bfloat16) for kk in keys[1:])
    lengths = jnp.full((b,), s, jnp.int32)
    ref = lambda q, kc, vc, n_: da.decode_attention_reference(q, kc, vc, n_)  # noqa: E731
    pallas = lambda q, kc, vc, n_: da.decode_attention(  # noqa: E731
        q, kc, vc, n_, backend="gpu", interpret=timer.interpret
    )
    expected = jax.jit(ref)(q, kc, vc, lengths)
    args = (q, kc, vc, lengths)
    flops, bytes_ = da.decode_attention_flops(b, n, s, h), 2 * b * s * k * h * 2
    timer.row("decode", "xla reference", shape, ref, args, flops=flops, bytes_=bytes_)
    timer.row(
        "decode",
        "pallas",
        shape,
        pallas,
        args,
        flops=flops,
        bytes_=bytes_,
        check=_rel_check(expected, 2e-2),
        pallas=True,
    )


def time_matmul(timer: Timer, small: bool):
    import jax
    import jax.numpy as jnp

    from qwen_jax.kernels import matmul as mm

    m = n = kd = 256 if small else 8192
    shape = f"{m}x{kd} @ {kd}x{n} bf16"
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (m, kd), jnp.bfloat16)
    w = (jax.random.normal(kw, (kd, n), jnp.float32) * kd**-0.5).astype(jnp.bfloat16)
    expected = jax.jit(jnp.dot)(x, w)
    flops = mm.matmul_flops(m, n, kd)
    timer.row("matmul", "xla jnp.dot", shape, jnp.dot, (x, w), flops=flops)
    timer.row(
        "matmul",
        "pallas",
        shape,
        lambda x, w: mm.matmul(x, w, backend="gpu", interpret=timer.interpret),
        (x, w),
        flops=flops,
        check=_rel_check(expected, 2e-2),
        pallas=True,
    )

    # Weight-only int8: decode-sized M (weight-bandwidth bound) and prefill-sized M.
    kd, n = (256, 512) if small else (4096, 11008)
    wf = jax.random.normal(kw, (kd, n), jnp.float32) * kd**-0.5
    wq, scale = mm.quantize_int8(wf)
    wb = wf.astype(jnp.bfloat16)
    for m in (16, 256) if small else (16, 4096):
        shape = f"{m}x{kd} @ int8 {kd}x{n}"
        x = jax.random.normal(kx, (m, kd), jnp.bfloat16)
        flops = mm.matmul_flops(m, n, kd)
        deq = lambda x, wq, s: (  # noqa: E731
            jnp.dot(x, wq.astype(jnp.bfloat16), preferred_element_type=jnp.float32) * s
        ).astype(jnp.bfloat16)
        expected = jax.jit(deq)(x, wq, scale)
        weight_bytes = kd * n
        timer.row(
            "int8 matmul",
            "xla bf16 weights",
            shape,
            jnp.dot,
            (x, wb),
            flops=flops,
            bytes_=2 * weight_bytes,
        )
        timer.row(
            "int8 matmul",
            "xla dequant",
            shape,
            deq,
            (x, wq, scale),
            flops=flops,
            bytes_=weight_bytes,
        )
        timer.row(
            "int8 matmul",
            "pallas",
            shape,
            lambda x, wq, s: mm.int8_matmul(x, wq, s, backend="gpu", interpret=timer.interpret),
            (x, wq, scale),
            flops=flops,
            bytes_=weight_bytes,
            check=_rel_check(expected, 2e-2),
            pallas=True,
        )


# ------------------------------------------------------------------------------------ main


def _environment(interpret: bool):
    import jax

    device = jax.devices()[0]
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }
    if not interpret and env["backend"] != "gpu":
        raise SystemExit(
            f"gpu_check: no GPU (jax backend {env['backend']!r}, device {device.device_kind!r});"
            " run on an H100/H200 host with CUDA jax, or pass --interpret for a CPU smoke test"
        )
    return env


def _table(report: Report) -> str:
    lines = [f"{'group':<14}{'impl':<18}{'shape':<32}{'ms':>10}{'TFLOP/s':>10}{'GB/s':>9}"]
    for r in report.timings:
        if r.get("error"):
            tail = ("SKIP " if r.get("skipped") else "ERROR ") + r["error"]
            lines.append(f"{r['group']:<14}{r['impl']:<18}{r['shape']:<32}  {tail}")
            continue
        gbps = f"{r['gbps']:>9.0f}" if "gbps" in r else f"{'':>9}"
        lines.append(
            f"{r['group']:<14}{r['impl']:<18}{r['shape']:<32}{r['ms']:>10.3f}"
            f"{r['tflops']:>10.2f}{gbps}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    parser.add_argument("--small", action="store_true", help="tiny shapes, one case per kernel")
    parser.add_argument("--skip-timings", action="store_true", help="parity checks only")
    args = parser.parse_args(argv)

    try:
        env = _environment(args.interpret)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(f"gpu_check: {env}", flush=True)
    report = Report()
    parity_checks(report, args.interpret, args.small)
    if not args.skip_timings:
        timer = Timer(report, args.interpret, args.small)
        for section in (time_flash, time_decode, time_matmul):
            report.record_check(
                f"timings: {section.__name__}", lambda s=section: s(timer, args.small)
            )
    print(_table(report))
    result = {
        **env,
        "interpret": args.interpret,
        "small": args.small,
        "ok": report.ok,
        "checks": report.checks,
        "timings": [
            {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}
            for r in report.timings
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [c["name"] for c in report.checks if not c["ok"]]
    failed += [
        f"{r['group']} {r['impl']}"
        for r in report.timings
        if r.get("error") and not r.get("skipped")
    ]
    print(f"gpu_check: {'OK' if report.ok else 'FAILED: ' + ', '.join(failed)}; wrote {args.out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
