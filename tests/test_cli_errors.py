"""THE error convention of `qwen-jax`: every verb's common failures (missing path, bad flag
value, damaged file) print one stderr line `qwen-jax VERB: error: ...`, exit non-zero (2 for
usage) and leave no partial output; `--help` works for every verb; config keys and values are
checked by name; an interrupted eval leaves a valid partial table; a run without the Makefile's
environment prints nothing the program did not write.

Most cases run `cli.main` in-process (the same code path as the console script, stderr via
capsys); a few run `python -m qwen_jax.cli` to see what a user's terminal gets.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_jax import cli
from qwen_jax.testing.experiments import REPO

# A guard against a hang, not a speed check: sized for a loaded 2-core machine (the suite runs
# two workers, and these tests start training subprocesses).
HANG_S = 900

TINY = "--config=experiments/pretrain/tiny.py:runlocal"
_BAR = re.compile(r"^\s*\d+%\|.*\| \d+/\d+ \[")  # a tqdm progress line (the loop's)
MAKEFILE_ENV = (
    "JAX_PLATFORMS",
    "ALLOW_MULTIPLE_LIBTPU_LOAD",
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_HOSTNAMES",
    "TF_CPP_MIN_LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def _not_verbose(monkeypatch):
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A byte-level tiktoken vocab (256 ids + Qwen's specials), a small corpus, a damaged file,
    a regular file and a tiny params export with its tokenizer."""
    root = tmp_path_factory.mktemp("cli_errors")
    vocab = root / "qwen.tiktoken"
    vocab.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    corpus = root / "corpus.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"text": f"doc {i}: the quick brown fox " * 4}) + "\n" for i in range(64)
        )
    )
    damaged = root / "damaged.safetensors"
    damaged.write_bytes(b"\xff\x00\x01not a safetensors file")
    a_file = root / "a_file.txt"
    a_file.write_text("precious user data\n")
    return {"root": root, "vocab": vocab, "corpus": corpus, "damaged": damaged, "file": a_file}


@pytest.fixture(scope="module")
def export(files) -> Path:
    from qwen_jax.checkpoint import save_params
    from qwen_jax.model import config as C
    from qwen_jax.model.factory import create_model

    cfg = C.tiny(vocab_size=464, seq_length=32, max_position_embeddings=128)  # the vocab's
    path = files["root"] / "export"
    save_params(create_model(cfg, seed=0), path, tokenizer_files=[files["vocab"]])
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, verb: str, *, exit: int | None = None) -> str:
    """Assert THE convention; returns the message after `error: `."""
    lines = err.splitlines()
    assert code != 0, err
    assert exit is None or code == exit, (code, err)
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err
    prefix = f"qwen-jax {verb}: error: " if verb else "qwen-jax: error: "
    m = re.match(rf"^{re.escape(prefix.split(':')[0])}(?: [\w-]+)*: error: (.+)$", lines[0])
    assert lines[0].startswith(prefix.split(": error")[0]) and m, lines[0]
    return m.group(1)


# ----------------------------------------------------------------------------- the entry point


def test_unknown_verb_is_one_line_with_a_suggestion(capsys):
    code, out, err = run(["trian", "--config=x"], capsys)
    assert "did you mean 'train'" in one_line_error(code, err, "", exit=2)
    assert out == ""


