"""Reward-model export to (and import from) transformers' `Qwen2ForSequenceClassification`.

Directory layout (what `Qwen2ForSequenceClassification.from_pretrained(DIR)` loads):
  config.json                  the Qwen2 config of the trunk, with architectures
                               ["Qwen2ForSequenceClassification"], one label and pad_token_id
  model-XXXXX-of-N.safetensors the trunk in the qwen2 layout (qwen_jax.checkpoint.hf.save_hf),
                               then a last shard holding score.weight [1, D] = our `score`
                               [D, 1] transposed
  model.safetensors.index.json maps every tensor to its shard
  tokenizer files              as given (`extra_files`)
No lm_head: a sequence classifier has none. The trunk is written as a tied-embedding model
(tie_word_embeddings true) so that no loader, ours or transformers', looks for one.

Which token is scored. Our reward is read at index length-1 of each sequence: the `<|im_end|>`
closing the reply (qwen_jax.tokenizer.chatml.preference_tokens), batches right-padded with the
tokenizer's pad id. transformers pools the RIGHTMOST token that is not `config.pad_token_id`
(GenericForSequenceClassification: argmax of position * (input_ids != pad_token_id)). With
pad_token_id = the tokenizer's pad id (Qwen: `<|endoftext|>`), everything after `<|im_end|>` is
pad and `<|im_end|>` itself is not, so HF reads exactly index length-1. Pad ids inside the
sequence do not matter (only the rightmost non-pad counts) and cannot occur in content anyway
(content is encoded with special tokens disabled). The one requirement, checked on export: the
pad id is not the `<|im_end|>` id (then HF would skip the scored token). A left-padded batch
would also be read correctly by HF; ours are right-padded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen_jax.checkpoint.hf import (
    _NP_DTYPES,
    CheckpointError,
    SafetensorsDir,
    _host_array,
    check_output_dir,
    load_hf,
    read_config,
    save_hf,
)
from qwen_jax.model import lora
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.transformer import Qwen

ARCHITECTURE = "Qwen2ForSequenceClassification"
SCORE_TENSOR = "score.weight"
INDEX = "model.safetensors.index.json"


def _with_state(cfg, state_pure: dict) -> Qwen:
    """A model of config `cfg` holding the arrays of `state_pure` (a pure dict whose keys are
    exactly cfg's parameters)."""
    graphdef, abstract = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(abstract, state_pure)
    return nnx.merge(graphdef, abstract)


def trunk(model: Qwen) -> Qwen:
    """The reward model without its head and without an LM head: the decoder every HF
    sequence classifier wraps, as a tied-embedding Qwen (adapters merged first)."""
    if model.cfg.lora_rank:
        model = lora.merge(model)
    pure = nnx.to_pure_dict(nnx.state(model))
    pure.pop("score", None)
    pure.pop("lm_head", None)
    return _with_state(model.cfg.replace(tie_embeddings=True, reward_head=False), pure)


def export_reward_model(
    model: Qwen,
    out_dir: str | os.PathLike,
    *,
    pad_token_id: int,
    im_end_id: int | None = None,
    dtype: str | None = None,
    extra_files: dict[str, str | os.PathLike] | None = None,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write a reward model (cfg.reward_head) as a Qwen2ForSequenceClassification directory.

    pad_token_id: the id batches are right-padded with (the tokenizer's `pad_id`); HF scores
      the last token that is not this id (module docstring). im_end_id: if given, refused as
      pad_token_id. dtype: stored dtype (default: the parameter dtype). extra_files: tokenizer
      files to copy, destination name -> source. The directory must not exist; it appears
      complete or not at all.
    """
    if not model.cfg.reward_head:
        raise CheckpointError("the model has no reward head (reward_head=False): nothing to score")
    if im_end_id is not None and pad_token_id == im_end_id:
        raise CheckpointError(
            f"pad_token_id {pad_token_id} is the <|im_end|> id the reward is read at: HF would "
            "skip that token as padding"
        )
    out = check_output_dir(out_dir)
    dtype = dtype or model.cfg.param_dtype
    if dtype not in _NP_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} cannot be written; choose from {list(_NP_DTYPES)}")
    score_1d = _host_array(model.score[...]).T.astype(_NP_DTYPES[dtype])  # [1, D]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent.absolute()))
    try:
        d = save_hf(
            trunk(model),
            staging / "model",
            layout="qwen2",
            dtype=dtype,
            extra_files=extra_files,
            max_shard_bytes=max_shard_bytes,
        )
        _add_score_shard(d, score_1d)
        hf = json.loads((d / "config.json").read_text())
        hf.update(
            architectures=[ARCHITECTURE],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
            pad_token_id=pad_token_id,
        )
        (d / "config.json").write_text(json.dumps(hf, indent=2))
        os.replace(d, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _add_score_shard(d: Path, score_1d: np.ndarray) -> None:
    """Put score.weight in a shard of its own after the trunk's and (re)write the index.

    Shards are renumbered model-XXXXX-of-{n+1}: transformers reads a lone `model.safetensors`
    and ignores any index beside it, so the trunk cannot keep that name.
    """
    if (d / INDEX).exists():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
    else:
        with safe_open(d / "model.safetensors", "numpy") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    files = sorted(set(weight_map.values()))
    n = len(files) + 1
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        os.replace(d / old, d / new)
    weight_map = {k: renamed[f] for k, f in weight_map.items()}
    weight_map[SCORE_TENSOR] = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file({SCORE_TENSOR: np.ascontiguousarray(score_1d)}, str(d / weight_map[SCORE_TENSOR]))
    total = sum((d / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / INDEX).write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------------------------ import


def is_reward_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds an HF sequence-classification (reward) export."""
    cfg = Path(path) / "config.json"
    try:
        return ARCHITECTURE in json.loads(cfg.read_text()).get("architectures", [])
    except (OSError, ValueError, AttributeError):
        return False


def load_reward_model(
    path: str | os.PathLike, *, mesh: Mesh | None = None, **overrides
) -> tuple[dict, Qwen]:
    """(config.json dict, reward model) from a Qwen2ForSequenceClassification directory.

    Reads our exports and transformers' own saves (single file or sharded). The trunk goes
    through qwen_jax.checkpoint.hf.load_hf (validated, streamed) on a view of the directory
    whose index leaves out the score tensor; `overrides` replace config fields (e.g. dtype).
    """
    path = Path(path)
    if not is_reward_dir(path):
        raise CheckpointError(f"{path} is not a {ARCHITECTURE} directory (config.json)")
    hf = json.loads((path / "config.json").read_text())
    if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
        raise CheckpointError(f"{path}: a reward model has one label, config.json has more")
    weight_map = dict(SafetensorsDir(path).weight_map)
    if SCORE_TENSOR not in weight_map:
        raise CheckpointError(f"{path} has no {SCORE_TENSOR}")
    score_file = weight_map.pop(SCORE_TENSOR)
    cfg = read_config(path).replace(tie_embeddings=True, **overrides)
    with tempfile.TemporaryDirectory() as view:
        view = Path(view)
        for f in set(weight_map.values()):
            (view / f).symlink_to((path / f).absolute())
        (view / "config.json").symlink_to((path / "config.json").absolute())
        (view / INDEX).write_text(json.dumps({"weight_map": weight_map}))
        _, body = load_hf(view, mesh=mesh, cfg=cfg)
    with safe_open(path / score_file, "numpy") as f:
        score = f.get_tensor(SCORE_TENSOR)
    if score.shape != (1, cfg.hidden_size):
        raise CheckpointError(
            f"{SCORE_TENSOR} has shape {score.shape}, expected (1, {cfg.hidden_size})"
        )
    pure = nnx.to_pure_dict(nnx.state(body))
    pure["score"] = jnp.asarray(score.T, cfg.weight_dtype)
    return hf, _with_state(cfg.replace(reward_head=True), pure)
