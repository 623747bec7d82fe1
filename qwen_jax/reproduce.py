"""`qwen-jax reproduce --out DIR [--quick] [--force-stage NAME]`: the report's model variants
from the embedded corpus, in one command (spec §7; issue 17).

The chain, each stage one command's worth of work through the project's own APIs
(train.loop.train on the experiment file's `:runlocal` config, then a params export):
    base             the demo pretraining (qwen_jax/demo.py): DIR/data, DIR/tokenizer, DIR/run,
                     DIR/export. A DIR that already holds a base run is reused as it is
                     (its own config; resumed if unfinished): `make demo`'s runs/demo, say.
    code_qwen        experiments/code/code_qwen_7b.py:runlocal from the base     -> DIR/code_qwen
    code_qwen_chat   experiments/code/code_qwen_7b_chat.py:runlocal from code_qwen
    math_qwen_chat   experiments/math/math_qwen_7b_chat.py:runlocal from the base
(training workdirs of the variants: DIR/train/<stage>). Then every model on the held-out
benchmarks of evals/synth.py (synth_math; synth_code under the completion and the chat
protocol; code_ppl) through the eval harness (evals.runner.run, per-sample records in
DIR/evals/<model>), and DIR/results.{md,json} (models x metrics, each variant's change over
the base on its own domain), DIR/plots/<stage>_loss.png.

Idempotent. DIR/chain.json records the chain's identity (stages, experiment files, the hash of
each stage's resolved config, the evaluation settings) and each finished stage; a stage whose
export is present and whose config hash is recorded is skipped, and a stage is redone when its
parent was (`--force-stage NAME` redoes NAME and everything downstream of it). A DIR that holds
another chain's chain.json, files this chain does not write, results without a chain.json, or
a demo corpus of another version (an older `make demo`'s) is refused with one error line before
anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORMAT = "qwen-jax-reproduce/1"
BASE = "base"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    experiment: str  # relative to the repository; its :runlocal form is trained
    parent: str  # the stage whose export is init_from
    domain: str  # "code" | "math": the benchmarks the variant should improve


STAGES = (
    Stage("code_qwen", "experiments/code/code_qwen_7b.py", BASE, "code"),
    Stage("code_qwen_chat", "experiments/code/code_qwen_7b_chat.py", "code_qwen", "code"),
    Stage("math_qwen_chat", "experiments/math/math_qwen_7b_chat.py", BASE, "math"),
)
MODELS = (BASE, *(s.name for s in STAGES))
# The table's columns: column -> (benchmark of evals/synth.py, chat protocol, domain). Every
# model is scored on every column; a variant's delta over the base is reported on its own
# domain's. synth_code runs under both protocols: completion (signature + docstring, what
# continued pretraining teaches) and chat (the request in words, what code SFT teaches).
METRICS = {
    "synth_math": ("synth_math", True, "math"),
    "synth_code": ("synth_code", False, "code"),
    "synth_code_chat": ("synth_code", True, "code"),
    "code_ppl": ("code_ppl", False, "code"),
}
# What the chain writes in DIR (anything else there is someone else's file).
BASE_FILES = {"data", "tokenizer", "run", "export", "summary.json"}
CHAIN_FILES = {"chain.json", "train", "evals", "plots", "results.md", "results.json"}
CHAIN_FILES |= {s.name for s in STAGES}


class ChainError(ValueError):
    """The output directory or a stage cannot be used as asked (one line, nothing written)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How big the chain is. None keeps the experiment files' own numbers (tiny.py's 300 base
    steps, each `:runlocal` form's steps, every held-out item)."""

    name: str
    base_steps: int | None = None
    stage_steps: int | None = None
    model: tuple[tuple[str, object], ...] = ()  # model field overrides for every stage
    seq_len: int | None = None
    eval_limit: int | None = None  # first N items of each benchmark
    eval_batch: int = 16
    entropy_batches: int = 50  # the base's unigram-entropy pass (0: skipped)
    # (stage, "a.b" config key, value) applied last; "run.steps" also sets the schedule's length
    stage_changes: tuple[tuple[str, str, object], ...] = ()


