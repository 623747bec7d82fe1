"""Hugging Face safetensors import and export, for Qwen v1 and Qwen2-family layouts.

Import streams: every parameter is built with `jax.make_array_from_callback`, and each device's
callback reads only the per-layer tensors its shard needs (memory-mapped through `safe_open`), so a
host never holds more than its own shards plus one layer of one tensor. Export writes
size-capped safetensors files plus an index, into a temporary directory renamed at the end.

Layouts (PyTorch Linear weights are [out, in]; ours are [in, out] with heads split out):
  qwen2: model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, o_proj, mlp.{gate,up,down}_proj,
         input_layernorm, post_attention_layernorm, model.embed_tokens, model.norm, lm_head
  qwen:  transformer.h.{i}.attn.c_attn.{weight,bias} (rows [Q;K;V]), attn.c_proj, mlp.w1 (up),
         mlp.w2 (gate), mlp.c_proj (down), ln_1, ln_2, transformer.wte, transformer.ln_f, lm_head
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from qwen_jax.model.config import QwenConfig, from_hf_config, to_hf_config
from qwen_jax.model.factory import abstract_model
from qwen_jax.model.transformer import Qwen
from qwen_jax.sharding import tree_shardings

log = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Non-persistent buffers some exporters still write; never parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the culprit."""


