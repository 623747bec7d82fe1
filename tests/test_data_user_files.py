"""User files as a dataset (qwen_jax.data.user_files): .jsonl = one document per line's "text",
.txt = one document per file; registered names pass through; bad specs fail clearly."""

from __future__ import annotations

import json

import pytest

from qwen_jax.data.pipeline import get_iterator
from qwen_jax.data.user_files import dataset_name
from qwen_jax.data.vocabularies import TokenizerVocabulary

JSONL_DOCS = ["def add(a, b):\n    return a + b", "The quick brown fox.", "x = 1 + 2"]
TXT_DOCS = ["first line of a file\nsecond line of the same file", "another file"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_DOCS)) + "\n"
    )
    for i, t in enumerate(TXT_DOCS):
        (tmp_path / f"part-{i}.txt").write_text(t)
    return tmp_path


def _documents(name: str, spm: str) -> list[list[int]]:
    """Every document of one pass over the validation split, as target ids (EOS included)."""
    it = get_iterator(
        name,
        split="validation",
        sequence_length=64,
        batch_size=2,
        seed=0,
        pack=False,
        vocab=spm,
        num_epochs=1,
    )
    docs = []
    for batch in it:
        for tgt, w in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"]):
            if w.any():
                docs.append(tgt[w > 0].tolist())
    it.close()
    return docs


def _expected(texts: list[str], spm: str) -> list[list[int]]:
    vocab = TokenizerVocabulary(spm)
    return [vocab.encode(t) + [vocab.eos_id] for t in texts]


def test_jsonl_and_txt_files_are_read_as_documents(files, demo_assets):
    _, spm = demo_assets
    spm = str(spm)
    jsonl = dataset_name(str(files / "docs.jsonl"), spm)
    txt = dataset_name(str(files / "part-*.txt"), spm)
    both = dataset_name(f"{files / 'docs.jsonl'},{files / 'part-*.txt'}", spm)
    assert len({jsonl, txt, both}) == 3
    assert all(n.startswith("user_files_") and n.endswith("_v1") for n in (jsonl, txt, both))
    assert dataset_name(str(files / "docs.jsonl"), spm) == jsonl  # stable: resume finds it again
    assert sorted(_documents(jsonl, spm)) == sorted(_expected(JSONL_DOCS, spm))
    # A .txt file is one document, line breaks included.
    assert sorted(_documents(txt, spm)) == sorted(_expected(TXT_DOCS, spm))
    assert sorted(_documents(both, spm)) == sorted(_expected(JSONL_DOCS + TXT_DOCS, spm))


def test_relative_paths_resolve_against_the_working_directory(files, demo_assets, monkeypatch):
    _, spm = demo_assets
    monkeypatch.chdir(files)
    name = dataset_name("docs.jsonl", str(spm))
    assert name == dataset_name(str(files / "docs.jsonl"), str(spm))
    assert len(_documents(name, str(spm))) == len(JSONL_DOCS)


def test_registered_tasks_and_mixtures_pass_through():
    for name in ("demo_pretrain_v1", "demo_pretrain_math_v1", "qwen_pretrain_v1"):
        assert dataset_name(name) == name


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches .*missing"):
        dataset_name(str(tmp_path / "missing" / "*.jsonl"))
    with pytest.raises(ValueError, match="neither a registered task or mixture"):
        dataset_name("demo_pretrain_v9")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"ending in one of \('.jsonl'"):
        dataset_name(str(tmp_path / "table.csv"))


def test_a_jsonl_without_text_fields_is_an_error(files, demo_assets):
    from qwen_jax.data.sources import DataError

    _, spm = demo_assets
    (files / "bad").mkdir()
    (files / "bad" / "x.jsonl").write_text('{"content": "no text field"}\n' * 3)
    name = dataset_name(str(files / "bad" / "x.jsonl"), str(spm))
    with pytest.raises(DataError, match="malformed"):
        _documents(name, str(spm))