# The recorded chain: twice the demo's pretraining, each variant 300 steps, every held-out item;
# Math-Qwen-Chat 600 steps of 32 conversations without dropout. Measured from the same base: at
# the runlocal batch of 8 (with dropout) for 300 steps it copied the operands and guessed the
# sum (3 of 100 held-out problems), at batch 32 for 600 steps it computed 22 of 100.
FULL = Settings(
    "full",
    base_steps=600,
    stage_steps=300,
    stage_changes=(
        ("math_qwen_chat", "data.global_batch", 32),
        ("math_qwen_chat", "model.dropout", 0.0),
        ("math_qwen_chat", "run.steps", 600),
    ),
)
# `make demo`: a 200-step base (the variants learn their domains from it: the base's own steps
# are the chain's largest cost), each `:runlocal` form as written, the first 48 held-out items of
# each benchmark, a short entropy pass.
QUICK = Settings(
    "quick",
    base_steps=200,
    eval_limit=48,
    entropy_batches=10,
    stage_changes=(("code_qwen", "run.steps", 40), ("code_qwen_chat", "run.steps", 300)),
)


# ------------------------------------------------------------------------------------ layout


def export_dir(out: Path, name: str) -> Path:
    return out / "export" if name == BASE else out / name


def run_dir(out: Path, name: str) -> Path:
    return out / "run" if name == BASE else out / "train" / name


def config_hash(config_dict: dict, out: Path) -> str:
    """sha256 of a resolved config with DIR's path made relative (a moved DIR is the same
    chain)."""
    text = json.dumps(config_dict, sort_keys=True).replace(str(out), "$OUT")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_out_dir(out: Path) -> dict | None:
    """Refuse a DIR this chain cannot own; return its chain.json (None when it has none)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ChainError(f"--out {out} is a file, not a directory")
    names = {p.name for p in out.iterdir()}
    foreign = sorted(names - BASE_FILES - CHAIN_FILES)
    if foreign:
        more = f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else ""
        raise ChainError(
            f"--out {out} holds files the reproduction chain does not write "
            f"({', '.join(foreign[:3])}{more}); choose an empty or new directory"
        )
    _check_corpus(out)
    if "chain.json" not in names:
        results = sorted(names & (CHAIN_FILES - {"chain.json"}))
        if results:
            raise ChainError(
                f"--out {out} holds chain results ({', '.join(results)}) but no chain.json: "
                "not this chain's; choose another directory"
            )
        return None
    try:
        chain = json.loads((out / "chain.json").read_text())
    except (OSError, ValueError) as e:
        raise ChainError(f"{out / 'chain.json'} is unreadable ({e}); not this chain's") from None
    if not isinstance(chain, dict) or chain.get("format") != FORMAT:
        raise ChainError(f"{out / 'chain.json'} is not a {FORMAT} record; not this chain's")
    return chain


def _check_corpus(out: Path) -> None:
    """A corpus in DIR written by another version of the demo corpus (an older `make demo`)
    lacks what the chain trains and evaluates on; its base was trained on it."""
    from qwen_jax.data.demo_corpus import VERSION

    manifest = out / "data" / "manifest.json"
    if not manifest.exists():
        return
    try:
        version = json.loads(manifest.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    if version != VERSION:
        raise ChainError(
            f"--out {out} holds a demo corpus of version {version!r} (this chain builds "
            f"{VERSION!r}, with the held-out benchmarks); choose a new directory or delete {out}"
        )


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------- configs


def _base_config(out: Path, settings: Settings):
    """The base's TrainConfig: DIR/run's own when DIR holds a base run, else tiny.py's."""
    import ml_collections

    from qwen_jax import demo
    from qwen_jax.train.config import TrainConfig

    saved = run_dir(out, BASE) / "config.json"
    if saved.exists():
        d = json.loads(saved.read_text())
        d.pop("resolved_model", None)
        return TrainConfig.from_config_dict(ml_collections.ConfigDict(d))
    c = demo.base_config(
        out, steps=settings.base_steps, model=dict(settings.model), seq_len=settings.seq_len
    )
    return TrainConfig.from_config_dict(c)


