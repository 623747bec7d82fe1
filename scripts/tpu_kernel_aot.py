"""Decode-attention and matmul kernels compiled ahead of time for TPU chips at serving shapes.

For each chip (one chip of a compile-only slice, from this CPU host; qwen_jax.testing.tpu_aot)
and each case, the Pallas kernel and the model's XLA path for the same op (what
qwen_jax.model.dispatch runs with impl="xla") are lowered and compiled by libtpu, and the
compiler's figures are recorded: compile seconds, memory_analysis() (argument, output, alias,
temp, generated code bytes) and cost_analysis(), next to the HBM bytes the op must move
(computed from the shapes) and the HBM-bandwidth roofline time those bytes imply.

  decode attention  Qwen-7B (32 q / 32 kv heads) and Qwen2-7B-like GQA (28 q / 4 kv heads),
                    head dim 128, batch 1 / 8 / 64, cache 2048 / 8192 slots, bf16 cache,
                    the whole cache visible (lengths == S: the step's worst case)
  matmul            Qwen-7B LM head (4096 -> 151936) and MLP (4096 -> 11008, 11008 -> 4096),
                    M = 1 / 64 / 2048 rows, bf16 activations, int8 weights (weight-only, per
                    channel scale) and bf16 weights

  nice -n 10 python scripts/tpu_kernel_aot.py [--chips v5e,v6e] [--preset serving|smoke]
      [--kernels decode,int8_matmul,matmul] [--out benchmarks/results/tpu_kernel_aot.json]

Nothing here runs on a TPU: the figures are the compiler's, not measurements. The decode kernel
has no int8 KV cache path (no KV scale input), so int8 KV is not compiled (listed in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

for key, value in (
    ("JAX_PLATFORMS", "cpu"),
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),  # these two only silence libtpu's host probing
    ("TPU_WORKER_HOSTNAMES", "localhost"),
):
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (after the environment above)
import jax.numpy as jnp  # noqa: E402

from qwen_jax.hardware import CHIPS, TPU_CHIPS  # noqa: E402

MIB = 1 << 20
# Published HBM bandwidth per chip (qwen_jax.hardware), for the roofline estimate only.
HBM_BYTES_PER_S = {name: CHIPS[name].hbm_bytes_per_s for name in TPU_CHIPS}
# What cost_analysis() keys we keep (the rest are per-operand breakdowns).
COST_KEYS = ("flops", "transcendentals", "bytes accessed", "optimal_seconds")
NOT_COMPILED = [
    "decode attention with an int8 KV cache: the kernel takes k/v in q's dtype only (no KV "
    "scale input), so there is no int8 KV path to compile"
]
SDS = jax.ShapeDtypeStruct
# Data-moving ops of the optimized entry computation (a TPU `reshape` that is not a bitcast
# rewrites the tiled layout), and the bytes per element of HLO types.
_MOVES = ("copy-start", "copy", "pad", "reshape", "transpose")
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(\S+) = \(?(\w+)\[([\d,]*)\]\{([^}]*)\}.*? (" + "|".join(_MOVES) + r")\("
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One op at one shape: the kernel and the XLA path take the same arguments.

    hbm_read_bytes / hbm_write_bytes: what the op must move at least (each input read once,
    the output written once), from the shapes alone.
    """

    kernel: str
    label: str
    dims: dict
    shapes: tuple
    pallas: Callable
    xla: Callable
    hbm_read_bytes: int
    hbm_write_bytes: int


def _nbytes(*shapes) -> int:
    return sum(jnp.dtype(s.dtype).itemsize * math.prod(s.shape) for s in shapes)


def decode_case(name, n, k, h, b, s, dtype=jnp.bfloat16) -> Case:
    """Decode attention: q [B,N,H], k/v [B,S,K,H], lengths/starts [B] int32, window () int32
    (traced, as the model passes it) -> o [B,N,H]."""
    from qwen_jax.kernels import decode_attention as da
    from qwen_jax.model import dispatch

    def pallas(q, kc, vc, lengths, starts, window):
        return da.decode_attention(
            q, kc, vc, lengths, window=window, starts_b=starts, backend="tpu"
        )

    def xla(q, kc, vc, lengths, starts, window):
        # The serving engine's XLA path for one new token (dispatch.cache_attention, impl xla).
        o = dispatch.cache_attention(
            q[:, None], kc, vc, impl="xla", q_slot_bt=(lengths - 1)[:, None], starts_b=starts,
            window=window,
        )  # fmt: skip
        return o[:, 0]

    shapes = (
        SDS((b, n, h), dtype),
        SDS((b, s, k, h), dtype),
        SDS((b, s, k, h), dtype),
        SDS((b,), jnp.int32),
        SDS((b,), jnp.int32),
        SDS((), jnp.int32),
    )
    dims = dict(model=name, B=b, S=s, N=n, K=k, H=h, kv_dtype=jnp.dtype(dtype).name)
    label = f"{name} B={b} S={s}"
    return Case(
        "decode_attention", label, dims, shapes, pallas, xla, _nbytes(*shapes), _nbytes(shapes[0])
    )


