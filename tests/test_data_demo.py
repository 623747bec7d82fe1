"""The embedded demo corpus, the demo main path (build-demo -> tokenizer train -> pipeline),
the SFT / preference / prompt tasks, seqio's own API on our Tasks, and MinHash dedup."""

import hashlib
import json
import re
import time

import numpy as np
import pytest
import seqio
import tensorflow as tf

from qwen_jax.data import pipeline
from qwen_jax.data.dedup import MinHasher, dedup_files, lsh_params, near_duplicates, shingle_hashes
from qwen_jax.data.demo_corpus import build_demo
from qwen_jax.data.mixtures import DEMO_PRETRAIN_RATES
from qwen_jax.data.vocabularies import TokenizerVocabulary
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.chatml import assistant_header, sft_example


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(data dir, SentencePiece model dir): the demo main job's first two steps, via the CLI."""
    from qwen_jax.data.cli import main as data_main
    from qwen_jax.tokenizer.cli import main as tok_main

    root = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    assert data_main(["build-demo", "--out", str(root / "data")]) == 0
    build_s = time.perf_counter() - t0
    assert build_s < 60, build_s
    inputs = sorted(str(p) for p in (root / "data").glob("pretrain/*/train*.jsonl"))
    inputs += sorted(str(p) for p in (root / "data").glob("sft/*/train.jsonl"))
    assert (
        tok_main(["train", "--input", *inputs, "--vocab-size", "2048", "--out", str(root / "spm")])
        == 0
    )
    return root / "data", root / "spm"


def test_demo_corpus_is_deterministic_and_small(demo, tmp_path):
    data, _ = demo
    manifest = json.loads((data / "manifest.json").read_text())
    assert 1_000_000 < manifest["total_bytes"] < 6_000_000
    for rel, meta in manifest["files"].items():
        raw = (data / rel).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == meta["sha256"]
        assert len(raw.splitlines()) == meta["records"] and all(
            isinstance(json.loads(line), dict) for line in raw.splitlines()
        )
    again = build_demo(tmp_path / "again")
    assert again["files"] == manifest["files"]
    for domain in ("code", "text", "math"):
        assert (
            sum(
                m["records"]
                for r, m in manifest["files"].items()
                if r.startswith(f"pretrain/{domain}/train")
            )
            > 50
        )
    # math answers are right: the worked lines' last number is the stated answer's inputs
    rec = json.loads((data / "pretrain/math/validation.jsonl").read_text().splitlines()[0])
    assert re.search(r"The answer is -?\d+\.$", rec["text"])


def test_demo_main_path(demo):
    data, spm = demo
    tok = load_tokenizer(spm)
    assert tok.vocab_size == 2048 and tok.encode("<|im_end|>") == [tok.im_end_id]
    it = pipeline.get_iterator(
        "demo_pretrain_v1",
        split="train",
        sequence_length=128,
        batch_size=8,
        seed=0,
        data_dir=str(data),
        vocab=str(spm),
    )
    for _ in range(30):
        b = next(it)
        assert b["decoder_target_tokens"].shape == (8, 128)
        assert b["decoder_target_tokens"].max() < tok.vocab_size
        assert (b["decoder_loss_weights"] == (b["decoder_segment_ids"] > 0)).all()
    stats = it.stats()["tasks"]
    assert set(stats) == set(DEMO_PRETRAIN_RATES)
    assert all(s["examples"] > 0 and s["tokens"] > 0 for s in stats.values())
    assert it.stats()["batches"] == 30
    validation = pipeline.get_iterator(
        "demo_pretrain_v1",
        split="validation",
        sequence_length=128,
        batch_size=8,
        seed=0,
        data_dir=str(data),
        vocab=str(spm),
    )
    assert len(list(validation)) > 0  # finite: validation splits are read once