def stage_config(stage: Stage, out: Path, settings: Settings):
    """The stage's `:runlocal` config on DIR's corpus and vocabulary, from its parent's export."""
    from qwen_jax.train.config import TrainConfig, load_experiment

    path = REPO / stage.experiment
    if not path.exists():
        raise ChainError(f"stage {stage.name}: no experiment file {stage.experiment}")
    c = load_experiment(path, "runlocal")
    c.init_from = str(export_dir(out, stage.parent))
    c.data.data_dir = str(out / "data")
    c.data.tokenizer = str(out / "tokenizer" / "tokenizer.model")
    for key, value in settings.model:
        c.model[key] = value
    if settings.seq_len:
        c.data.seq_len = c.model.seq_length = settings.seq_len
    if settings.stage_steps:
        _set_steps(c, settings.stage_steps)
    for name, key, value in settings.stage_changes:
        if name != stage.name:
            continue
        if key == "run.steps":
            _set_steps(c, value)
            continue
        *path, last = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[last] = value
    return TrainConfig.from_config_dict(c)


def _set_steps(c, n: int) -> None:
    c.run.steps = c.optim.total_steps = n
    c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, n // 10))
    c.run.log_every = min(c.run.log_every, max(1, n // 10))
    c.run.eval_every = c.run.checkpoint_every = max(1, n // 2)


def chain_identity(out: Path, settings: Settings) -> tuple[dict, dict]:
    """(identity, stage name -> TrainConfig): what makes two chains the same chain."""
    configs = {BASE: _base_config(out, settings)}
    configs |= {s.name: stage_config(s, out, settings) for s in STAGES}
    stages = [{"name": BASE, "experiment": "experiments/pretrain/tiny.py", "parent": None}]
    stages += [{"name": s.name, "experiment": s.experiment, "parent": s.parent} for s in STAGES]
    for entry in stages:
        entry["config_hash"] = config_hash(configs[entry["name"]].to_dict(), out)
    evals = {"metrics": {k: list(v) for k, v in METRICS.items()}, "limit": settings.eval_limit}
    return {"settings": settings.name, "stages": stages, "evals": evals}, configs


# ------------------------------------------------------------------------------------ stages


def _log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _loss_line(name: str, history: list[dict], seconds: float) -> str:
    train = [r["loss"] for r in history if "loss" in r]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    parts = [f"{name}: {len(train) and history[-1]['step']} steps in {seconds:.0f} s"]
    if train:
        parts.append(f"loss {train[0]:.3f} -> {train[-1]:.3f}")
    if evals:
        parts.append(f"eval_loss {evals[-1]:.3f}")
    return ", ".join(parts)


def train_base(out: Path, config, entropy_batches: int = 50) -> None:
    """demo.py's steps: corpus, vocabulary, unigram entropy, training, export."""
    from qwen_jax import demo
    from qwen_jax.tokenizer import load_tokenizer
    from qwen_jax.train.loop import train

    t0 = time.perf_counter()
    _, spm = demo.build_assets(out, log=_log)
    summary = {}
    if entropy_batches:
        tok = load_tokenizer(str(spm))
        entropy = demo.unigram_entropy(
            config.data.mixture, config.data.data_dir, tok, config.data.seq_len, entropy_batches
        )
        _log(f"{BASE}: unigram entropy of the training stream {entropy:.3f} nats/token")
        summary["unigram_entropy"] = round(entropy, 4)
    result = train(config, run_dir(out, BASE))
    step = demo.export_run(run_dir(out, BASE), export_dir(out, BASE), spm)
    _log(_loss_line(BASE, result.history, time.perf_counter() - t0) + f"; exported step {step}")
    _write_json(out / "summary.json", summary | {"steps": step})


def train_stage(stage: Stage, out: Path, config) -> None:
    """Train one variant from its parent's export, then export it (replacing an old export)."""
    from qwen_jax import demo
    from qwen_jax.checkpoint.params import is_params_dir
    from qwen_jax.train.loop import train

    parent = export_dir(out, stage.parent)
    if not is_params_dir(parent):
        raise ChainError(
            f"stage {stage.name}: its init_from {parent} (stage {stage.parent}'s export) is "
            f"missing; run the chain (qwen-jax reproduce --out {out}) to build it first"
        )
    t0 = time.perf_counter()
    result = train(config, run_dir(out, stage.name))
    spm = Path(config.data.tokenizer)
    step = demo.export_run(run_dir(out, stage.name), export_dir(out, stage.name), spm)
    _log(_loss_line(stage.name, result.history, time.perf_counter() - t0) + f"; step {step}")


def _downstream(name: str) -> set[str]:
    """`name` and every stage trained from it (directly or not)."""
    found = {name}
    for s in STAGES:  # STAGES is in dependency order
        if s.parent in found:
            found.add(s.name)
    return found


def run_chain(out: Path, settings: Settings, force: tuple[str, ...] = ()) -> dict:
    """Train what is not finished, evaluate, write the tables and plots. Returns the results
    (reproduce_report.collect's dict)."""
    from qwen_jax import reproduce_report as report
    from qwen_jax.checkpoint.params import is_params_dir

    out = Path(out).resolve()  # one spelling of DIR in the configs (hashed as $OUT)
    unknown = sorted(set(force) - set(MODELS))
    if unknown:
        raise ChainError(f"--force-stage {unknown[0]!r}: no such stage; stages: {MODELS}")
    chain = check_out_dir(out)
    identity, configs = chain_identity(out, settings)
    if chain is not None and chain.get("identity") != identity:
        raise ChainError(
            f"--out {out} holds another chain's results (chain.json: settings "
            f"{chain.get('identity', {}).get('settings')!r}, other stages or configs); choose "
            "another directory or delete it"
        )
    chain = chain or {"format": FORMAT, "identity": identity, "finished": {}, "evaluated": {}}
    chain.setdefault("started", {BASE: None})  # a base run already in DIR is the chain's
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "chain.json", chain)
    redo = set().union(*(_downstream(n) for n in force)) if force else set()
    hashes = {e["name"]: e["config_hash"] for e in identity["stages"]}
    for name in MODELS:
        stage = next((s for s in STAGES if s.name == name), None)
        record = chain["finished"].get(name)
        parent_stamp = chain["finished"].get(stage.parent, {}).get("at") if stage else None
        done = (
            record is not None
            and record["config_hash"] == hashes[name]
            and record.get("parent_at") == parent_stamp
            and is_params_dir(export_dir(out, name))
            and name not in redo
        )
        if done:
            _log(f"{name}: finished ({export_dir(out, name)}), skipped")
            continue
        # A run left by an interrupted attempt from the same parent resumes; any other is
        # stale (forced, finished before, or trained from an older parent) and starts over.
        started = chain["started"].get(name, "none")
        if record is not None or name in redo or started != parent_stamp:
            shutil.rmtree(run_dir(out, name), ignore_errors=True)
        _log(f"{name}: training ({configs[name].run.steps} steps)")
        chain["finished"].pop(name, None)
        chain["started"][name] = parent_stamp
        _write_json(out / "chain.json", chain)
        if stage is None:
            train_base(out, configs[name], settings.entropy_batches)
        else:
            train_stage(stage, out, configs[name])
        chain["finished"][name] = {
            "config_hash": hashes[name],
            "parent_at": parent_stamp,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}",
        }
        _write_json(out / "chain.json", chain)
    save = lambda: _write_json(out / "chain.json", chain)  # noqa: E731
    report.evaluate_all(out, chain, list(MODELS), METRICS, settings, save, _log)
    results = report.collect(out, MODELS, METRICS, {s.name: s.domain for s in STAGES})
    report.write_tables(out, results)
    report.plot_losses(out, {n: run_dir(out, n) for n in MODELS})
    return results


def run_and_report(out: Path, settings: Settings, force: tuple[str, ...] = ()) -> int:
    """The chain, then the table and what the variants learned, printed."""
    from qwen_jax import reproduce_report as report

    t0 = time.perf_counter()
    results = run_chain(out, settings, force)
    print()
    print(report.markdown(results))
    print(report.showcase(out, METRICS))
    _log(f"done in {time.perf_counter() - t0:.0f} s: {out / 'results.md'}, {out / 'plots'}")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qwen-jax reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the chain's directory")
    p.add_argument("--quick", action="store_true", help="fewer steps and items (`make demo`)")
    p.add_argument(
        "--force-stage",
        action="append",
        default=[],
        metavar="NAME",
        help=f"redo stage NAME and those trained from it (one of {', '.join(MODELS)})",
    )
    args = p.parse_args(argv)
    return run_and_report(args.out, QUICK if args.quick else FULL, tuple(args.force_stage))


__all__ = ["run_chain", "run_and_report", "Settings", "FULL", "QUICK", "ChainError"]
