"""The resumable input pipeline: packing, mixing, sharding, resume, text stages, bad input.

Corpora are written here with a marker in every document, so each packed segment can be
traced back to its source text; the expected tokens are computed independently with
`tok.encode(text, allowed_special=set()) + [<|endoftext|>]`.
"""

import gzip
import json
import logging
import unicodedata

import numpy as np
import pytest
import seqio
import tensorflow as tf

from qwen_jax.data import pipeline
from qwen_jax.data.packing import FEATURES
from qwen_jax.data.sources import DataError
from qwen_jax.data.tasks import add_corpus_task
from qwen_jax.data.text_filters import QualityRules, dedup_key
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.chatml import sft_example

WORDS = "the of and to in is was for on that with as by at from it an be this are".split()


def _register(name, kind, splits, **kw):
    if name not in seqio.TaskRegistry.names():
        add_corpus_task(name, kind, splits, **kw)


for _t in ("alpha", "beta", "gamma"):
    _register(
        f"t_{_t}_v1",
        "lm",
        {"train": [f"{_t}/train-*"], "validation": [f"{_t}/val*"]},
        quality=QualityRules(min_chars=20, max_symbol_ratio=0.5),
    )
    _register(f"t_tiny_{_t}_v1", "lm", {"train": [f"tiny_{_t}/*.jsonl"]}, dedup=False)
_register("t_sft_v1", "sft", {"train": ["sft/*.jsonl"]})
_register("t_bad_v1", "lm", {"train": ["bad/*.jsonl"]}, max_bad_fraction=0.02)
_register("t_empty_v1", "lm", {"train": ["empty/*.jsonl"]}, quality=QualityRules(min_chars=10**6))
for _name, _rates in (("t_mix_v1", (0.5, 0.3, 0.2)), ("t_tiny_mix_v1", (0.5, 0.3, 0.2))):
    if _name not in seqio.MixtureRegistry.names():
        prefix = "t_tiny_" if "tiny" in _name else "t_"
        seqio.MixtureRegistry.add(
            _name, [(f"{prefix}{t}_v1", r) for t, r in zip(("alpha", "beta", "gamma"), _rates)]
        )


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Returns (data_dir, {task: [kept document texts]})."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    kept = {}
    for t in ("alpha", "beta", "gamma"):
        docs = [
            f"{t} doc {k}: " + " ".join(rng.choice(WORDS, int(rng.integers(5, 90))))
            for k in range(40)
        ]
        docs[3] = f"{t} doc 3: wow! <|endoftext|> and <|im_end|> stay text " + docs[3]
        docs[5] = unicodedata.normalize("NFD", f"{t} doc 5: café résumé naïve")
        kept[t] = [unicodedata.normalize("NFC", d) for d in docs]
        # a copy of doc 7 differing in whitespace only: dedup keeps whichever is read first
        extra = ["  " + docs[7].replace(" ", "   ") + "\n", "tiny", "#$%^&*()!@#$%^&*()_+{}|"]
        kept[f"{t}/variants"] = kept[t] + extra[:1]
        records = [{"text": d} for d in docs + extra]
        for f in range(4):
            _jsonl(root / t / f"train-{f}.jsonl", records[f::4])
        val = [f"{t} val {k}: " + " ".join(rng.choice(WORDS, 12)) for k in range(30)]
        _jsonl(root / t / "validation.jsonl", [{"text": d} for d in val])
        kept[f"{t}/validation"] = val
        tiny = [{"text": f"{t} {k}"} for k in range(97)]
        _jsonl(root / f"tiny_{t}" / "a.jsonl", tiny)
    convs = []
    for k in range(60):
        convs.append(
            {
                "messages": [
                    {"role": "user", "content": f"question {k}: " + " ".join(rng.choice(WORDS, 8))},
                    {
                        "role": "assistant",
                        "content": f"answer {k}! " + " ".join(rng.choice(WORDS, 30)),
                    },
                ]
            }
        )
    _jsonl(root / "sft" / "a.jsonl", convs)
    kept["sft"] = convs
    lines = [json.dumps({"text": f"good doc {k} " * 5}) for k in range(200)]
    lines[10], lines[50] = "{not json", json.dumps({"no_text": 1})
    (root / "bad").mkdir()
    (root / "bad" / "a.jsonl").write_text("\n".join(lines) + "\n")
    _jsonl(root / "empty" / "a.jsonl", [{"text": "short"}])
    return root, kept


