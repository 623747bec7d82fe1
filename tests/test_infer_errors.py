"""Issue 12's findings on the inference and conversion paths, each reproduced: a tokenizer far
smaller than the embedding, a chat whose only turn failed, a training workdir passed as a
checkpoint, an export that loses its tokenizer, silent int64/NaN tensors, and damaged or
unwritable files. Every user error is one line on stderr and a non-zero exit, never a traceback.
"""

import base64
import dataclasses
import errno
import io
import json
import types

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import qwen_jax.checkpoint.hf as hf_mod
from qwen_jax.checkpoint import convert, save_hf, save_params
from qwen_jax.infer import chat, generate_cli
from qwen_jax.infer.load import (
    TokenizerMismatch,
    check_vocab,
    find_tokenizer,
    max_embedding_rows,
)
from qwen_jax.infer.options import UsageError, sampling_from_args
from qwen_jax.infer.text import StopChecker
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.base import decode_marking_unknown
from qwen_jax.train import export

# 256 byte tokens + Qwen's 208 specials = 464 ids; 512 rows is the usual padding (to 128).
CFG = C.tiny(vocab_size=512, init_std=0.1, seq_length=32, max_position_embeddings=64)
WIDE = CFG.replace(vocab_size=1024)  # rows far past the tokenizer: another tokenizer's model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_errors")
    vocab = root / "qwen.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    save_params(create_model(CFG, seed=3), root / "export", tokenizer_files=[vocab])
    save_params(create_model(WIDE, seed=3), root / "wide", tokenizer_files=[vocab])
    return root


def _one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"qwen-jax {prog}: error:"), err
    return err


# ------------------------------------------------------------------ tokenizer vs embedding


def test_padding_rule_accepts_real_pairs_and_refuses_a_foreign_tokenizer():
    def tok(n):
        return types.SimpleNamespace(name=f"tok{n}", vocab_size=n)

    # Qwen v1 (151,851 ids), Qwen2.5 0.5B and 72B (151,665), Qwen2 defaults (151,646), ours.
    for ids, rows in [(151_851, 151_936), (151_665, 151_936), (151_665, 152_064),
                      (151_646, 151_936), (464, 512), (1024, 1024)]:  # fmt: skip
        check_vocab(tok(ids), rows)
        assert rows <= max_embedding_rows(ids)
    with pytest.raises(TokenizerMismatch, match="--allow-vocab-mismatch"):
        check_vocab(tok(1024), 151_936)  # the case: a 1,024-piece SentencePiece model
    with pytest.raises(TokenizerMismatch, match="at most 1034 rows"):
        check_vocab(tok(1024), 1035)  # 1% past the ids; 1024 is already a multiple of 128
    check_vocab(tok(1024), 151_936, allow_mismatch=True)
    with pytest.raises(TokenizerMismatch, match="only 256 embedding rows"):
        check_vocab(tok(464), 256, allow_mismatch=True)  # the other direction: never allowed


def test_generate_refuses_a_tokenizer_far_smaller_than_the_embedding(root, capsys):
    code = generate_cli.main(["--checkpoint", str(root / "wide"), "--prompt", "It was"])
    assert code == 2
    err = _one_line_error(capsys, "generate")
    assert "1024 embedding rows" in err and "464 ids" in err


def test_allowed_mismatch_shows_unknown_ids_and_counts_them(root, capsys):
    argv = ["--checkpoint", str(root / "wide"), "--allow-vocab-mismatch", "--prompt", "It was"]
    code = generate_cli.main([*argv, "--max-new-tokens", "12", "--json", "--ignore-eod"])
    assert code == 0
    out = capsys.readouterr()
    got = json.loads(out.out)
    unknown = [t for t in got["token_ids"] if t >= 464]
    assert unknown, "the seeded model must emit ids past the tokenizer for this test to bite"
    for t in unknown:
        assert f"<unk:{t}>" in got["text"]
    (warning,) = out.err.strip().splitlines()
    assert warning.startswith("qwen-jax generate: warning:")
    assert f"{len(unknown)} generated token id(s)" in warning


def test_stream_decoding_marks_unknown_ids_instead_of_dropping_them(root):
    tok = load_tokenizer(root / "qwen.tiktoken")
    text, n = decode_marking_unknown(tok, [104, 105, 999, 0xC3, 600, 0xC3, 0xA9])
    assert (text, n) == ("hi<unk:999>\ufffd<unk:600>é", 2)  # a cut character stays visible
    checker = StopChecker(tok)
    streamed = "".join(checker.push(t)[0] for t in [104, 999, 105]) + checker.finish()
    assert streamed == checker.text == "h<unk:999>i" and checker.unknown == 1
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 464\)"):
        tok.decode([999])  # decode itself stays strict