def test_usage_documents_verbose(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "--verbose" in out and cli.VERBOSE_ENV in out


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_every_verb_has_help(verb, capsys):
    code, out, err = run([verb, "--help"], capsys)
    assert code == 0, err
    assert len(out.splitlines()) >= 3 and "usage" in out.lower()
    assert err == ""


def test_train_help_lists_the_flags_and_config_overrides(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--config", "--workdir", "--force", "--config.SECTION.KEY"):
        assert flag in out
    code, out, _ = run(["compile", TINY, "--help"], capsys)
    assert code == 0 and "--topology" in out and "--fast" in out


def test_exception_text_becomes_one_line():
    assert cli.error_message(ValueError("a\n  b\tc")) == "a b c"
    assert cli.error_message(KeyError("x")) == "KeyError: 'x'"
    assert cli.error_message(RuntimeError()) == "RuntimeError"
    assert len(cli.error_message(ValueError("x" * 5000))) <= 600
    # TensorFlow wraps an error raised in a py_function/generator with the Python traceback.
    wrapped = (
        "{{function_node __wrapped__IteratorGetNext}} Error in user-defined function passed "
        'to ... :\nTraceback (most recent call last):\n\n  File "sources.py", line 9, in gen\n'
        "    raise DataError(msg)\n\nqwen_jax.data.sources.DataError: /d/x.jsonl: 3 malformed "
        "of 9 records\n\n\n\t [[{{node PyFunc}}]] [Op:IteratorGetNext] name: "
    )
    assert (
        cli.error_message(RuntimeError(wrapped))
        == "DataError: /d/x.jsonl: 3 malformed of 9 records"
    )


def test_interrupt_is_one_line_exit_130(monkeypatch, capsys):
    from qwen_jax.tokenizer import cli as tok_cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok_cli, "main", interrupted)
    code, _, err = run(["tokenizer", "info"], capsys)
    assert one_line_error(code, err, "tokenizer", exit=130) == "interrupted"


def test_verbose_shows_the_traceback(files, monkeypatch, capsys):
    argv = ["tokenizer", "decode", "--tokenizer", str(files["root"] / "missing"), "1"]
    code, _, err = run(argv, capsys)
    one_line_error(code, err, "tokenizer")
    code, _, err = run(["--verbose", *argv], capsys)
    assert (
        code == 1 and "Traceback" in err and err.splitlines()[-1].startswith("qwen-jax tokenizer")
    )
    assert cli.VERBOSE_ENV not in os.environ  # --verbose lasts one call
    monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    assert "Traceback" in run(argv, capsys)[2]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_errors(files, capsys):
    tok = ["--tokenizer", str(files["vocab"])]
    code, out, err = run(["tokenizer", "decode", *tok, "65", "999999"], capsys)
    msg = one_line_error(code, err, "tokenizer", exit=2)
    assert "999999" in msg and "vocab size 464" in msg and out == ""
    code, _, err = run(["tokenizer", "decode", *tok, "sixty"], capsys)
    assert "invalid int value" in one_line_error(code, err, "tokenizer", exit=2)
    code, _, err = run(["tokenizer", "info", "--tokenizer", str(files["root"] / "nope")], capsys)
    assert "nope" in one_line_error(code, err, "tokenizer", exit=1)
    code, _, err = run(["tokenizer", "info", "--tokenizer", str(files["damaged"])], capsys)
    one_line_error(code, err, "tokenizer")
    code, _, err = run(["tokenizer", "train", "--input", str(files["root"] / "x.jsonl")], capsys)
    assert "--vocab-size" in one_line_error(code, err, "tokenizer", exit=2)


def test_tokenizer_encode_says_when_it_replaces_invalid_utf8(files, capsys):
    tok = ["--tokenizer", str(files["vocab"])]
    text = os.fsdecode(b"a\xff\xfeb")  # what argv holds for those bytes
    code, out, err = run(["tokenizer", "encode", *tok, text], capsys)
    assert code == 0 and out.split() == ["97", "239", "191", "189", "239", "191", "189", "98"]
    assert err.splitlines() == [
        "qwen-jax tokenizer: warning: replaced 2 invalid UTF-8 byte(s) with U+FFFD "
        "(--strict refuses such input)"
    ]
    code, out, err = run(["tokenizer", "encode", "--strict", *tok, text], capsys)
    assert "2 invalid byte(s)" in one_line_error(code, err, "tokenizer", exit=2) and out == ""
    code, out, err = run(["tokenizer", "encode", "--strict", *tok, "héllo"], capsys)
    assert code == 0 and err == "" and out.split() == ["104", "195", "169", "108", "108", "111"]


# ----------------------------------------------------------------------------- data


def test_build_demo_refuses_a_file_and_a_users_directory(files, tmp_path, capsys):
    code, _, err = run(["data", "build-demo", "--out", str(files["file"])], capsys)
    assert "is a file" in one_line_error(code, err, "data", exit=2)
    assert files["file"].read_text() == "precious user data\n"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run(["data", "build-demo", "--out", str(mine)], capsys)
    assert "--overwrite" in one_line_error(code, err, "data", exit=2)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    code, _, err = run(["data", "build-demo"], capsys)
    assert "--out" in one_line_error(code, err, "data", exit=2)


def test_build_demo_may_rewrite_its_own_output(tmp_path):
    from qwen_jax.data.cli import _check_demo_out

    _check_demo_out(tmp_path / "new", overwrite=False)
    _check_demo_out(tmp_path, overwrite=False)  # empty
    (tmp_path / "manifest.json").write_text(
        json.dumps({"version": 1, "files": {}, "total_bytes": 0})
    )
    (tmp_path / "pretrain").mkdir()
    _check_demo_out(tmp_path, overwrite=False)  # an earlier build
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(cli.UsageError):
        _check_demo_out(tmp_path, overwrite=False)
    _check_demo_out(tmp_path, overwrite=True)


def test_data_errors(files, tmp_path, capsys):
    code, _, err = run(["data", "frobnicate"], capsys)
    assert "invalid choice" in one_line_error(code, err, "data", exit=2)
    missing = str(files["root"] / "missing.jsonl")
    code, _, err = run(["data", "dedup", "--input", missing, "--out", str(tmp_path / "o")], capsys)
    assert "missing.jsonl" in one_line_error(code, err, "data")
    code, _, err = run(["data", "dedup", "--input", missing, "--threshold", "high"], capsys)
    one_line_error(code, err, "data", exit=2)


# ----------------------------------------------------------------------------- train, compile


def _train(files, workdir, *overrides):
    return [
        "train",
        TINY,
        f"--workdir={workdir}",
        f"--config.data.mixture={files['corpus']}",
        "--config.data.eval_mixture=",
        f"--config.data.tokenizer={files['vocab']}",
        *overrides,
    ]


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.run.stepz=5", ["unknown config key run.stepz; did you mean run.steps?"]),
        ("--config.rnu.steps=5", ["unknown config key rnu.steps; did you mean run.steps?"]),
        ("--config.run.steps=-5", ["run.steps=-5", ">= 1"]),
        ("--config.run.steps=five", ["--config.run.steps", "five"]),
        ("--config.data.global_batch=0", ["data.global_batch=0"]),
        ("--config.data.seq_len=1", ["data.seq_len=1"]),
        ("--config.run.log_every=0", ["run.log_every=0"]),
        ("--config.run.checkpoint_every=-1", ["run.checkpoint_every=-1"]),
        ("--config.run.keep_checkpoints=0", ["run.keep_checkpoints=0"]),
        ("--config.optim.peak_lr=-0.1", ["optim.peak_lr=-0.1"]),
        ("--config.optim.warmup_steps=60", ["optim.warmup_steps=60", "total_steps=20"]),
        ("--bogus=1", ["bogus"]),
    ],
)
def test_train_flag_and_config_errors(files, tmp_path, capsys, override, words):
    code, out, err = run(_train(files, tmp_path / "wd", override), capsys)
    msg = one_line_error(code, err, "train", exit=2)
    assert all(w in msg for w in words), msg
    assert out == "" and not (tmp_path / "wd").exists()


