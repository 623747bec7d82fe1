"""The training run's typed configuration, and its bridge to ml_collections experiment files.

Experiment files (experiments/**.py) start from `defaults()` — a ConfigDict holding every field,
so `--config.section.key=value` can override anything with type checking — and set what they
reproduce. `TrainConfig.from_config_dict` validates the result (unknown keys, wrong types) before
anything is built or compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

import ml_collections

from qwen_jax.model.config import PRESETS, QwenConfig, tiny
from qwen_jax.rl.config import RLConfig
from qwen_jax.sharding import MeshConfig
from qwen_jax.train.objectives import ObjectiveConfig, make_objective
from qwen_jax.train.optim import OptimConfig
from qwen_jax.train.step import StepConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # A registered seqio Task or Mixture, or user files: a path or glob (comma-separated for
    # several) of .jsonl (text, chat or preference records; the kind is detected from the first
    # record or given as a prefix "lm:" / "sft:" / "preference:") or .txt (one document per
    # file), local or gs:// (qwen_jax/data/user_files.py).
    mixture: str = "demo_pretrain_v1"
    eval_mixture: str = ""  # the same kinds of names; "" = no held-out eval
    eval_split: str = "validation"
    data_dir: str = ""  # where file-backed tasks read from ("" = task default)
    tokenizer: str = "qwen"  # "qwen" (real qwen.tiktoken) or a path (SentencePiece/tiktoken/HF)
    seq_len: int = 2048
    global_batch: int = 8  # sequences per step over all hosts
    num_shards: int = 0  # logical data shards (0 = one per process); see data_sharding.py
    seed: int = 0
    pack: bool = True
    # Malformed records skipped (fraction of those read, per file) before a DataError.
    max_bad_fraction: float = 0.01


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0 = never
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0 = only at the end (and on preemption)
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    topology: str = ""  # e.g. "v5p-128": the slice the experiment targets (qwen-jax compile)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. `model` is a preset name plus field overrides (None = preset's).

    `init_from` starts a new run (never a resume: a checkpoint in the workdir wins) from the
    weights of a params export, a training workdir / its checkpoints directory (the latest
    step that restores), or a Hugging Face directory; the optimizer and the step start fresh
    (train/init_from.py). "" = random initialisation.
    """

    model_preset: str = "tiny"
    model_overrides: tuple[tuple[str, Any], ...] = ()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    step: StepConfig = StepConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    tpu: TpuConfig = TpuConfig()
    # Reinforcement learning (qwen_jax/rl/config.py): rl.algorithm "ppo" / "grpo" makes
    # `qwen-jax train` run qwen_jax/rl/loop.py instead of the supervised trainer. Checked with
    # its sources (rl.config.check) by the RL loop's preflight: a full-size experiment names
    # its reward model on the command line, as it does init_from.
    rl: RLConfig = RLConfig()
    init_from: str = ""

    @property
    def is_rl(self) -> bool:
        """Whether this is an RL run (rl.algorithm set): `qwen-jax train` / `compile` then go
        to qwen_jax/rl/loop.py / train/aot.py's compile_rl_for_topology."""
        return bool(self.rl.algorithm)

    def model_config(self, vocab_size: int | None = None) -> QwenConfig:
        """The architecture; `vocab_size` (from the tokenizer) applies unless overridden."""
        if self.model_preset == "tiny":
            base = tiny()
        elif self.model_preset in PRESETS:
            base = PRESETS[self.model_preset]
        else:
            raise ValueError(
                f"unknown model preset {self.model_preset!r}; choose from {['tiny', *PRESETS]}"
            )
        changes = dict(self.model_overrides)
        if vocab_size is not None and "vocab_size" not in changes:
            changes["vocab_size"] = vocab_size
        return base.replace(**changes)

    # ------------------------------------------------------------------ ml_collections bridge

    @staticmethod
    def defaults() -> ml_collections.ConfigDict:
        """A ConfigDict with every field (model fields as typed placeholders)."""
        c = ml_collections.ConfigDict()
        c.init_from = ""
        c.model = ml_collections.ConfigDict({"preset": "tiny"})
        hints = typing.get_type_hints(QwenConfig)
        for f in dataclasses.fields(QwenConfig):
            c.model[f.name] = ml_collections.config_dict.placeholder(_base_type(hints[f.name]))
        for name, cls in _SECTIONS.items():
            c[name] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
        return c

    @classmethod
    def from_config_dict(cls, c: ml_collections.ConfigDict) -> TrainConfig:
        """Validate and convert; unknown keys or wrong types raise ValueError naming them."""
        d = c.to_dict()
        unknown = sorted(set(d) - {"model", "init_from", *_SECTIONS})
        if unknown:
            raise ValueError(unknown_key_message(unknown[0], ["model", "init_from", *_SECTIONS]))
        init_from = d.get("init_from", "")
        _check_type("init_from", init_from, str)
        model = dict(d.get("model", {}))
        preset = model.pop("preset", "tiny")
        fields = {f.name: f for f in dataclasses.fields(QwenConfig)}
        hints = typing.get_type_hints(QwenConfig)
        overrides = []
        for key, value in sorted(model.items()):
            if key not in fields:
                known = ["model.preset", *(f"model.{f}" for f in fields)]
                raise ValueError(unknown_key_message(f"model.{key}", known))
            if value is None:
                continue
            if key == "attn_windows":
                value = tuple(value)
            _check_type(f"model.{key}", value, hints[key])
            overrides.append((key, value))
        sections = {}
        for name, scls in _SECTIONS.items():
            sections[name] = _build(name, scls, d.get(name, {}))
        out = cls(
            model_preset=preset, model_overrides=tuple(overrides), init_from=init_from, **sections
        )
        check_values(out)
        out.model_config()  # fail now on a bad preset or field combination
        make_objective(out.objective)  # ... or an unknown objective
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": {"preset": self.model_preset, **dict(self.model_overrides)}}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS})
        out["init_from"] = self.init_from
        return out


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a full-size experiment into its `:runlocal` form: the same recipe (optimizer,
    schedule shape, step options) on the tiny preset and the demo corpus, 50 steps on CPU."""
    c.model.preset = "tiny"
    c.model.dtype, c.model.remat_policy = "float32", "none"
    c.data.mixture = c.data.eval_mixture = "demo_pretrain_v1"
    c.data.tokenizer = "runs/demo/tokenizer/tokenizer.model"
    c.data.seq_len, c.data.global_batch = 128, 8
    c.step.microbatches = 1
    c.optim.warmup_steps, c.optim.total_steps = 10, 50
    c.run.steps, c.run.log_every, c.run.eval_every, c.run.checkpoint_every = 50, 10, 25, 25
    c.tpu.topology = ""
    return c


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "step": StepConfig,
    "objective": ObjectiveConfig,
    "run": RunConfig,
    "mesh": MeshConfig,
    "tpu": TpuConfig,
    "rl": RLConfig,
}


def _base_type(hint):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0])
    if origin in (tuple,):
        return tuple
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _check_type(name: str, value: Any, hint) -> None:
    want = _base_type(hint)
    ok = isinstance(value, want) or (want is float and isinstance(value, int))
    if isinstance(value, bool) and want in (int, float):
        ok = False
    if not ok:
        raise ValueError(f"config key {name}={value!r}: expected {want.__name__}")
    if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
        raise ValueError(f"config key {name}={value!r}: expected one of {typing.get_args(hint)}")


def _build(section: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        known = [f"{section}.{n}" for n in sorted(names)]
        raise ValueError(unknown_key_message(f"{section}.{unknown[0]}", known))
    for key, value in values.items():
        _check_type(f"{section}.{key}", value, hints[key])
    return cls(**{k: (float(v) if hints[k] is float else v) for k, v in values.items()})


def unknown_key_message(key: str, known) -> str:
    """ "unknown config key run.stepz; did you mean run.steps?" (the closest known key)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"unknown config key {key}" + (f"; did you mean {close[0]}?" if close else "")