# ------------------------------------------------------------------------------------ chat


def test_chat_whose_only_turn_failed_exits_nonzero(root, capsys):
    args = chat.build_parser().parse_args(
        ["--checkpoint", str(root / "export"), "--max-window", "1"]
    )
    assert chat.run(args, stdin=io.StringIO("hello there\n"), stdout=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert "qwen-jax chat: error:" in err and "1 of 1 turn(s) failed" in err


def test_chat_temperature_zero_blames_only_filters_the_user_passed():
    parse = chat.build_parser().parse_args
    sampling = sampling_from_args(parse(["--checkpoint", "x", "--temperature", "0"]))
    assert sampling.greedy and sampling.top_p == 1.0 and sampling.top_k == 0
    with pytest.raises(UsageError) as e:
        sampling_from_args(parse(["--checkpoint", "x", "--temperature", "0", "--top-p", "0.5"]))
    assert "--top-p" in str(e.value) and "--top-k" not in str(e.value)
    sampled = sampling_from_args(parse(["--checkpoint", "x"]))
    assert sampled.top_p == chat.CHAT_SAMPLING.top_p  # the default still applies when sampling


# ------------------------------------------------------------------------ training workdir


def test_generate_loads_a_training_workdirs_newest_step(root, capsys):
    from qwen_jax.train.checkpointing import TrainCheckpointer

    wd = root / "run"
    model = create_model(CFG, seed=11)
    resolved = {"data": {"tokenizer": str(root / "qwen.tiktoken")}}
    resolved["resolved_model"] = dataclasses.asdict(CFG)
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(resolved))
    ckpt = TrainCheckpointer(wd / "checkpoints", keep=2, async_save=False)
    ckpt.save(7, {"params": nnx.state(model, nnx.Param), "step": jnp.int32(7)}, {}, resolved)
    ckpt.wait()
    ckpt.close()

    base = ["--prompt", "It was", "--max-new-tokens", "4", "--json", "--ignore-eod"]
    assert generate_cli.main(["--checkpoint", str(wd), *base]) == 0
    from_workdir = json.loads(capsys.readouterr().out)
    save_params(model, root / "run_export", tokenizer_files=[root / "qwen.tiktoken"])
    assert generate_cli.main(["--checkpoint", str(root / "run_export"), *base]) == 0
    assert from_workdir == json.loads(capsys.readouterr().out)

    # convert, which takes exports only, says what the directory is and what to do.
    assert convert.main(["--from-orbax", str(wd), "--to-hf", str(root / "x")]) == 1
    assert "training workdir" in _one_line_error(capsys, "convert")


# ----------------------------------------------------------------------------------- convert


def test_convert_to_hf_carries_the_tokenizer(root):
    out = root / "hf"
    assert convert.main(["--from-orbax", str(root / "export"), "--to-hf", str(out)]) == 0
    assert (out / "qwen.tiktoken").read_bytes() == (root / "qwen.tiktoken").read_bytes()
    # What `generate --prompt TEXT` needs (it refused text prompts on the tokenizer-less copy).
    assert find_tokenizer(out).name == load_tokenizer(root / "qwen.tiktoken").name


@pytest.fixture
def hf_dir(root, tmp_path):
    out = tmp_path / "hf"
    save_hf(create_model(CFG, seed=3), out, extra_files={"qwen.tiktoken": root / "qwen.tiktoken"})
    return out


def test_convert_warns_about_integer_and_nan_tensors(hf_dir, tmp_path, capsys):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["transformer.ln_f.weight"] = np.ones_like(tensors["transformer.ln_f.weight"], np.int64)
    tensors["transformer.h.1.mlp.w1.weight"][0, 0] = np.nan
    save_file(tensors, hf_dir / "model.safetensors")
    assert convert.main(["--from-hf", str(hf_dir), "--to", str(tmp_path / "p")]) == 0
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 2, warnings
    assert "transformer.ln_f.weight is stored as I64" in warnings[0]
    assert "transformer.h.1.mlp.w1.weight has NaN" in warnings[1]
    assert (tmp_path / "p" / "tokenizer" / "qwen.tiktoken").exists()


def test_truncated_safetensors_is_one_line_naming_the_file(hf_dir, tmp_path, capsys):
    f = hf_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert convert.main(["--from-hf", str(hf_dir), "--to", str(tmp_path / "p")]) == 1
    assert str(f) in _one_line_error(capsys, "convert")
    assert generate_cli.main(["--checkpoint", str(hf_dir), "--prompt-ids", "1"]) == 2
    assert str(f) in _one_line_error(capsys, "generate")
    assert not (tmp_path / "p").exists()