def short_error(e: BaseException, limit: int = 300, *, root: bool = False) -> str:
    """The first line of an exception's message, capped. `root`: of its innermost cause
    instead, for Orbax, whose own message is pages of TensorStore spec while the innermost
    TensorStore error names the array and the file in one line."""
    if root:
        chain = [e]
        while (nxt := chain[-1].__cause__ or chain[-1].__context__) and nxt not in chain:
            chain.append(nxt)
        e = chain[-1]
    text = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output directory that cannot be created, before any work: it exists (never
    overwritten), a parent is a file, or the nearest existing parent is not writable."""
    out = Path(path)
    if out.exists() or out.is_symlink():
        kind = "directory" if out.is_dir() else "file"
        raise CheckpointError(f"output {out} already exists (a {kind}); refusing to overwrite")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {out}: {parent} is a file, not a directory")
    try:  # a real probe: os.access is wrong for root and for read-only mounts
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise CheckpointError(
            f"cannot create {out}: {parent} is not writable ({e.strerror})"
        ) from None
    return out


# ------------------------------------------------------------------------------ tensor source


class SafetensorsDir:
    """Read-only view of a directory of safetensors (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        self._handles: dict[str, object] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.path}")
            weight_map = {}
            for f in files:
                weight_map.update({k: f.name for k in self._open(f.name).keys()})
        self.weight_map: dict[str, str] = weight_map

    def _open(self, fname: str):
        """A cached handle; a truncated or damaged file is a one-line CheckpointError naming it
        (safetensors checks the header and that the file holds every byte it promises)."""
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(self.path / fname, "numpy")
            except Exception as e:  # noqa: BLE001 - SafetensorError is not an exported class
                raise CheckpointError(
                    f"{self.path / fname} is not a readable safetensors file (truncated or "
                    f"damaged?): {short_error(e)}"
                ) from None
        return self._handles[fname]

    def _file(self, name: str):
        fname = self.weight_map[name]
        if fname not in self._handles and not (self.path / fname).exists():
            raise CheckpointError(f"{fname} (holding {name}) is missing from {self.path}")
        return self._open(fname)

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors spells it ("F32", "BF16", "I64", ...)."""
        return self._file(name).get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        sl = self._file(name).get_slice(name)
        try:
            return np.asarray(sl[rows] if rows is not None else sl[:])
        except Exception as e:  # noqa: BLE001 - a file cut after its header was read
            raise CheckpointError(
                f"{self.path / self.weight_map[name]}: cannot read tensor {name} (truncated or "
                f"damaged?): {short_error(e)}"
            ) from None


# ----------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """How one of our parameters (per layer, if stacked) is stored in a layout.

    hf: HF tensor name (with {i} for the layer); rows: which rows of that tensor (fused c_attn);
    to_ours: HF array -> our per-layer array; hf_shape: expected HF shape.
    """

    hf: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    rows: slice | None = None


def _linear(shape_in_out: tuple[int, ...], out_first: bool = True):
    """HF Linear [out, in] <-> ours [in, *out_dims] (out_first=True) or [*in_dims, out]."""
    if out_first:
        d_in, out_dims = shape_in_out[0], shape_in_out[1:]
        n_out = int(np.prod(out_dims))
        return (
            (n_out, d_in),
            lambda w: w.T.reshape(d_in, *out_dims),
            lambda x: x.reshape(d_in, n_out).T,
        )
    in_dims, d_out = shape_in_out[:-1], shape_in_out[-1]
    n_in = int(np.prod(in_dims))
    return (
        (d_out, n_in),
        lambda w: w.T.reshape(*in_dims, d_out),
        lambda x: x.reshape(n_in, d_out).T,
    )


def _same(shape):
    return (tuple(shape), lambda w: w, lambda x: x)


def _bias(shape):
    n = int(np.prod(shape))
    return ((n,), lambda b: b.reshape(shape), lambda x: x.reshape(n))


def _tensor_map(cfg: QwenConfig, layout: str) -> tuple[dict[str, _Tensor], dict[str, _Tensor]]:
    """(global params, per-layer params) for a layout; keys are our parameter paths."""
    d, n, k, h, f, v = (
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.ffn_size,
        cfg.vocab_size,
    )
    shapes = {
        "wq": _linear((d, n, h)),
        "wk": _linear((d, k, h)),
        "wv": _linear((d, k, h)),
        "bq": _bias((n, h)),
        "bk": _bias((k, h)),
        "bv": _bias((k, h)),
        "wo": _linear((n, h, d), out_first=False),
        "w1": _linear((d, f)),
        "w2": _linear((d, f)),
        "c_proj": _linear((f, d)),
        "ln_1": _same((d,)),
        "ln_2": _same((d,)),
    }
    if layout == "qwen2":
        p = "model.layers.{i}."
        names = {
            "wq": "self_attn.q_proj.weight",
            "wk": "self_attn.k_proj.weight",
            "wv": "self_attn.v_proj.weight",
            "bq": "self_attn.q_proj.bias",
            "bk": "self_attn.k_proj.bias",
            "bv": "self_attn.v_proj.bias",
            "wo": "self_attn.o_proj.weight",
            "w1": "mlp.up_proj.weight",
            "w2": "mlp.gate_proj.weight",
            "c_proj": "mlp.down_proj.weight",
            "ln_1": "input_layernorm.weight",
            "ln_2": "post_attention_layernorm.weight",
        }
        layer = {ours: _Tensor(p + hf, *shapes[ours]) for ours, hf in names.items()}
        glob = {"wte": "model.embed_tokens.weight", "ln_f": "model.norm.weight"}
    elif layout == "qwen":
        if k != n:
            raise CheckpointError("the Qwen v1 layout has no GQA (num_kv_heads != num_heads)")
        p = "transformer.h.{i}."
        names = {
            "wo": "attn.c_proj.weight",
            "w1": "mlp.w1.weight",
            "w2": "mlp.w2.weight",
            "c_proj": "mlp.c_proj.weight",
            "ln_1": "ln_1.weight",
            "ln_2": "ln_2.weight",
        }
        layer = {ours: _Tensor(p + hf, *shapes[ours]) for ours, hf in names.items()}
        qd = n * h
        for j, (w, b) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
            rows = slice(j * qd, (j + 1) * qd)
            _, to_w, from_w = shapes[w]
            _, to_b, from_b = shapes[b]
            layer[w] = _Tensor(p + "attn.c_attn.weight", (3 * qd, d), to_w, from_w, rows)
            layer[b] = _Tensor(p + "attn.c_attn.bias", (3 * qd,), to_b, from_b, rows)
        glob = {"wte": "transformer.wte.weight", "ln_f": "transformer.ln_f.weight"}
    else:
        raise CheckpointError(f"unknown layout {layout!r}; expected 'qwen' or 'qwen2'")
    if not cfg.qkv_bias:
        for b in ("bq", "bk", "bv"):
            layer.pop(b)
    globals_ = {
        "wte": _Tensor(glob["wte"], *_same((v, d))),
        "ln_f": _Tensor(glob["ln_f"], *_same((d,))),
    }
    if not cfg.tie_embeddings:
        globals_["lm_head"] = _Tensor("lm_head.weight", (v, d), lambda w: w.T, lambda x: x.T)
    return globals_, layer


def _expected(cfg: QwenConfig, layout: str) -> dict[str, tuple[int, ...]]:
    glob, layer = _tensor_map(cfg, layout)
    out = {t.hf: t.hf_shape for t in glob.values()}
    for i in range(cfg.num_layers):
        out.update({t.hf.format(i=i): t.hf_shape for t in layer.values()})
    return out


def detect_layout(names) -> str:
    if any(n.startswith("transformer.h.") or n == "transformer.wte.weight" for n in names):
        return "qwen"
    if any(n.startswith("model.layers.") or n == "model.embed_tokens.weight" for n in names):
        return "qwen2"
    raise CheckpointError("tensor names match neither the Qwen v1 nor the Qwen2 layout")


def validate(src: SafetensorsDir, cfg: QwenConfig, layout: str) -> None:
    """Every expected tensor present with its shape; no unexpected tensor. Reads headers only."""
    expected = _expected(cfg, layout)
    present = set(src.weight_map)
    missing = sorted(set(expected) - present)
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]} ({len(missing)} missing in all)")
    extra = sorted(n for n in present - set(expected) if not n.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        log.warning("lm_head.weight present in a tied-embedding checkpoint; ignored")
        extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]} ({len(extra)} unexpected in all)")
    for name, shape in expected.items():
        got = src.shape(name)
        if got != shape:
            raise CheckpointError(f"tensor {name} has shape {got}, expected {shape}")


def nonfinite_tensors(model: Qwen, layout: str) -> list[str]:
    """HF names (in `layout`) of the tensors of `model` holding NaN or inf.

    One reduction per parameter on the device; only the per-layer verdicts come to the host.
    """
    glob, layer = _tensor_map(model.cfg, layout)
    bad: list[str] = []
    for name, spec in glob.items():
        if not bool(jax.numpy.isfinite(getattr(model, name)[...]).all()):
            bad.append(spec.hf)
    for name, spec in layer.items():
        x = getattr(model.blocks, name)[...]
        ok_l = np.asarray(jax.numpy.isfinite(x).all(axis=tuple(range(1, x.ndim))))
        bad += [spec.hf.format(i=i) for i in np.flatnonzero(~ok_l)]
    return list(dict.fromkeys(bad))  # fused c_attn: one name for wq/wk/wv


# ------------------------------------------------------------------------------------ import


def read_config(path: str | os.PathLike) -> QwenConfig:
    """The QwenConfig of an HF directory's config.json; anything else is a CheckpointError
    that says what the directory is instead."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(
            f"{path} is not a checkpoint: no config.json (HF directory) and no "
            "qwen_config.json + params/ (params export)"
        )
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if isinstance(hf, dict) and "resolved_model" in hf:
        raise CheckpointError(
            f"{path} is a training workdir, not a checkpoint: export it with "
            f"`qwen-jax export --workdir {path} --to DIR`"
        )
    try:
        return from_hf_config(hf)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path} is not a Qwen model config ({short_error(e)})") from None