def config_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a ConfigDict ("run.steps", "model.hidden_size", ...)."""
    out = []
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += config_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def check_values(cfg: TrainConfig) -> None:
    """Values no run can use (a negative step count, an empty batch, ...) raise ValueError
    naming the key and the value, before anything is built."""
    d, r, o = cfg.data, cfg.run, cfg.optim

    def need(ok: bool, key: str, value, rule: str) -> None:
        if not ok:
            raise ValueError(f"config key {key}={value!r}: must be {rule}")

    need(d.seq_len >= 2, "data.seq_len", d.seq_len, ">= 2 (inputs and their next tokens)")
    need(d.global_batch >= 1, "data.global_batch", d.global_batch, ">= 1")
    need(d.num_shards >= 0, "data.num_shards", d.num_shards, ">= 0 (0 = one per process)")
    need(r.steps >= 1, "run.steps", r.steps, ">= 1")
    need(r.log_every >= 1, "run.log_every", r.log_every, ">= 1")
    need(r.eval_every >= 0, "run.eval_every", r.eval_every, ">= 0 (0 = never)")
    if r.eval_every:
        need(r.eval_batches >= 1, "run.eval_batches", r.eval_batches, ">= 1 when evaluating")
    need(r.checkpoint_every >= 0, "run.checkpoint_every", r.checkpoint_every, ">= 0 (0 = at end)")
    need(r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, ">= 1")
    need(cfg.step.microbatches >= 1, "step.microbatches", cfg.step.microbatches, ">= 1")
    for key in ("data", "fsdp", "tensor"):
        value = getattr(cfg.mesh, key)
        need(value == -1 or value >= 1, f"mesh.{key}", value, ">= 1 or -1 (the rest)")
    for key in ("peak_lr", "eps", "weight_decay", "clip_norm", "b1", "b2"):
        value = getattr(o, key)
        need(math.isfinite(value) and value >= 0, f"optim.{key}", value, "finite and >= 0")
    need(o.b1 < 1, "optim.b1", o.b1, "< 1")
    need(o.b2 < 1, "optim.b2", o.b2, "< 1")
    need(0 <= o.final_lr_fraction <= 1, "optim.final_lr_fraction", o.final_lr_fraction, "in [0, 1]")
    need(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    need(o.total_steps >= 1, "optim.total_steps", o.total_steps, ">= 1")
    if o.schedule == "cosine":
        need(
            o.warmup_steps <= o.total_steps,
            "optim.warmup_steps",
            o.warmup_steps,
            f"<= optim.total_steps={o.total_steps} (the cosine decays after the warmup)",
        )
    need(o.schedule in ("cosine", "constant"), "optim.schedule", o.schedule, "cosine or constant")
    frac = d.max_bad_fraction
    need(0 <= frac <= 1, "data.max_bad_fraction", frac, "in [0, 1]")
    j = cfg.objective
    need(j.loss_chunk >= 1, "objective.loss_chunk", j.loss_chunk, ">= 1")
    need(j.beta > 0, "objective.beta", j.beta, "> 0")
    need(j.dpo_loss in ("sigmoid", "ipo"), "objective.dpo_loss", j.dpo_loss, "sigmoid or ipo")
    need(
        0 <= j.label_smoothing < 0.5, "objective.label_smoothing", j.label_smoothing, "in [0, 0.5)"
    )
    refs = ("model", "precomputed")
    need(j.reference in refs, "objective.reference", j.reference, "model or precomputed")


def load_experiment(path, arg: str | None = None) -> ml_collections.ConfigDict:
    """An experiment file's ConfigDict: `get_config(arg)`, as `--config=path[:arg]` loads it.

    THE loader outside the CLI (the demo, scripts, tests). `path` may carry the argument
    ("experiments/pretrain/tiny.py:runlocal") when `arg` is None; without one, `get_config()` is
    called with no argument, like ml_collections' config_flags does.
    """
    import importlib.util
    import re

    path = str(path)
    m = re.fullmatch(r"(.+\.py):(.*)", path)
    if m and arg is None:
        path, arg = m.groups()
    spec = importlib.util.spec_from_file_location("experiment", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no experiment file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
