"""GPU performance run (issue 19): full-depth train steps with each lever before/after, the
PyTorch peer on the same shapes, and decode serving figures, in one bounded call.

On an H100/H200 host (jax with CUDA, torch with CUDA, transformers), from the repository root:
    python scripts/gpu_perf.py --out benchmarks/results/gpu_perf_h200.json
CPU smoke run (tiny shapes, every code path):
    python scripts/gpu_perf.py --smoke --out /tmp/gpu_perf.json

Phases (--phases, default all, in this order; each in its own process, so one phase's JAX or
torch memory, crash or hang never reaches the next, and torch gets the GPU JAX would hold):
  train  (scripts/gpu_perf_train.py) the full train step (AdamW + clip, bf16 compute, fp32
         master weights) of Qwen-1.8B at full depth (24 layers), sequence 2048 and 8192, and
         Qwen-7B widths cut to 16 of 32 layers (fp32 weights + Adam moments + gradients are
         ~16 bytes/param: the full 7.7B would need ~124 GB before activations on a 141 GB
         GPU; 16 layers are ~4.5B params, ~72 GB); 16,384 tokens per step, packed rows. A base
         row per shape and one row per lever: attention xla / pallas / cuDNN (unpacked rows),
         remat full / save_qkv_proj / none, the fused LM-head loss, MaxText's XLA flags (one
         process per flag set: XLA reads XLA_FLAGS when its backend starts). Model TFLOP/s
         and MFU against qwen_jax/hardware.py's bf16 dense peak.
  peer   (scripts/gpu_perf_peer.py) torch + transformers Qwen2 (SDPA) at the train shapes and
         `generate` at the serve shape, on the same GPU.
  serve  (scripts/gpu_perf_serve.py) decode tokens/s of our Engine at batch 1 and 64, random
         7B-shape model, bf16 and int8 weight-only, and the HBM bandwidth fraction.

Every phase has a time budget (--budget-s: seconds for each phase, or "train=N,peer=N,serve=N";
defaults below): inside a phase a row that would not fit (judged by the slowest row so far) is
recorded as skipped, and the phase process is killed GRACE_S after its budget (its rows so far
are kept: it writes them after each row). Errors are recorded and the run goes on. The JSON
(--out, rewritten after every phase) holds the environment, every row, and the ratios:
lever before/after, ours/peer train tokens/s, ours/peer decode tokens/s.
Exit status: 0 all rows ok, 1 some row or phase failed, 2 no GPU (without --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_perf_* phase modules

PHASES = ("train", "peer", "serve")
DEFAULT_BUDGET_S = {"train": 240.0, "peer": 80.0, "serve": 110.0}
SMOKE_BUDGET_S = {"train": 100.0, "peer": 40.0, "serve": 50.0}  # a loaded 2-core CPU
# Past a phase budget before its process is killed: process start, imports, the row in flight
# (GPU: ~15 s to start; a loaded 2-core CPU takes minutes to import and compile).
GRACE_S = {False: 60.0, True: 300.0}
FLAG_SHARE = 0.2  # of the train budget, for each XLA flag set's process (one row)


def parse_budget(text: str | None, smoke: bool = False) -> dict[str, float]:
    budget = dict(SMOKE_BUDGET_S if smoke else DEFAULT_BUDGET_S)
    if not text:
        return budget
    if "=" not in text:
        return {p: float(text) for p in PHASES}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in PHASES:
            raise SystemExit(f"gpu_perf: --budget-s names unknown phase {name!r}")
        budget[name] = float(value)
    return budget


# ------------------------------------------------------------------ one phase process


def environment() -> dict:
    import jax
    from gpu_perf_train import _short

    from qwen_jax.hardware import chip_for_device_kind

    dev = jax.devices()[0]
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind}
    env["device_count"] = jax.device_count()
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    for mod in ("jaxlib", "flax", "torch", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing peer is recorded, not fatal
            env[mod] = f"unavailable ({_short(e)})"
    try:
        chip = chip_for_device_kind(dev.device_kind)
        env["chip"], env["peak_bf16_flops"] = chip.name, chip.peak_bf16_flops
    except ValueError:
        env["chip"], env["peak_bf16_flops"] = None, None
    return env


def child(args) -> int:
    """Run one phase (or the rows of one XLA flag set) and keep `args.child_out` current."""
    from gpu_perf_train import Budget

    out = {"phase": args.child}

    def emit(rows, extra=None):
        out.update(extra or {}, rows=rows)
        args.child_out.write_text(json.dumps(out))

    budget = Budget(float(args.budget_s))
    if args.child == "peer":  # torch only: never start a JAX backend here
        import gpu_perf_peer

        levers = set(args.levers.split(",")) if args.levers else None
        out.update(gpu_perf_peer.peer_phase(budget, args.smoke, emit, levers, args.rows))
    else:
        env = environment()
        out["env"] = env
        if not args.smoke and env["backend"] != "gpu":
            out["error"] = f"no GPU (jax backend {env['backend']!r})"
            emit([])
            return 2
        if args.child == "train":
            import gpu_perf_train

            levers = set(args.levers.split(",")) if args.levers else None
            ph = gpu_perf_train.train_phase(
                budget, args.smoke, env["peak_bf16_flops"], levers, args.flag_set or "",
                args.profile, emit, args.rows,
            )  # fmt: skip
        else:
            import gpu_perf_serve

            ph = gpu_perf_serve.serve_phase(budget, args.smoke, env["chip"], emit)
        out.update(ph)
    emit(out["rows"])
    return 0


# ------------------------------------------------------------------------- the parent


def run_child(args, phase: str, budget_s: float, flag_set: str = "") -> dict:
    """One phase process; its JSON (what it wrote, if it died) with status fields added."""
    from gpu_perf_train import XLA_FLAG_SETS

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = Path(f.name)
    cmd = [sys.executable, __file__, "--child", phase, "--child-out", str(path)]
    cmd += ["--budget-s", str(budget_s)]
    for flag, value in (("--smoke", args.smoke), ("--levers", args.levers), ("--rows", args.rows)):
        if value:
            cmd += [flag] + ([] if value is True else [str(value)])
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    env = dict(os.environ)
    # Each phase process has the GPU to itself: let JAX take more than its default 75%.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if flag_set:
        cmd += ["--flag-set", flag_set]
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + XLA_FLAG_SETS[flag_set]).strip()
    t0 = time.perf_counter()
    try:
        limit = budget_s + GRACE_S[bool(args.smoke)]
        p = subprocess.run(cmd, env=env, timeout=limit, stderr=subprocess.PIPE, text=True)
        rc, tail = p.returncode, p.stderr[-2000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", (e.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    sys.stderr.write(tail)
    try:
        res = json.loads(path.read_text() or "{}")
    except json.JSONDecodeError:
        res = {}
    path.unlink(missing_ok=True)
    res.setdefault("rows", [])
    res.update(returncode=rc, seconds=round(time.perf_counter() - t0, 1), budget_s=budget_s)
    if rc not in (0, 2) and "error" not in res:
        res["error"] = f"phase process exit {rc}: {tail.strip()[-600:]}"
    return res


def ratios(phases: dict) -> dict:
    """Before/after per lever (vs the shape's base row; cuDNN vs pallas on unpacked rows),
    ours/peer train tokens/s (our base row and our fastest row of the shape), ours/peer
    decode tokens/s (bf16 weights, same batch)."""
    ok = lambda rows: [r for r in rows if r.get("status") == "ok"]  # noqa: E731
    train = ok(phases.get("train", {}).get("rows", []))
    peer = ok(phases.get("peer", {}).get("rows", []))
    serve = ok(phases.get("serve", {}).get("rows", []))
    shape = lambda r: (r["model"], r["layers"], r["seq"])  # noqa: E731
    out = {"levers": [], "train_vs_peer": [], "decode_vs_peer": []}
    for r in train:
        if r["lever"] == "base" or (
            r["lever"] == "attention_unpacked" and r["attention"] != "cudnn"
        ):
            continue
        unpacked = r["lever"] == "attention_unpacked"
        for b in train:
            if shape(b) == shape(r) and (
                (b["lever"], b["attention"]) == ("attention_unpacked", "pallas")
                if unpacked
                else b["lever"] == "base"
            ):
                out["levers"].append(
                    dict(before=b["label"], after=r["label"], lever=r["lever"],
                         speedup=round(b["step_ms"] / r["step_ms"], 3))
                )  # fmt: skip
    for p in (p for p in peer if p["kind"] == "train"):
        mine = [r for r in train if shape(r) == shape(p)]
        base = [r for r in mine if r["lever"] == "base"]
        if mine:
            best = max(mine, key=lambda r: r["tokens_per_s"])
            rate = p["tokens_per_s"]
            out["train_vs_peer"].append(
                dict(shape=list(shape(p)), peer_tokens_per_s=rate,
                     base_ratio=round(base[0]["tokens_per_s"] / rate, 3) if base else None,
                     best=best["label"], best_ratio=round(best["tokens_per_s"] / rate, 3))
            )  # fmt: skip
    for p in (p for p in peer if p["kind"] == "serve"):
        for r in serve:
            if r["batch"] == p["batch"] and r["weights"] == p["weights"]:
                out["decode_vs_peer"].append(
                    dict(batch=p["batch"], weights=p["weights"],
                         ratio=round(r["decode_tokens_per_s"] / p["decode_tokens_per_s"], 3))
                )  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--out", type=Path, default=Path("gpu_perf.json"))
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--budget-s", default=None, help="N (each phase) or train=N,peer=N,serve=N")
    p.add_argument("--levers", default=None, help="train rows of these levers only, e.g. base,loss")
    p.add_argument("--rows", type=int, default=None, help="at most N train rows per process")
    p.add_argument("--profile", type=Path, default=None, help="XLA profile of the base rows here")
    p.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--flag-set", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    phases = [x for x in args.phases.split(",") if x]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"gpu_perf: unknown phase(s) {unknown}; choose from {list(PHASES)}")
    budgets = parse_budget(args.budget_s, args.smoke)
    result = {"argv": sys.argv[1:] if argv is None else list(argv), "smoke": args.smoke}
    result["phases"], no_gpu = {}, False
    for name in phases:
        if name == "train":
            from gpu_perf_train import XLA_FLAG_SETS

            flag_sets = (
                [] if args.levers and "xla_flags" not in args.levers else list(XLA_FLAG_SETS)
            )
            if args.levers == "xla_flags":
                flag_sets, main_s = list(XLA_FLAG_SETS), 0.0
            else:
                main_s = budgets["train"] * (1 - FLAG_SHARE * len(flag_sets))
            parts = [run_child(args, "train", main_s)] if main_s else []
            for fs in flag_sets:
                parts.append(run_child(args, "train", budgets["train"] * FLAG_SHARE, fs))
            ph = {
                "rows": [r for part in parts for r in part["rows"]],
                "processes": [{k: v for k, v in part.items() if k != "rows"} for part in parts],
                "env": next((part["env"] for part in parts if "env" in part), None),
            }
            errors = [part["error"] for part in parts if "error" in part]
            if errors:
                ph["error"] = "; ".join(errors)
            no_gpu |= any(part["returncode"] == 2 for part in parts)
        else:
            ph = run_child(args, name, budgets[name])
            no_gpu |= ph["returncode"] == 2
        ph["ok"] = "error" not in ph and all(r.get("status") != "error" for r in ph["rows"])
        result["phases"][name] = ph
        result.setdefault("env", ph.get("env"))
        result["ratios"] = ratios(result["phases"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    result["ok"] = all(ph["ok"] for ph in result["phases"].values())
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["ratios"], indent=1))
    print(f"gpu_perf: {'OK' if result['ok'] else 'ERRORS (see the JSON)'}; wrote {args.out}")
    return 2 if no_gpu else (0 if result["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())