def matmul_case(name, m, k, n, weights="int8") -> Case:
    """x [M,K] bf16 @ w [K,N] -> [M,N] bf16; weights "int8" (wq int8 + scale [N] fp32, the
    weight-only int8 serving path) or "bf16"."""
    from qwen_jax.kernels import matmul as mm
    from qwen_jax.model import dispatch

    x = SDS((m, k), jnp.bfloat16)
    if weights == "int8":
        shapes = (x, SDS((k, n), jnp.int8), SDS((n,), jnp.float32))

        def pallas(x, wq, scale):
            return mm.int8_matmul(x, wq, scale, backend="tpu")

        def xla(x, wq, scale):
            return dispatch.matmul("mk,kn->mn", x, wq, impl="xla", scale=scale)

    elif weights == "bf16":
        shapes = (x, SDS((k, n), jnp.bfloat16))

        def pallas(x, w):
            return mm.matmul(x, w, backend="tpu")

        def xla(x, w):
            return dispatch.matmul("mk,kn->mn", x, w, impl="xla")

    else:
        raise ValueError(f"weights must be 'int8' or 'bf16', got {weights!r}")
    kernel = "int8_matmul" if weights == "int8" else "matmul"
    dims = dict(op=name, M=m, K=k, N=n, weights=weights)
    label = f"{name} M={m} ({k}x{n})"
    return Case(
        kernel, label, dims, shapes, pallas, xla, _nbytes(*shapes), _nbytes(SDS((m, n), x.dtype))
    )


def cases(preset: str, kernels: tuple[str, ...]) -> list[Case]:
    """The case list of a preset: "serving" (the real shapes) or "smoke" (one small shape per
    kernel, for the test)."""
    out = []
    if preset == "serving":
        decode = [
            decode_case(name, n, kv, 128, b, s)
            for name, n, kv in (("qwen_7b", 32, 32), ("qwen2_7b_gqa", 28, 4))
            for s in (2048, 8192)
            for b in (1, 8, 64)
        ]
        # Qwen-7B: hidden 4096, FFN 11008 (w1 and w2 are separate [D, F] weights), vocab 151936.
        mm_shapes = (
            ("lm_head", 4096, 151_936),
            ("mlp_up", 4096, 11_008),
            ("mlp_down", 11_008, 4096),
        )
        mms = {
            w: [
                matmul_case(name, m, k, n, w)
                for name, k, n in mm_shapes
                for m in (1, 64, 2048)
            ]
            for w in ("int8", "bf16")
        }  # fmt: skip
    elif preset == "smoke":
        decode = [decode_case("smoke_gqa", 8, 2, 128, 2, 384)]
        mms = {w: [matmul_case("smoke", 8, 256, 384, w)] for w in ("int8", "bf16")}
    else:
        raise ValueError(f"preset must be 'serving' or 'smoke', got {preset!r}")
    for kernel in kernels:
        if kernel == "decode":
            out += decode
        elif kernel == "int8_matmul":
            out += mms["int8"]
        elif kernel == "matmul":
            out += mms["bf16"]
        else:
            raise ValueError(f"unknown kernel {kernel!r}; expected decode, int8_matmul or matmul")
    return out


def layout_moves(hlo_text: str, min_bytes: int = MIB) -> list[dict]:
    """Copies, pads, relayouts and transposes of >= min_bytes in the entry computation of an
    optimized TPU HLO module: data the program moves besides the op itself. `vmem` marks a
    result placed in VMEM (layout memory space S(1)), which memory_analysis' temp omits."""
    entry = hlo_text[hlo_text.index("\nENTRY") :].split("\n}", 1)[0]
    moves = []
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if not m or m.group(2) not in _HLO_BYTES:
            continue
        name, dtype, dims, layout, op = m.groups()
        nbytes = _HLO_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
        if nbytes >= min_bytes:
            shape = f"{dtype}[{dims}]"
            moves.append(dict(op=op, name=name, shape=shape, bytes=nbytes, vmem="S(1)" in layout))
    return moves