def test_train_missing_inputs(files, tmp_path, capsys):
    code, _, err = run(["train", f"--workdir={tmp_path}"], capsys)
    assert "--config" in one_line_error(code, err, "train", exit=2)
    code, _, err = run(["train", TINY], capsys)
    assert "--workdir" in one_line_error(code, err, "train", exit=2)
    code, _, err = run(["train", "--config=experiments/nope.py", f"--workdir={tmp_path}"], capsys)
    assert "no experiment file experiments/nope.py" in one_line_error(code, err, "train", exit=2)


def test_compile_errors(capsys):
    code, _, err = run(["compile", TINY, "--topology=v9-8"], capsys)
    assert "unknown topology 'v9-8'" in one_line_error(code, err, "compile", exit=2)
    code, _, err = run(["compile", TINY], capsys)  # runlocal has no topology
    assert "--topology" in one_line_error(code, err, "compile", exit=2)
    code, _, err = run(["compile", TINY, "--config.data.global_batch=-2"], capsys)
    assert "data.global_batch=-2" in one_line_error(code, err, "compile", exit=2)


def test_config_values_are_checked_by_name():
    from qwen_jax.train.config import TrainConfig, load_experiment

    c = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
    TrainConfig.from_config_dict(c)  # the experiment itself is valid
    for key, value in [("data.num_shards", -1), ("optim.b2", 1.0), ("mesh.tensor", 0)]:
        section, name = key.split(".")
        bad = load_experiment(REPO / "experiments/pretrain/tiny.py", "runlocal")
        bad[section][name] = value
        with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
            TrainConfig.from_config_dict(bad)