def load_hf(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    cfg: QwenConfig | None = None,
) -> tuple[QwenConfig, Qwen]:
    """Import an HF checkpoint directory into a (sharded) model, streaming tensor by tensor.

    `cfg` overrides the config read from config.json (e.g. to change dtypes or remat); its
    architecture must match the tensors, which are validated before anything is read.
    """
    cfg = cfg or read_config(path)
    src = SafetensorsDir(path)
    layout = detect_layout(src.weight_map)
    validate(src, cfg, layout)
    glob, layer = _tensor_map(cfg, layout)
    np_dtype = _NP_DTYPES[cfg.param_dtype]

    model = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(model)
    if mesh is not None:
        shardings = tree_shardings(abstract_state, mesh)
    else:
        device = jax.devices()[0]
        shardings = jax.tree.map(
            lambda v: v.replace(jax.sharding.SingleDeviceSharding(device)),
            abstract_state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    def build(path_keys, var, sharding_var):
        name = path_keys[-1]
        stacked = path_keys[0] == "blocks"
        spec = (layer if stacked else glob)[name]
        shape = var.get_value().shape
        sharding = sharding_var.get_value()

        def read_layer(i: int) -> np.ndarray:
            hf_name = spec.hf.format(i=i) if stacked else spec.hf
            return spec.to_ours(src.read(hf_name, spec.rows)).astype(np_dtype)

        def callback(index):
            if not stacked:
                return read_layer(0)[index]
            layers = range(cfg.num_layers)[index[0]]
            return np.stack([read_layer(i)[index[1:]] for i in layers])

        return var.replace(jax.make_array_from_callback(shape, sharding, callback))

    flat_vars = nnx.to_flat_state(abstract_state)
    flat_shardings = dict(nnx.to_flat_state(shardings))
    loaded = [(k, build(k, v, flat_shardings[k])) for k, v in flat_vars]
    state = nnx.from_flat_state(loaded)
    return cfg, nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ export


def _host_array(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(
    model: Qwen,
    out_dir: str | os.PathLike,
    *,
    layout: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 << 30,
    extra_files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write `model` as an HF directory (config.json + safetensors [+ index]) in `layout`.

    The directory must not exist (`check_output_dir`); everything is written to a sibling
    temporary directory that is renamed into place only after the last file is complete.
    `dtype` defaults to the parameter dtype. `extra_files` maps destination names to files to
    copy (e.g. tokenizer files).
    """
    cfg = model.cfg
    layout = layout or cfg.model_type
    dtype = dtype or cfg.param_dtype
    if dtype not in _NP_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} cannot be written; choose from {list(_NP_DTYPES)}")
    out = check_output_dir(out_dir)
    hf_config = to_hf_config(cfg.replace(param_dtype=dtype), layout)
    glob, layer = _tensor_map(cfg, layout)
    np_dtype = _NP_DTYPES[dtype]

    def tensors():
        """Yield (hf_name, array) one tensor at a time; fused c_attn rows assembled per layer."""
        for name, spec in glob.items():
            yield spec.hf, spec.to_hf(_host_array(getattr(model, name)[...]))
        for i in range(cfg.num_layers):
            fused: dict[str, list[tuple[slice, np.ndarray]]] = {}
            for name, spec in layer.items():
                arr = spec.to_hf(_host_array(getattr(model.blocks, name)[...][i]))
                hf_name = spec.hf.format(i=i)
                if spec.rows is None:
                    yield hf_name, arr
                else:
                    fused.setdefault(hf_name, []).append((spec.rows, arr))
            for hf_name, parts in fused.items():
                parts.sort(key=lambda p: p[0].start)
                yield hf_name, np.concatenate([a for _, a in parts], axis=0)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent.absolute()))
    try:
        # At most one size-capped shard is held in host memory at a time.
        parts: list[list[str]] = []
        current: dict[str, np.ndarray] = {}
        size = 0
        for name, arr in tensors():
            arr = np.ascontiguousarray(arr.astype(np_dtype))
            if current and size + arr.nbytes > max_shard_bytes:
                parts.append(_flush(tmp, current, len(parts)))
                current, size = {}, 0
            current[name] = arr
            size += arr.nbytes
        parts.append(_flush(tmp, current, len(parts)))
        n = len(parts)
        weight_map = {}
        for i, names in enumerate(parts):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / f"part-{i:05d}.safetensors", tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        for dest, src_file in (extra_files or {}).items():
            shutil.copy(src_file, tmp / dest)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _flush(tmp: Path, tensors: dict[str, np.ndarray], i: int) -> list[str]:
    """Write one shard under a provisional name (renamed once the shard count is known)."""
    save_file(tensors, str(tmp / f"part-{i:05d}.safetensors"))
    return list(tensors)