def compile_one(chip: str, case: Case, impl: str) -> dict:
    """Lower + compile one (case, impl) for `chip`; the compiler's figures as a JSON record.
    A compile error (e.g. RESOURCE_EXHAUSTED: over HBM or VMEM) is recorded, not raised."""
    from qwen_jax.testing.tpu_aot import lower_for_tpu

    rec = dict(chip=chip, kernel=case.kernel, impl=impl, case=case.label, dims=case.dims)
    rec["hbm_read_bytes"], rec["hbm_write_bytes"] = case.hbm_read_bytes, case.hbm_write_bytes
    moved = case.hbm_read_bytes + case.hbm_write_bytes
    rec["roofline_us"] = round(moved / HBM_BYTES_PER_S[chip] * 1e6, 3)
    fn = case.pallas if impl == "pallas" else case.xla
    start = time.perf_counter()
    try:
        lowered, device = lower_for_tpu(chip, fn, *case.shapes)
        rec["device_kind"] = device.device_kind
        rec["lower_s"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        compiled = lowered.compile()
        rec["compile_s"] = round(time.perf_counter() - start, 3)
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is a result
        rec["error"] = (str(e).splitlines() or [type(e).__name__])[0][:500]
        return rec
    mem = compiled.memory_analysis()
    rec["memory"] = {
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "generated_code_bytes": mem.generated_code_size_in_bytes,
    }
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
    rec["cost"] = {key: float(cost[key]) for key in COST_KEYS if key in cost}
    text = compiled.as_text()
    rec["tpu_custom_calls"] = text.count("tpu_custom_call")
    # Moves of at least 1/16 of the op's input bytes: the cache, a weight, not a scalar.
    rec["layout_moves"] = layout_moves(text, max(4096, case.hbm_read_bytes // 16))
    rec["hbm_copy_bytes"] = sum(m["bytes"] for m in rec["layout_moves"] if not m["vmem"])
    return rec


def _row(rec: dict) -> str:
    if "error" in rec:
        head = f"| {rec['chip']} | {rec['kernel']} | {rec['impl']} | {rec['case']}"
        return f"{head} | ERROR: {rec['error'][:80]} ||||||"
    mem = rec["memory"]
    return (
        f"| {rec['chip']} | {rec['kernel']} | {rec['impl']} | {rec['case']} "
        f"| {mem['temp_bytes'] / MIB:.2f} | {mem['argument_bytes'] / MIB:.1f} "
        f"| {rec['hbm_read_bytes'] / MIB:.1f} | {rec['hbm_copy_bytes'] / MIB:.1f} "
        f"| {rec['roofline_us']:.1f} "
        f"| {rec['cost'].get('optimal_seconds', float('nan')):.3g} | {rec['compile_s']:.2f} |"
    )  # fmt: skip


HEADER = (
    "| chip | kernel | impl | shape | temp MiB | args MiB | HBM read MiB | HBM copies MiB "
    "| roofline us | cost optimal_seconds | compile s |\n|" + "---|" * 11
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="v5e,v6e", help="comma list of v4, v5e, v5p, v6e")
    parser.add_argument("--preset", default="serving", choices=("serving", "smoke"))
    parser.add_argument("--kernels", default="decode,int8_matmul,matmul")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/tpu_kernel_aot.json"))
    args = parser.parse_args(argv)
    chips = [c for c in args.chips.split(",") if c]
    unknown = [c for c in chips if c not in HBM_BYTES_PER_S]
    if unknown:
        parser.error(f"unknown chip(s) {unknown}; expected some of {sorted(HBM_BYTES_PER_S)}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        parser.error("libtpu is not installed (pip install -e '.[tpu]')")
    todo = cases(args.preset, tuple(k for k in args.kernels.split(",") if k))

    import libtpu

    result = {
        "command": "python scripts/tpu_kernel_aot.py " + " ".join(argv or sys.argv[1:]),
        "jax": jax.__version__,
        "libtpu": getattr(libtpu, "__version__", "?"),
        "xla_optimization_level": str(jax.config.jax_optimization_level),
        "hbm_bytes_per_s": {c: HBM_BYTES_PER_S[c] for c in chips},
        "notes": [
            "compile-only: no TPU ran; figures are libtpu's memory_analysis / cost_analysis",
            "hbm_read_bytes: each input read once (decode: the whole cache visible)",
            "roofline_us: (hbm_read_bytes + hbm_write_bytes) / published HBM bandwidth",
            "cost.optimal_seconds is the TPU compiler's own estimate, kept raw: it is not a "
            "trustworthy time (negative values were seen, shared/notes/tpu_aot.md), and the "
            "Pallas kernels declare no cost_estimate, so their custom calls count as ~0",
            "memory.temp_bytes counts HBM temporaries only: XLA places small ones in VMEM "
            "(layout memory space S(1)) on v5e/v6e, so temp 0 does not mean nothing was copied",
            "layout_moves: copy / pad / non-bitcast reshape / transpose results in the optimized "
            "entry computation of at least 1/16 of the op's input bytes (vmem: placed in VMEM); "
            "one in HBM (vmem false) is an extra write + read of that many HBM bytes per call, "
            "hbm_copy_bytes sums those; one into VMEM is an HBM read the op needs anyway "
            "(copy-start: a prefetch) but takes VMEM and vector-unit time",
        ],
        "not_compiled": NOT_COMPILED,
        "records": [],
    }
    print(HEADER, flush=True)
    for chip in chips:  # one chip at a time, one compile at a time
        for case in todo:
            for impl in ("pallas", "xla"):
                rec = compile_one(chip, case, impl)
                result["records"].append(rec)
                print(_row(rec), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({len(result['records'])} records)")
    # Not fitting HBM (RESOURCE_EXHAUSTED) is a finding; any other compile error fails the run.
    errors = [r["error"] for r in result["records"] if "error" in r]
    failed = [e for e in errors if "RESOURCE_EXHAUSTED" not in e]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
