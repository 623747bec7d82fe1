"""HF export round trips, params checkpoints, and bad-input errors of the importer/CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import Qwen2ForCausalLM

from qwen_jax.checkpoint import CheckpointError, load_hf, load_model, save_hf, save_params
from qwen_jax.cli import main as cli_main
from qwen_jax.testing.hf_reference import hf_logits, make_hf_model, save_as_qwen_v1

ATOL = 1e-4


def _tokens(vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(2, 10))


@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
def test_export_qwen2_loads_in_transformers(tmp_path, kv_heads, tied):
    hf = make_hf_model(kv_heads=kv_heads, tied=tied, seed=7)
    hf.save_pretrained(tmp_path / "src")
    _, model = load_hf(tmp_path / "src")
    out = save_hf(model, tmp_path / "out", layout="qwen2")
    reloaded = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = _tokens()
    ours = np.asarray(model(jnp.asarray(tokens))[0])
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ours, atol=ATOL, rtol=0)


def test_v1_names_round_trip_bit_exact(tmp_path):
    hf = make_hf_model(kv_heads=4, seed=11)
    src = save_as_qwen_v1(hf, tmp_path / "v1")
    _, model = load_hf(src)
    out = save_hf(model, tmp_path / "v1_out", layout="qwen")
    a, b = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen"


def test_sharded_export_with_index_reimports(tmp_path):
    hf = make_hf_model(kv_heads=2, seed=2)
    hf.save_pretrained(tmp_path / "src")
    _, model = load_hf(tmp_path / "src")
    out = save_hf(model, tmp_path / "out", max_shard_bytes=64_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _, again = load_hf(out)
    tokens = jnp.asarray(_tokens())
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(again(tokens)[0]))


def test_bf16_export_and_import(tmp_path):
    hf = make_hf_model(seed=4)
    hf.save_pretrained(tmp_path / "src")
    _, model = load_hf(tmp_path / "src")
    out = save_hf(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg, m16 = load_model(out)
    assert cfg.param_dtype == "bfloat16" and m16.wte[...].dtype == jnp.bfloat16
    ref = np.asarray(model.wte[...]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(m16.wte[...]), ref)


def test_params_checkpoint_round_trip(tmp_path):
    hf = make_hf_model(kv_heads=2, seed=9)
    hf.save_pretrained(tmp_path / "src")
    _, model = load_hf(tmp_path / "src")
    save_params(model, tmp_path / "params")
    cfg, again = load_model(tmp_path / "params")
    assert cfg == model.cfg
    tokens = jnp.asarray(_tokens())
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(again(tokens)[0]))


def test_cli_convert_both_ways(tmp_path, capsys):
    hf = make_hf_model(kv_heads=4, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    assert (
        cli_main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "p")]) == 0
    )
    args = ["convert", "--from-orbax", str(tmp_path / "p"), "--to-hf", str(tmp_path / "v1")]
    assert cli_main([*args, "--layout", "qwen"]) == 0
    _, model = load_hf(tmp_path / "v1")
    tokens = _tokens()
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))[0]), hf_logits(hf, tokens), atol=ATOL, rtol=0
    )
    # The output exists now: a second run refuses and leaves it untouched.
    before = sorted(p.name for p in (tmp_path / "v1").iterdir())
    assert cli_main([*args, "--layout", "qwen"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == before


# ------------------------------------------------------------------------------- bad input


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model(kv_heads=2, seed=1).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _rewrite(hf_dir, edit):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"))


def test_missing_tensor_is_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj"):
        load_hf(hf_dir)


def test_extra_tensor_is_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.update({"model.layers.0.surprise": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.surprise"):
        load_hf(hf_dir)


def test_misshaped_tensor_is_named(hf_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.bias"] = np.zeros(5, np.float32)

    _rewrite(hf_dir, edit)
    with pytest.raises(CheckpointError, match=r"k_proj\.bias has shape \(5,\)"):
        load_hf(hf_dir)


def test_unsupported_model_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported config.json model_type='llama'"):
        load_hf(hf_dir)


def test_unrepresentable_dtype_fails_before_writing(hf_dir, tmp_path):
    _, model = load_hf(hf_dir)
    with pytest.raises(CheckpointError, match="dtype 'int8' cannot be written"):
        save_hf(model, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_exits_nonzero_and_writes_nothing(hf_dir, tmp_path, capsys):
    _rewrite(hf_dir, lambda t: t.pop("model.norm.weight"))
    code = cli_main(["convert", "--from-hf", str(hf_dir), "--to", str(tmp_path / "p")])
    assert code == 1
    assert "missing tensor model.norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".p.tmp")]


def test_failed_export_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    _, model = load_hf(hf_dir)
    import qwen_jax.checkpoint.hf as hf_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "out")
    assert list(tmp_path.glob("*out*")) == []
