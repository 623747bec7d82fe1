"""The reproduction chain's evaluation and report (qwen_jax/reproduce.py runs the stages).

evaluate_all   every model on the held-out benchmarks through evals.runner.run (per-sample
               records in DIR/evals/<model>; one engine, its weights refreshed per model)
collect        DIR/evals/*/results.json -> {models x metrics, each variant's delta over the
               base on its own domain}; write_tables -> DIR/results.{md,json}
plot_losses    DIR/plots/<stage>_loss.png: train and eval loss from each run's metrics.jsonl
showcase       what the variants learned, chosen honestly: the first held-out item (the
               benchmark's fixed order) the math model solved and the first the code model
               passed, with how many of the held-out items each one solved (or says plainly
               that it solved none)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

BASE = "base"
# The variants the demo shows (fixed, not picked by score): Math-Qwen-Chat answering word
# problems, Code-Qwen-Chat writing functions asked for in words (synth_code's chat protocol).
MATH_MODEL, CODE_MODEL, CODE_COLUMN = "math_qwen_chat", "code_qwen_chat", "synth_code_chat"


def _export(out: Path, name: str) -> Path:
    return out / "export" if name == BASE else out / name


class _Models:
    """One engine for every model of the chain (same architecture): the first export builds
    it, the others are swapped in with `Engine.refresh` (no recompilation)."""

    def __init__(self, batch_size: int):
        self.engine = self.tok = None
        self.batch_size = batch_size

    def load(self, export: Path):
        from flax import nnx

        from qwen_jax.checkpoint import load_params
        from qwen_jax.infer.eval_model import EngineEvalModel
        from qwen_jax.infer.load import load_engine

        if self.engine is None:
            self.engine, self.tok = load_engine(export)
        else:
            _, model = load_params(export, cfg=self.engine.cfg)
            self.engine.refresh(nnx.state(model, nnx.Param))
        return EngineEvalModel(self.engine, self.tok, batch_size=self.batch_size)


def task_names(out: Path, metrics: dict) -> dict[str, str]:
    """column -> the runner's task name (names carry the protocol: synth_code-chat-0shot)."""
    from qwen_jax.evals.tasks import build_task

    return {
        col: build_task(bench, out / "data", chat=chat).name
        for col, (bench, chat, _) in metrics.items()
    }


def evaluate_all(out: Path, chain: dict, models: list[str], metrics: dict, settings, save, log):
    """Evaluate each model not yet evaluated at its current export on every column of
    `metrics` (chain["evaluated"] holds the export's finish stamp; records of an older export
    are removed first)."""
    from qwen_jax.evals import runner
    from qwen_jax.evals.tasks import BENCHMARKS

    missing = sorted({b for b, _, _ in metrics.values()} - set(BENCHMARKS))
    if missing:
        raise ValueError(f"benchmark {missing[0]} is not registered in qwen_jax/evals/tasks.py")
    names = task_names(out, metrics)
    engine = _Models(settings.eval_batch)
    for name in models:
        stamp = chain["finished"][name]["at"]
        done = chain["evaluated"].get(name, {})
        where = out / "evals" / name
        if done.get("model_at") == stamp and done.get("complete"):
            log(f"{name}: evaluated, skipped")
            continue
        if done.get("model_at") != stamp:
            shutil.rmtree(where, ignore_errors=True)  # another export's samples
        chain["evaluated"][name] = {"model_at": stamp, "complete": False}
        save()
        model = engine.load(_export(out, name))
        scores = []
        for col, (bench, chat, _) in metrics.items():
            results = runner.run(
                model,
                [bench],
                out / "data",
                where,
                limit=settings.eval_limit,
                chat=chat,
                batch_size=settings.eval_batch,
                progress=False,
            )
            scores.append(f"{col} {_fmt(score_of(results.get(names[col], {})))}")
        log(f"{name}: " + ", ".join(scores))
        chain["evaluated"][name]["complete"] = True
        save()


def score_of(summary: dict) -> float | None:
    """A benchmark's number: its own report's "overall" (code_ppl's pooled perplexity) or the
    runner's score (accuracy / pass@1, percent)."""
    report = summary.get("report") or {}
    value = report.get("overall", summary.get("overall"))
    return None if value is None else float(value)


def lower_is_better(metric: str) -> bool:
    return any(w in metric.lower() for w in ("ppl", "perplexity", "loss", "nll", "bits"))