# ----------------------------------------------------------------------------- eval


def _gsm8k(root: Path, n: int) -> Path:
    from qwen_jax.evals.data import write_jsonl

    rows = [{"question": f"{i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(n)]
    write_jsonl(root / "gsm8k" / "test.jsonl", rows)
    return root


class _Model:
    """A stand-in EvalModel; `stop_at` calls in, it interrupts (Ctrl-C or SIGTERM)."""

    def __init__(self, stop_at=None, how="keyboard"):
        self.calls, self.stop_at, self.how = 0, stop_at, how

    def next_token_logprobs(self, prompts, candidates):
        raise AssertionError("not a choice task")

    def generate(self, prompts, *, max_new_tokens, stop):
        self.calls += 1
        if self.calls == self.stop_at:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return ["so the answer is 1"] * len(prompts)


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_eval_refuses_limits_below_one(tmp_path, limit, capsys):
    out = tmp_path / "out"
    argv = ["eval", "run", "--checkpoint", str(tmp_path), "--limit", limit, "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert f"--limit must be >= 1 (items per benchmark), got {limit}" in one_line_error(
        code, err, "eval", exit=2
    )
    assert not out.exists()


def test_eval_with_nothing_to_evaluate_is_an_error(tmp_path, monkeypatch, capsys):
    from qwen_jax.evals import cli as evals_cli

    monkeypatch.setattr(evals_cli, "load_model", lambda args: _Model())
    out, empty = tmp_path / "out", tmp_path / "empty"
    empty.mkdir()
    argv = ["eval", "run", "--checkpoint", str(tmp_path), "--benchmarks", "gsm8k,mmlu"]
    code, stdout, err = run([*argv, "--data-dir", str(empty), "--out", str(out)], capsys)
    assert "nothing to evaluate" in one_line_error(code, err, "eval", exit=1)
    assert not (out / "results.md").exists()
    code, _, err = run(["eval", "nope"], capsys)
    assert "unknown sub-verb 'nope'" in one_line_error(code, err, "eval", exit=2)


@pytest.mark.parametrize("how", ["keyboard", "sigterm"])
def test_interrupted_eval_leaves_a_partial_table(tmp_path, how, capsys):
    from qwen_jax.evals import runner

    data, out = _gsm8k(tmp_path / "data", 10), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        runner.run(_Model(stop_at=3, how=how), ["gsm8k"], data, out, batch_size=3, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["gsm8k-8shot"]["n"] == 6 and results["gsm8k-8shot"]["partial"] == "6 of 10 items"
    table = (out / "results.md").read_text()
    assert table.startswith("**Partial run (interrupted).**")
    assert "interrupted: gsm8k-8shot (6 of 10 items)" in table and "partial: 6 of 10" in table
    assert not list(out.glob(".*.tmp"))
    done = runner.run(_Model(), ["gsm8k"], data, out, batch_size=3, progress=False)  # resumes
    assert done["gsm8k-8shot"]["n"] == 10 and "partial" not in done["gsm8k-8shot"]
    assert "Partial" not in (out / "results.md").read_text()


# ----------------------------------------------------------------------------- the other verbs


def test_inference_verbs_missing_and_damaged_checkpoints(files, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    cases = [
        ("generate", ["--checkpoint", missing, "--prompt", "hi"]),
        ("generate", ["--checkpoint", str(files["root"]), "--prompt", "hi"]),
        ("chat", ["--checkpoint", missing]),
        ("convert", ["--from-hf", missing, "--to", str(tmp_path / "o")]),
        ("convert", ["--from-hf", str(files["root"]), "--to", str(tmp_path / "o")]),
        ("export", ["--workdir", missing, "--to", str(tmp_path / "o")]),
        ("eval", ["run", "--checkpoint", missing, "--out", str(tmp_path / "o")]),
    ]
    for verb, argv in cases:
        code, out, err = run([verb, *argv], capsys)
        one_line_error(code, err, verb)
        assert not (tmp_path / "o").exists(), (verb, argv)


@pytest.mark.parametrize(
    "verb, argv",
    [
        ("generate", ["--checkpoint", "x", "--prompt", "hi", "--max-new-tokens", "many"]),
        ("chat", ["--checkpoint", "x", "--temperature", "hot"]),
        ("convert", ["--from-hf", "x", "--dtype", "int3"]),
        ("export", ["--workdir", "x", "--to", "y", "--step", "last"]),
        ("bench", ["--steps", "few"]),
        ("demo", ["--steps", "many"]),
        ("eval", ["run", "--checkpoint", "x", "--out", "y", "--limit", "ten"]),
    ],
)
def test_bad_flag_values_are_one_usage_line(verb, argv, capsys):
    code, out, err = run([verb, *argv], capsys)
    assert "invalid" in one_line_error(code, err, verb, exit=2)
    assert out == ""


# ----------------------------------------------------------------------------- subprocesses


def _user_env() -> dict[str, str]:
    """The environment of a user who never ran `make`: none of the Makefile's settings, no
    test-only XLA flags, not verbose."""
    drop = {*MAKEFILE_ENV, "XLA_FLAGS", cli.VERBOSE_ENV}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _cli(args, env=None, timeout=HANG_S):
    return subprocess.run(
        [sys.executable, "-m", "qwen_jax.cli", *args],
        cwd=REPO,
        env=env or _user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_without_the_makefile_env_prints_only_its_own_lines(export):
    """No libtpu probing (`E0000 ... INVALID_ARGUMENT`), no TensorFlow/XLA start-up lines."""
    proc = _cli(
        ["generate", "--checkpoint", str(export), "--prompt", "hi", "--max-new-tokens", "3"]
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert proc.stderr == ""  # the program itself writes nothing there on success


@pytest.mark.slow
def test_train_without_the_makefile_env_prints_only_its_own_lines(files, tmp_path):
    """Two steps of the tiny experiment; stderr holds only the progress bar (and none of
    TensorFlow's cudart/cuInit/oneDNN or libtpu's lines)."""
    small = ["--config.data.seq_len=32", "--config.data.global_batch=2"]
    steps = ["--config.run.steps=2", "--config.run.log_every=1", "--config.run.checkpoint_every=0"]
    proc = _cli(_train(files, tmp_path / "wd", *small, *steps, "--config.run.eval_every=0"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "qwen-jax train: done at step 2"
    foreign = [
        part
        for line in proc.stderr.splitlines()
        for part in line.split("\r")
        if part.strip() and not _BAR.match(part)
    ]
    assert foreign == [], proc.stderr


@pytest.mark.slow
def test_malformed_corpus_is_one_line_without_tensorflows_traceback(files, tmp_path, capsys):
    """The reader's DataError (raised inside tf.data) reaches the user as its own message
    (after the progress bar, which the loop closes first)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join("{broken\n" if i % 2 else '{"text": "ok"}\n' for i in range(40)))
    small = ["--config.data.seq_len=32", "--config.data.global_batch=2", "--config.run.steps=1"]
    args = _train(files, tmp_path / "wd", *small, "--config.run.eval_every=0")
    args[3] = f"--config.data.mixture={bad}"
    code, _, err = run(args, capsys)
    err = "".join(ln for ln in err.splitlines(True) if ln.strip() and not _BAR.match(ln))
    msg = one_line_error(code, err, "train", exit=1)
    assert msg.startswith(f"{bad}: 20 malformed of 40 records")
