"""`GET /metrics`: the scheduler's stats (and the app's error counts) in Prometheus text format.

    qwen_jax_requests_running               gauge    requests holding a decode slot
    qwen_jax_requests_waiting               gauge    requests queued for a slot
    qwen_jax_generated_tokens_total         counter  tokens generated
    qwen_jax_prompt_tokens_total            counter  prompt tokens prefilled
    qwen_jax_requests_total{finish_reason}  counter  finished requests ("stop", "length",
                                                     "cancelled" (client gone), "error")
    qwen_jax_time_to_first_token_seconds    summary (quantiles of the recent requests the
                                            scheduler keeps, + sum and count) or histogram
                                            (when the scheduler keeps bucket counts)
    qwen_jax_compiled_programs              gauge    jitted programs compiled so far
    qwen_jax_http_errors_total{status}      counter  error responses sent, by HTTP status

Counters count since the server started; scrape with any Prometheus client.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

PREFIX = "qwen_jax_"


def _num(x: float) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) else str(int(x))


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(name: str, kind: str, help_: str, samples: list[tuple[str, dict, float]]) -> list[str]:
    lines = [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}"]
    for suffix, labels, value in samples:
        lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        series = f"{PREFIX}{name}{suffix}" + (f"{{{lab}}}" if lab else "")
        lines.append(f"{series} {_num(value)}")
    return lines


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted list (NaN when empty, as Prometheus clients do)."""
    if not sorted_xs:
        return math.nan
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


def _ttft(ttft) -> list[str]:
    name, help_ = "time_to_first_token_seconds", "seconds from arrival to the first token"
    if isinstance(ttft, Mapping):  # {"sum", "count", "buckets": {upper bound: cumulative count}}
        samples = [
            ("_bucket", {"le": _num(float(le))}, n) for le, n in sorted(ttft["buckets"].items())
        ]
        if not any(math.isinf(float(le)) for le in ttft["buckets"]):
            samples.append(("_bucket", {"le": "+Inf"}, ttft["count"]))
        samples += [("_sum", {}, float(ttft["sum"])), ("_count", {}, ttft["count"])]
        return _metric(name, "histogram", help_, samples)
    xs = sorted(float(x) for x in ttft or ())
    samples = [("", {"quantile": q}, _quantile(xs, q)) for q in (0.5, 0.9, 0.99)]
    samples += [("_sum", {}, sum(xs)), ("_count", {}, len(xs))]
    return _metric(name, "summary", help_ + " (recent requests)", samples)


def render(stats: Mapping, http_errors: Mapping[int, int] | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of `Scheduler.stats()` and the app's error
    counts by status."""
    lines: list[str] = []
    for name, kind, help_, key in (
        ("requests_running", "gauge", "requests holding a decode slot", "running"),
        ("requests_waiting", "gauge", "requests queued for a slot", "waiting"),
        ("generated_tokens_total", "counter", "tokens generated", "generated_tokens"),
        ("prompt_tokens_total", "counter", "prompt tokens prefilled", "prompt_tokens"),
    ):
        lines += _metric(name, kind, help_, [("", {}, stats[key])])
    finished = dict(stats.get("requests", {}))
    for reason in ("stop", "length", "cancelled", "error"):
        finished.setdefault(reason, 0)
    lines += _metric(
        "requests_total",
        "counter",
        "finished requests by finish reason",
        [("", {"finish_reason": r}, n) for r, n in sorted(finished.items())],
    )
    lines += _ttft(stats.get("ttft_s"))
    if "compiled_programs" in stats:
        help_ = "jitted programs compiled so far"
        lines += _metric(
            "compiled_programs", "gauge", help_, [("", {}, stats["compiled_programs"])]
        )
    lines += _metric(
        "http_errors_total",
        "counter",
        "error responses by HTTP status",
        [("", {"status": s}, n) for s, n in sorted((http_errors or {}).items())],
    )
    return "\n".join(lines) + "\n"