def _segments(batches):
    """Yield (targets, inputs, weights, positions) of every segment, row-major."""
    for b in batches:
        for r in range(len(b["decoder_segment_ids"])):
            seg = b["decoder_segment_ids"][r]
            for s in range(1, seg.max() + 1):
                m = seg == s
                yield tuple(
                    b[k][r][m]
                    for k in (
                        "decoder_target_tokens",
                        "decoder_input_tokens",
                        "decoder_loss_weights",
                        "decoder_positions",
                    )
                )


def _documents(batches, eod):
    """Concatenate segments row-major (a split document continues at the next row's start)
    and cut after each <|endoftext|>: the documents in the order they were packed."""
    stream = np.concatenate([s[0] for s in _segments(batches)])
    cuts = np.flatnonzero(stream == eod) + 1
    return [tuple(d) for d in np.split(stream, cuts)[:-1]]


def _check_row_invariants(batch, eod, pad):
    B, T = batch["decoder_target_tokens"].shape
    assert set(batch) == set(FEATURES)
    assert all(v.dtype == np.int32 and v.shape == (B, T) for v in batch.values())
    for r in range(B):
        seg, pos = batch["decoder_segment_ids"][r], batch["decoder_positions"][r]
        tgt, inp = batch["decoder_target_tokens"][r], batch["decoder_input_tokens"][r]
        w = batch["decoder_loss_weights"][r]
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()  # padding only at the end
        assert (w[seg == 0] == 0).all() and (tgt[seg == 0] == pad).all()
        if n == 0:  # an all-padding row ends the last batch of a non-repeating split
            continue
        assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and seg[0] == 1
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (pos[idx] == np.arange(len(idx))).all()
            assert (inp[idx[1:]] == tgt[idx[:-1]]).all()  # shifted within the segment only
            if s > 1:  # a segment after the first starts a document
                assert inp[idx[0]] == eod


def test_packed_rows_reconstruct_documents(corpus, tok):
    root, kept = corpus
    it = pipeline.get_iterator(
        "t_mix_v1", split="train", sequence_length=64, batch_size=4, seed=3, data_dir=str(root)
    )
    batches = [next(it) for _ in range(40)]
    for b in batches:
        _check_row_invariants(b, tok.eod_id, tok.pad_id)
        assert (b["decoder_loss_weights"] == (b["decoder_segment_ids"] > 0)).all()
    expected = {
        tuple(tok.encode(d, allowed_special=set()) + [tok.eod_id]): d
        for t in ("alpha", "beta", "gamma")
        for d in kept[f"{t}/variants"]
    }
    docs = _documents(batches, tok.eod_id)
    bad = [tok.decode(d) for d in docs if d not in expected]
    assert len(docs) > 100 and not bad, bad[:3]
    # continuation segments: the first input is the document's previous token
    prev_last = None
    for tgt, inp, _, _ in _segments(batches):
        if inp[0] != tok.eod_id:
            assert inp[0] == prev_last
        prev_last = tgt[-1]
    # the spec's injection rule holds for corpus text; Qwen's id 0 ("!") is learned
    bang = [d for d in docs if "wow!" in expected[d]][0]
    assert bang.count(tok.eod_id) == 1 and tok.im_end_id not in bang
    assert 0 in tok.encode("!") and 0 in np.concatenate(
        [b["decoder_target_tokens"][b["decoder_loss_weights"] == 1] for b in batches]
    )


