"""`qwen-jax export`: a training checkpoint -> params-only Orbax checkpoint or HF directory.

  qwen-jax export --workdir DIR [--step N] --to DIR [--hf [--layout {qwen,qwen2}] [--dtype D]]
                  [--peft]

The model comes from the run's resolved config (workdir/config.json); the tokenizer files the run
used are copied next to the weights so the export is self-contained. A LoRA run exports merged
(base + adapters, in the params or HF format), or with --peft as an HF base directory plus a
PEFT adapter directory (TO/base, TO/adapter) that `peft.PeftModel.from_pretrained` loads. A
reward-model run's --hf export is a Qwen2ForSequenceClassification directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
from flax import nnx

from qwen_jax.checkpoint import CheckpointError, check_output_dir, save_hf, save_params
from qwen_jax.checkpoint.hf import short_error
from qwen_jax.checkpoint.params import config_from_json
from qwen_jax.model import lora
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import make_mesh, tree_shardings
from qwen_jax.train.checkpointing import has_checkpoint, restore_items, workdir_path
from qwen_jax.train.step import prepared, split_model


def run_model_config(workdir: str | Path):
    """(QwenConfig, the run's resolved config dict) of a training workdir (local or gs://)."""
    resolved = workdir_path(workdir) / "config.json"
    if not resolved.exists():
        raise CheckpointError(f"{resolved} not found: {workdir} is not a training workdir")
    try:
        data = json.loads(resolved.read_text())
        return config_from_json(json.dumps(data["resolved_model"])), data
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{resolved} is not a training run's config ({e})") from None


def restore_model(
    workdir: str | Path,
    step: int | None = None,
    *,
    mesh="fsdp",
    merge_lora: bool = True,
    **overrides,
):
    """(step, model, run config) from a training checkpoint (newest restorable step, or `step`)
    of a local or remote (gs://) workdir.

    Only the weights are read (the trained params and, for LoRA, the frozen base), not the
    optimizer state. `mesh`: "fsdp" (default) shards FSDP over all local devices, a `Mesh`
    shards on it, None puts everything on the first device. `overrides` replace
    non-architectural config fields (dtype, long-context switches). A LoRA run's model comes
    back merged (a plain float model: what serving and exports want) unless merge_lora=False
    (the adapters as trained, for a PEFT export).
    """
    workdir = workdir_path(workdir)
    model_cfg, run = run_model_config(workdir)
    model_cfg = model_cfg.replace(**overrides) if overrides else model_cfg
    graphdef, params, frozen = split_model(
        nnx.eval_shape(lambda: prepared(Qwen(model_cfg, rngs=nnx.Rngs(0))))
    )
    items = {"params": params} if frozen is None else {"params": params, "frozen": frozen}
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, items)
    else:
        shardings = tree_shardings(items, make_mesh(mesh) if isinstance(mesh, str) else mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), items, shardings
    )
    if not has_checkpoint(workdir / "checkpoints"):
        raise CheckpointError(f"no checkpoint in {workdir / 'checkpoints'} yet")
    try:
        found = restore_items(workdir / "checkpoints", target, step=step)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore errors run to pages of spec
        where = f"checkpoint step {step} in {workdir / 'checkpoints'}"
        raise CheckpointError(f"{where} is damaged: {short_error(e, root=True)}") from None
    if found is None:
        raise CheckpointError(f"no restorable checkpoint in {workdir / 'checkpoints'}")
    step, got = found
    model = nnx.merge(graphdef, *got.values())
    if merge_lora and model_cfg.lora_rank:
        model = lora.merge(model)
    return step, model, run


def _export_peft(model: Qwen, to: Path, extra: dict, dtype: str | None) -> None:
    """TO/base: the frozen base as an HF directory (qwen2 layout, tokenizer included);
    TO/adapter: the adapters as a PEFT LoRA directory pointing at it."""
    from qwen_jax.checkpoint.peft import export_base_hf, export_peft_adapter

    if not model.cfg.lora_rank:
        raise ValueError("--peft exports a LoRA run's adapters; this run has none")
    to.mkdir(parents=True)
    export_base_hf(model, to / "base", dtype=dtype, extra_files=extra)
    export_peft_adapter(model, to / "adapter", base_model_name_or_path=str(to / "base"))


def tokenizer_files(spec: str) -> list[Path]:
    """Files to ship with an export for the tokenizer spec a run used."""
    if spec == "qwen":
        from qwen_jax.tokenizer.assets import qwen_tiktoken_path

        return [qwen_tiktoken_path()]
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"the run's tokenizer {spec!r} (data.tokenizer) is not found from here; an export "
            "without it could not encode text"
        )
    if path.is_dir():
        return [p for p in path.iterdir() if p.is_file()]
    siblings = [path.with_suffix(".vocab")] if path.suffix == ".model" else []
    return [path, *[s for s in siblings if s.exists()]]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qwen-jax export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training workdir, local or gs://")
    p.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--hf", action="store_true", help="write an HF safetensors directory")
    p.add_argument("--layout", choices=["qwen", "qwen2"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument(
        "--peft", action="store_true", help="LoRA run: TO/base (HF) + TO/adapter (PEFT) dirs"
    )
    args = p.parse_args(argv)
    try:
        check_output_dir(args.to)  # before any work: exists, a file on the way, read-only
        spec = run_model_config(args.workdir)[1]["data"]["tokenizer"]
        files = tokenizer_files(spec)
        extra = {f.name: f for f in files}
        step, model, _ = restore_model(args.workdir, args.step, merge_lora=not args.peft)
        if args.peft:
            _export_peft(model, args.to, extra, args.dtype)
        elif args.hf and model.cfg.reward_head:
            from qwen_jax.checkpoint.seqcls import export_reward_model
            from qwen_jax.tokenizer import load_tokenizer

            tok = load_tokenizer(spec)
            export_reward_model(
                model,
                args.to,
                pad_token_id=tok.pad_id,
                im_end_id=tok.im_end_id,
                dtype=args.dtype,
                extra_files=extra,
            )
        elif args.hf:
            save_hf(model, args.to, layout=args.layout, dtype=args.dtype, extra_files=extra)
        else:
            save_params(model, args.to, tokenizer_files=files)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"qwen-jax export: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a quota
        print(f"qwen-jax export: error: writing {args.to} failed: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {args.workdir} to {args.to}")
    return 0
