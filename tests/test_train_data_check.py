"""A training run whose data names nothing (an unregistered mixture or task, user files that
match no file; the train or the evaluated eval mixture) stops with one error line before the
workdir is created: it used to be created first and left holding an empty checkpoints/."""

from __future__ import annotations

import base64

import pytest

from qwen_jax import cli

TINY = "--config=experiments/pretrain/tiny.py:runlocal"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A byte-level tiktoken vocabulary (256 ids): loads in milliseconds."""
    path = tmp_path_factory.mktemp("data_check") / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["--config.data.mixture=nope_v1"], ["dataset 'nope_v1' is neither a registered task"]),
        (
            ["--config.data.eval_mixture=nope_eval_v1", "--config.run.eval_every=25"],
            ["dataset 'nope_eval_v1' is neither a registered task"],
        ),
        (["--config.data.mixture={tmp}/none/*.jsonl"], ["no file matches", "/none/*.jsonl"]),
    ],
    ids=["mixture", "eval_mixture", "user_files"],
)
def test_unknown_data_fails_before_the_workdir_exists(vocab, tmp_path, capsys, overrides, words):
    workdir = tmp_path / "new" / "run"
    argv = [
        "train",
        TINY,
        f"--config.data.tokenizer={vocab}",
        *(o.format(tmp=tmp_path) for o in overrides),
        f"--workdir={workdir}",
    ]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code != 0 and len(lines) == 1, err
    assert lines[0].startswith("qwen-jax train: error: "), lines[0]
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "new").exists()