def test_damaged_params_export_is_one_line_naming_the_export(root, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(root / "export", damaged)
    chunks = [p for p in (damaged / "params").rglob("*") if p.parent.name == "d"]
    data = max(chunks, key=lambda p: p.stat().st_size)  # the largest array's data
    data.write_bytes(data.read_bytes()[:100])
    assert generate_cli.main(["--checkpoint", str(damaged), "--prompt-ids", "1"]) == 2
    err = _one_line_error(capsys, "generate")
    assert f"params export {damaged} is damaged" in err and "OCDBT" in err


def test_full_disk_is_one_line_and_leaves_nothing(root, hf_dir, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_mod, "save_file", full)
    assert convert.main(["--from-orbax", str(root / "export"), "--to-hf", str(tmp_path / "h")]) == 1
    assert "No space left on device" in _one_line_error(capsys, "convert")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
    assert convert.main(["--from-hf", str(hf_dir), "--to", str(tmp_path / "p")]) == 1
    assert "No space left on device" in _one_line_error(capsys, "convert")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporaries left


def test_unwritable_output_is_refused_before_any_work(root, tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the output must be checked before loading anything")

    monkeypatch.setattr("qwen_jax.checkpoint.load_model", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    src = ["--from-orbax", str(root / "export"), "--to-hf"]
    assert convert.main([*src, str(afile)]) == 1
    assert "already exists" in _one_line_error(capsys, "convert")
    assert convert.main([*src, str(afile / "out")]) == 1
    assert "is a file, not a directory" in _one_line_error(capsys, "convert")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(hf_mod.tempfile, "TemporaryFile", read_only)
    assert convert.main([*src, str(tmp_path / "ro" / "out")]) == 1
    assert "not writable (Permission denied)" in _one_line_error(capsys, "convert")
    assert export.main(["--workdir", str(root / "run"), "--to", str(afile / "o")]) == 1
    assert "is a file, not a directory" in _one_line_error(capsys, "export")


# ------------------------------------------------------- the same class of defect elsewhere


@pytest.mark.parametrize(
    "name, content, msg",
    [
        ("bad.model", b"not a sentencepiece model", "not a readable sentencepiece tokenizer"),
        ("tokenizer.json", b"{broken", "not a readable hf tokenizer"),
        ("vocab.txt", b"x", "unknown tokenizer file type"),
    ],
)
def test_a_damaged_tokenizer_file_is_one_line(root, tmp_path, capsys, name, content, msg):
    (tmp_path / name).write_bytes(content)
    argv = ["--checkpoint", str(root / "export"), "--tokenizer", str(tmp_path / name)]
    assert generate_cli.main([*argv, "--prompt", "hi"]) == 2
    assert msg in _one_line_error(capsys, "generate")


def test_a_damaged_config_is_one_line(hf_dir, capsys):
    (hf_dir / "config.json").write_text("{not json")
    assert generate_cli.main(["--checkpoint", str(hf_dir), "--prompt-ids", "1"]) == 2
    assert "config.json is not valid JSON" in _one_line_error(capsys, "generate")
    (hf_dir / "config.json").write_text("{}")
    assert generate_cli.main(["--checkpoint", str(hf_dir), "--prompt-ids", "1"]) == 2
    assert "is not a Qwen model config" in _one_line_error(capsys, "generate")


def test_export_of_a_sentencepiece_run_is_found_under_its_own_name(tmp_path):
    """A run's SentencePiece model keeps its file name in the export (`my_vocab.model`): the
    export must still be found to have a tokenizer (it was silently tokenizer-less)."""
    from qwen_jax.tokenizer import train_sentencepiece

    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    spm = train_sentencepiece([str(tmp_path / "t.txt")], tmp_path / "spm", 300)
    (tmp_path / "exp" / "tokenizer").mkdir(parents=True)
    (tmp_path / "exp" / "tokenizer" / "my_vocab.model").write_bytes(spm.read_bytes())
    tok = find_tokenizer(tmp_path / "exp")
    assert tok is not None and tok.vocab_size == 300


def test_config_lists_come_back_as_tuples():
    """JSON turns every tuple field into a list; a list in the config breaks jit's hashing
    ('Non-hashable static arguments') the moment the export is served."""
    from qwen_jax.checkpoint.params import config_from_json, config_to_json

    cfg = CFG.replace(attn_windows=(8, 0))
    assert config_from_json(config_to_json(cfg)) == cfg
    hash(config_from_json(config_to_json(cfg)))