def collect(out: Path, models, metrics: dict, domains: dict[str, str]) -> dict:
    """{"models": {model: {column: score | None}}, "metrics": {column: {task, metric, domain,
    better, n}}, "deltas": {variant: {column: score - base}} on the variant's own domain}."""
    names = task_names(out, metrics)
    table: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for name in models:
        path = out / "evals" / name / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        table[name] = {}
        for col, (_, _, domain) in metrics.items():
            summary = results.get(names[col], {})
            table[name][col] = score_of(summary)
            if "metric" in summary:
                better = "lower" if lower_is_better(summary["metric"]) else "higher"
                info[col] = {"task": names[col], "metric": summary["metric"], "domain": domain}
                info[col] |= {"better": better, "n": summary.get("n")}
    deltas = {}
    for name, domain in domains.items():
        deltas[name] = {}
        for col, (_, _, col_domain) in metrics.items():
            mine, base = table[name].get(col), table[BASE].get(col)
            if col_domain == domain and mine is not None and base is not None:
                deltas[name][col] = round(mine - base, 4)
    return {"models": table, "metrics": info, "deltas": deltas}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(results: dict) -> str:
    """Rows = models, columns = metrics; a variant's own-domain cells carry (delta vs base)."""
    benches = list(next(iter(results["models"].values())).keys())
    head = []
    for b in benches:
        m = results["metrics"].get(b, {})
        arrow = {"higher": " ↑", "lower": " ↓"}.get(m.get("better", ""), "")
        head.append(f"{b} ({m.get('metric', '?')}{arrow})")
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(benches)]
    for name, row in results["models"].items():
        cells = []
        for b in benches:
            cell = _fmt(row[b])
            delta = results["deltas"].get(name, {}).get(b)
            if delta is not None:
                cell += f" ({delta:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ns = ", ".join(f"{b} {m['n']}" for b, m in results["metrics"].items() if m.get("n"))
    lines += [
        "",
        f"Held-out items per benchmark: {ns or '-'}. In parentheses: a variant's change over "
        "the base on its own domain's benchmarks (↑ higher is better, ↓ lower is better).",
    ]
    return "\n".join(lines) + "\n"


def write_tables(out: Path, results: dict) -> None:
    for name, text in (
        ("results.json", json.dumps(results, indent=2) + "\n"),
        ("results.md", "# Reproduction chain: held-out results\n\n" + markdown(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)


def plot_losses(out: Path, runs: dict[str, Path]) -> list[Path]:
    """DIR/plots/<stage>_loss.png for each run with a metrics.jsonl: train and eval loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    written = []
    for name, run in runs.items():
        path = run / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for key, style in (("loss", "-"), ("eval_loss", "o--")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.set_title(f"{name}: training and held-out loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        target = out / "plots" / f"{name}_loss.png"
        fig.savefig(target)
        plt.close(fig)
        written.append(target)
    return written


def _samples(out: Path, model: str, task: str) -> list[dict]:
    """The model's scored records of `task`, in the benchmark's order (latest per id)."""
    path = out / "evals" / model / f"{task}.samples.jsonl"
    if not path.exists():
        return []
    latest: dict[str, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by an interrupted write
        if r.get("status") != "bad_input":
            latest[r["id"]] = r
    return list(latest.values())


def _first_right(records: list[dict]) -> tuple[dict | None, int, int]:
    right = [r for r in records if r.get("correct")]
    return (right[0] if right else None), len(right), len(records)


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line for line in str(text).rstrip("\n").splitlines())


def _question(prompt: str) -> str:
    """The user's turn of a ChatML prompt (the prompt itself when it is not one)."""
    marker = "<|im_start|>user\n"
    if marker in prompt:
        return prompt.rsplit(marker, 1)[1].split("<|im_end|>")[0].strip()
    return prompt.strip()


def showcase(out: Path, metrics: dict) -> str:
    """What the variants learned, as text (see the module docstring): the math model on
    synth_math, the code model (Code-Qwen-Chat, asked in words) on synth_code's chat protocol."""
    from qwen_jax.evals.tasks import build_task

    names = task_names(out, metrics)
    lines = []
    rec, right, n = _first_right(_samples(out, MATH_MODEL, names["synth_math"]))
    lines.append(f"== {MATH_MODEL} on held-out word problems: solved {right} of {n} held-out")
    if rec is None:
        lines.append("   It solved none of them." if n else "   (not evaluated)")
    else:
        lines += [
            "   the first one it solved (in the benchmark's order):",
            _indent(_question(rec["prompt"])),
            "   its answer:",
            _indent(str(rec["output"]).strip()),
            f"   extracted {rec['extracted']}, gold {rec['gold']}",
        ]
    lines.append("")
    rec, right, n = _first_right(_samples(out, CODE_MODEL, names[CODE_COLUMN]))
    lines.append(f"== {CODE_MODEL} on held-out functions: solved {right} of {n} held-out")
    if rec is None:
        lines.append("   None of its functions passed." if n else "   (not evaluated)")
    else:
        bench, chat, _ = metrics[CODE_COLUMN]
        items = {it.id: it for it in build_task(bench, out / "data", chat=chat).items}
        tests = len(items[rec["id"]].meta.get("tests", ())) if rec["id"] in items else 0
        lines += [
            "   the first one it wrote correctly (in the benchmark's order):",
            _indent(_question(rec["prompt"])),
            f"   its function (passes {tests} tests in the sandbox):",
            _indent(str(rec["extracted"] or rec["output"]).strip("\n")),
        ]
    return "\n".join(lines) + "\n"