def test_mixture_rates_within_2_percent(corpus):
    root, _ = corpus
    it = pipeline.get_iterator(
        "t_tiny_mix_v1",
        split="train",
        sequence_length=512,
        batch_size=16,
        seed=0,
        data_dir=str(root),
    )
    tok = it.tokenizer
    first = {tok.encode(t)[0]: t for t in ("alpha", "beta", "gamma")}
    counts = {t: 0 for t in first.values()}
    for _ in range(25):
        for tgt, inp, _, _ in _segments([next(it)]):
            if inp[0] == tok.eod_id:
                counts[first[int(tgt[0])]] += 1
    n = sum(counts.values())
    assert n > 15_000
    for t, rate in zip(("alpha", "beta", "gamma"), (0.5, 0.3, 0.2)):
        assert abs(counts[t] / n - rate) < 0.02, counts
        stats = it.stats()["tasks"][f"t_tiny_{t}_v1"]
        assert stats["epoch"] > 10  # 97 documents per epoch: epochs roll over many times
        assert abs(stats["example_share"] - counts[t] / n) < 0.002


@pytest.mark.parametrize("split", ["train", "validation"])  # 4 files: by file; 1 file: by record
def test_two_shards_cover_the_data_exactly_once(corpus, tok, split):
    root, kept = corpus
    # train: doc 7 and its whitespace variant sit in files of different shards, and exact
    # dedup is per shard (global dedup is the offline `qwen-jax data dedup`), so both stay
    texts = kept["alpha/variants"] if split == "train" else kept["alpha/validation"]
    expected = sorted(tuple(tok.encode(d, allowed_special=set()) + [tok.eod_id]) for d in texts)
    seen = []
    for shard in (0, 1):
        it = pipeline.get_iterator(
            "t_alpha_v1",
            split=split,
            sequence_length=48,
            batch_size=3,
            seed=1,
            shard_index=shard,
            num_shards=2,
            data_dir=str(root),
            num_epochs=1,
        )
        docs = _documents(list(it), tok.eod_id)
        assert 0 < len(docs) < len(expected)
        seen.append(docs)
    assert sorted(seen[0] + seen[1]) == expected
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("name,length", [("t_mix_v1", 40), ("t_sft_v1", 160)])
def test_resume_yields_identical_batches(corpus, name, length):
    root, _ = corpus
    kw = dict(split="train", sequence_length=length, batch_size=2, seed=7, data_dir=str(root))
    ref = pipeline.get_iterator(name, **kw)
    saved = None
    for i in range(60):
        next(ref)
        if i >= 10 and ref.get_state()["carry"] is not None:
            saved = json.loads(json.dumps(ref.get_state()))
            break
    assert saved is not None, "no batch ended inside an example"
    expected = [next(ref) for _ in range(60)]
    final = ref.get_state()["tasks"]
    assert any(final[t]["epoch"] > saved["tasks"][t]["epoch"] for t in final)  # crosses epochs
    resumed = pipeline.get_iterator(name, **kw)
    resumed.set_state(saved)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.get_state() == ref.get_state()
    with pytest.raises(ValueError, match="different configuration"):
        pipeline.get_iterator(name, **{**kw, "seed": 8}).set_state(saved)


def test_seed_determinism(corpus):
    root, _ = corpus
    kw = dict(split="train", sequence_length=32, batch_size=2, data_dir=str(root))
    a, b, c = (pipeline.get_iterator("t_beta_v1", seed=s, **kw) for s in (5, 5, 6))
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"])
    assert not np.array_equal(x["decoder_target_tokens"], z["decoder_target_tokens"])


def test_sft_loss_weights_follow_conversations(corpus, tok):
    root, kept = corpus
    it = pipeline.get_iterator(
        "t_sft_v1",
        split="train",
        sequence_length=200,
        batch_size=4,
        seed=0,
        data_dir=str(root),
        num_epochs=1,
    )
    reference = {}
    for rec in kept["sft"]:
        ids, w = sft_example(tok, rec["messages"])
        reference[tuple(ids)] = np.array(w)
    n = 0
    for b in it:
        _check_row_invariants(b, tok.eod_id, tok.pad_id)
        for tgt, _, w, _ in _segments([b]):
            np.testing.assert_array_equal(w, reference[tuple(tgt)])  # whole, never split
            n += 1
    assert n == len(kept["sft"])