def test_demo_sft_preference_and_prompt_batches(demo):
    data, spm = demo
    tok = load_tokenizer(spm)
    kw = dict(
        split="train", sequence_length=256, batch_size=4, seed=0, data_dir=str(data), vocab=str(spm)
    )
    sft = next(pipeline.get_iterator("demo_sft_v1", **kw))
    learned = sft["decoder_target_tokens"][sft["decoder_loss_weights"] == 1]
    hidden = sft["decoder_target_tokens"][
        (sft["decoder_loss_weights"] == 0) & (sft["decoder_segment_ids"] > 0)
    ]
    assert tok.im_start_id in learned and tok.im_end_id in learned
    assert tok.im_start_id not in hidden and tok.im_end_id not in hidden
    pref = next(pipeline.get_iterator("demo_preference_v1", **kw))
    for i in range(4):
        n, c, r = (
            int(pref[k][i]) for k in ("prompt_lengths", "chosen_lengths", "rejected_lengths")
        )
        assert 0 < n < min(c, r)
        assert (
            pref["chosen_tokens"][i, c - 1] == pref["rejected_tokens"][i, r - 1] == (tok.im_end_id)
        )
        np.testing.assert_array_equal(pref["chosen_tokens"][i, :n], pref["rejected_tokens"][i, :n])
        assert (pref["chosen_tokens"][i, c:] == tok.pad_id).all()
    prompts = next(pipeline.get_iterator("demo_prompts_v1", **kw))
    header = assistant_header(tok)
    for i in range(4):
        n = int(prompts["prompt_lengths"][i])
        assert list(prompts["prompt_tokens"][i, n - len(header) : n]) == header
    assert prompts["answers"].dtype == object and any(a.isdigit() for a in prompts["answers"])


def test_data_cli_list(capsys):
    from qwen_jax.data.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mixture  demo_pretrain_v1: demo_pretrain_code_v1=0.020" in out
    for kind, name in (
        ("sft", "demo_sft_math_v1"),
        ("preference", "demo_preference_v1"),
        ("prompt", "demo_prompts_v1"),
        ("lm", "demo_pretrain_text_v1"),
    ):
        assert f"task     {name} ({kind})" in out


def test_seqio_api_on_our_tasks(demo, monkeypatch):
    data, _ = demo
    monkeypatch.setenv("QWEN_JAX_DATA_DIR", str(data))
    task = seqio.get_mixture_or_task("demo_sft_chat_v1")  # Qwen vocab, seqio's own path
    ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
    records = [
        json.loads(line) for line in (data / "sft/chat/validation.jsonl").read_text().splitlines()
    ]
    tok = load_tokenizer("qwen")
    for ex, rec in zip(ds.as_numpy_iterator(), records):
        ids, w = sft_example(
            tok, rec["messages"], rec.get("system", "You are a helpful assistant.")
        )
        assert ex["targets"].tolist() == ids and ex["loss_weights"].tolist() == w
    vocab = TokenizerVocabulary("qwen")
    assert vocab.encode_tf(tf.constant("Observation:")).numpy().tolist() == [37763, 367, 25]
    assert vocab.decode_tf(tf.constant([37763, 367, 25])).numpy() == b"Observation:"
    assert vocab.eos_id == 151643 and vocab.vocab_size == 151851
    mix = seqio.get_mixture_or_task("demo_pretrain_v1")
    assert {t.name: mix.get_rate(t) for t in mix.tasks} == DEMO_PRETRAIN_RATES


def _jaccard(a, b):
    a, b = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    return len(a & b) / len(a | b)


def test_minhash_lsh_near_dedup(tmp_path):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(500)]
    base = [" ".join(rng.choice(vocab, 200)) for _ in range(30)]
    near = base[0].split()
    near[100] = "changed"  # one word of 200
    docs = base + [" ".join(near), base[1], "  " + base[2].upper() + " "]
    result = near_duplicates(docs, threshold=0.8)
    assert result.keep[:30].all() and not result.keep[30:].any()
    assert result.duplicate_of[30][0] == 0 and result.duplicate_of[31] == (1, 1.0)
    # the MinHash estimate tracks the exact Jaccard of the shingle sets
    hasher = MinHasher(256)
    words = base[3].split()
    for keep_words in (60, 120, 170, 190):
        other = " ".join(words[:keep_words] + list(rng.choice(vocab, 200 - keep_words)))
        est = np.mean(
            hasher.signature(shingle_hashes(base[3])) == hasher.signature(shingle_hashes(other))
        )
        assert abs(est - _jaccard(base[3], other)) < 0.08
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128 and abs((1 / bands) ** (1 / rows) - 0.8) < 0.1
    for k, chunk in enumerate((docs[:16], docs[16:])):
        (tmp_path / f"in{k}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in chunk)
        )
    report = dedup_files(
        [str(tmp_path / "in0.jsonl"), str(tmp_path / "in1.jsonl")], str(tmp_path / "out")
    )
    assert (report["documents"], report["kept"], report["removed"]) == (33, 30, 3)
    out = (tmp_path / "out" / "in1.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in out] == docs[16:30]