def test_text_stages_and_reader_counters(corpus):
    q = QualityRules(min_chars=10, max_chars=100, max_symbol_ratio=0.3, max_dup_line_fraction=0.3)
    assert q.check("short") == "too_short"
    assert q.check("x" * 101) == "too_long"
    assert q.check("{}[]()<>;;;; a") == "symbol_ratio"
    assert q.check("the same line again\n" * 4 + "one other line here") == "repeated_lines"
    assert q.check("A normal sentence, with commas.") is None
    assert dedup_key(" a  b\n") == dedup_key("a b") != dedup_key("a c")
    assert dedup_key("cafe\u0301") == dedup_key("café")
    root, kept = corpus
    it = pipeline.get_iterator(
        "t_gamma_v1",
        split="train",
        sequence_length=4096,
        batch_size=2,
        seed=0,
        data_dir=str(root),
        num_epochs=1,
    )
    list(it)
    reader = it.stats()["tasks"]["t_gamma_v1"]["reader"]
    assert reader["documents"] == 43 and reader["kept"] == 40 == len(kept["gamma"])
    assert reader["dropped_duplicate"] == 1 and reader["dropped_too_short"] == 1
    assert reader["dropped_symbol_ratio"] == 1


def test_bad_input_errors(corpus, caplog, tmp_path):
    root, _ = corpus
    kw = dict(split="train", sequence_length=32, batch_size=2, seed=0, data_dir=str(root))
    with pytest.raises(ValueError, match=r"unknown task or mixture 'nope'.*demo_pretrain_v1"):
        pipeline.get_iterator("nope", **kw)
    with pytest.raises(FileNotFoundError, match="no files match"):
        pipeline.get_iterator("t_alpha_v1", **{**kw, "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown split 'test'"):
        pipeline.get_iterator("t_alpha_v1", **{**kw, "split": "test"})
    with pytest.raises(DataError, match="no documents"):
        next(pipeline.get_iterator("t_empty_v1", **kw))
    with caplog.at_level(logging.WARNING):  # 2 of 200 malformed: skipped, counted, warned
        it = pipeline.get_iterator("t_bad_v1", **{**kw, "num_epochs": 1})
        docs = _documents(list(it), it.tokenizer.eod_id)
    assert len(docs) == 198 and it.stats()["tasks"]["t_bad_v1"]["reader"]["malformed"] == 2
    assert "malformed" in caplog.text
    _register("t_bad_strict_v1", "lm", {"train": ["bad/*.jsonl"]}, max_bad_fraction=0.005)
    with pytest.raises(DataError, match="max_bad_fraction=0.005"):
        list(pipeline.get_iterator("t_bad_strict_v1", **{**kw, "num_epochs": 1}))


def test_tfrecord_text_and_gzip_sources(tmp_path, tok):
    texts = [f"record {k} " + "words " * k for k in range(1, 13)]
    with tf.io.TFRecordWriter(str(tmp_path / "a.tfrecord")) as w:
        for t in texts[:4]:
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "text": tf.train.Feature(bytes_list=tf.train.BytesList(value=[t.encode()]))
                    }
                )
            )
            w.write(ex.SerializeToString())
    for k, t in enumerate(texts[4:8]):
        (tmp_path / f"doc{k}.txt").write_text(t)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[8:])
    _register(
        "t_formats_v1",
        "lm",
        {"train": [f"{tmp_path}/*.tfrecord", f"{tmp_path}/*.txt", f"{tmp_path}/*.jsonl.gz"]},
    )
    it = pipeline.get_iterator(
        "t_formats_v1", split="train", sequence_length=16, batch_size=2, seed=0, num_epochs=1
    )
    docs = _documents(list(it), tok.eod_id)
    assert sorted(docs) == sorted(tuple(tok.encode(t) + [tok.eod_id]) for t in texts)
