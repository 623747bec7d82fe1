"""User chat and preference files (qwen_jax.data.user_files / records.py): OpenAI- and
ShareGPT-style conversations, TRL-style pairs, kind detection, bad records, the synthetic
preference task.

Expected tokens come from chatml.sft_example / chatml.preference_tokens on the equivalent
messages, never from the pipeline itself.
"""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections import Counter

import numpy as np
import pytest
import seqio

from qwen_jax.data import records
from qwen_jax.data.pipeline import get_iterator
from qwen_jax.data.sources import DataError
from qwen_jax.data.synthetic_preference import SIGNOFF, preference_pairs, write_preference_files
from qwen_jax.data.tasks import add_corpus_task, task_kind
from qwen_jax.data.user_files import dataset_name
from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.chatml import DEFAULT_SYSTEM, preference_tokens, sft_example

# (system or None, turns): single- and multi-turn, with and without a system prompt
CONVERSATIONS = [
    (
        None if k % 3 == 0 else f"You are assistant number {k}.",
        [
            {"role": "user", "content": f"Question {k}: what is {k} + {k}?"},
            {"role": "assistant", "content": f"{k} + {k} = {2 * k}."},
        ]
        + (
            [
                {"role": "user", "content": "And times three?"},
                {"role": "assistant", "content": f"3 x {k} = {3 * k}, my friend."},
            ]
            if k % 2
            else []
        ),
    )
    for k in range(12)
]
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen")


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _openai(k, system, turns):
    if system is None:
        return {"messages": turns}
    if k % 2:  # a leading system message ...
        return {"messages": [{"role": "system", "content": system}, *turns]}
    return {"system": system, "messages": turns}  # ... or a top-level "system"


def _sharegpt(system, turns):
    head = [] if system is None else [{"from": "system", "value": system}]
    return {
        "conversations": head
        + [{"from": SHAREGPT_FROM[t["role"]], "value": t["content"]} for t in turns]
    }


def _batches(name, *, pack=True, length=256, batch=4, **kw):
    it = get_iterator(
        name,
        split="train",
        sequence_length=length,
        batch_size=batch,
        seed=0,
        pack=pack,
        num_epochs=1,
        **kw,
    )
    out = list(it)
    stats = it.stats()["tasks"][name]
    it.close()
    return out, stats


def _segments(batches):
    """(targets, inputs, weights, positions) of every packed segment, as tuples."""
    keys = ("target_tokens", "input_tokens", "loss_weights", "positions")
    for b in batches:
        for r, seg in enumerate(b["decoder_segment_ids"]):
            for s in range(1, seg.max() + 1):
                yield tuple(tuple(b[f"decoder_{k}"][r][seg == s].tolist()) for k in keys)


def test_openai_and_sharegpt_files_give_sft_example_tokens_packed_whole(tmp_path, tok):
    openai = _jsonl(
        tmp_path / "openai.jsonl", [_openai(k, *c) for k, c in enumerate(CONVERSATIONS)]
    )
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [_sharegpt(*c) for c in CONVERSATIONS])
    expected = Counter()
    for system, turns in CONVERSATIONS:
        ids, weights = sft_example(tok, turns, system or DEFAULT_SYSTEM)
        expected[(tuple(ids), tuple(weights))] += 1
    assert max(len(ids) for ids, _ in expected) < 256 // 2  # rows can hold several

    names = [dataset_name(str(openai)), dataset_name(str(sharegpt))]
    for name in names:
        assert re.fullmatch(r"user_files_sft_[0-9a-f]{8}_v1", name)
        assert task_kind(seqio.get_mixture_or_task(name)) == "sft"
    packed, _ = _batches(names[0], pack=True)
    unpacked, _ = _batches(names[1], pack=False)
    for batches in (packed, unpacked):
        segments = list(_segments(batches))
        assert Counter((tgt, w) for tgt, _, w, _ in segments) == expected
        for tgt, inp, _, pos in segments:  # a conversation's own positions and inputs
            assert pos == tuple(range(len(tgt)))
            assert inp == (tok.eod_id, *tgt[:-1])
    # several conversations share a row, each a whole segment: what the model sees per
    # conversation is the same packed or not
    assert max(b["decoder_segment_ids"].max() for b in packed) >= 2
    assert Counter(_segments(packed)) == Counter(_segments(unpacked))


def test_kind_detection_and_prefix_override(tmp_path):
    pair = {"chosen": "yes", "rejected": "no"}
    files = {
        "lm": _jsonl(tmp_path / "docs.jsonl", [{"text": "a document"}]),
        "sft": _jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0][1]}]),
        "sharegpt": _jsonl(tmp_path / "share.jsonl", [_sharegpt(*CONVERSATIONS[1])]),
        # a preference record may carry its prompt as "messages": chosen+rejected decide
        "preference": _jsonl(
            tmp_path / "pairs.jsonl", [{"messages": CONVERSATIONS[0][1][:1], **pair}]
        ),
        "prompt": _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}]),
        "unknown": _jsonl(tmp_path / "other.jsonl", ["{not json", {"instruction": "x"}]),
    }
    (tmp_path / "notes.txt").write_text("plain text")
    expected = {"lm": "lm", "sft": "sft", "sharegpt": "sft", "preference": "preference"}
    expected |= {"prompt": "prompt", "unknown": "lm"}  # unknown: lm records lacking "text"
    names = {k: dataset_name(str(p)) for k, p in files.items()}
    for k, name in names.items():
        assert task_kind(seqio.get_mixture_or_task(name)) == expected[k], k
    assert len({names["lm"], names["sft"], names["preference"], names["prompt"]}) == 4
    assert re.fullmatch(r"user_files_[0-9a-f]{8}_v1", names["lm"])  # lm names as before kinds
    assert dataset_name(f"lm:{files['lm']}") == names["lm"]
    assert dataset_name(f"sft:{files['sft']}") == names["sft"]
    forced = dataset_name(f"preference:{files['sft']}")
    assert forced != names["sft"] and forced.startswith("user_files_preference_")
    assert task_kind(seqio.get_mixture_or_task(forced)) == "preference"
    assert task_kind(seqio.get_mixture_or_task(dataset_name(str(tmp_path / "notes.txt")))) == "lm"
    with pytest.raises(ValueError, match="come in .jsonl files"):
        dataset_name(f"sft:{tmp_path / 'notes.txt'}")


GOOD_USER = {"role": "user", "content": "hi"}
GOOD_REPLY = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "kind,record,reason",
    [
        ("sft", {"messages": [GOOD_USER]}, "no_assistant_turn"),
        ("sft", {"conversations": [{"from": "human", "value": "hi"}]}, "no_assistant_turn"),
        ("sft", {"messages": [GOOD_USER, {"role": "tool", "content": "x"}]}, "unknown_role"),
        ("sft", {"conversations": [{"from": "robot", "value": "x"}]}, "unknown_role"),
        ("sft", {"messages": [{"role": "user", "content": " \n"}, GOOD_REPLY]}, "empty_message"),
        (
            "sft",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
            "empty_message",
        ),
        (
            "sft",
            {"messages": [{"role": "user", "content": ["hi"]}, GOOD_REPLY]},
            "non_string_content",
        ),
        ("sft", {"conversations": [{"from": "human", "value": 3}]}, "non_string_content"),
        (
            "sft",
            {"messages": [GOOD_USER, {"role": "system", "content": "s"}, GOOD_REPLY]},
            "misplaced_system",
        ),
        ("sft", {"messages": [GOOD_USER, {"content": "no role"}]}, "bad_message"),
        ("sft", ["not", "an object"], "not_an_object"),
        (
            "preference",
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "chosen_equals_rejected",
        ),
        ("preference", {"prompt": "q", "chosen": "a", "rejected": " "}, "empty_message"),
        ("preference", {"prompt": "q", "chosen": 1, "rejected": "b"}, "non_string_content"),
        (
            "preference",
            {"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"},
            "unknown_role",
        ),
        (
            "preference",
            {"prompt": "q", "chosen": [GOOD_USER], "rejected": [GOOD_REPLY]},
            "no_assistant_turn",
        ),
        (
            "preference",
            {
                "chosen": [GOOD_USER, GOOD_REPLY],
                "rejected": [
                    {"role": "user", "content": "other"},
                    {"role": "assistant", "content": "x"},
                ],
            },
            "prompt_mismatch",
        ),
        ("preference", {"chosen": "a", "rejected": "b"}, "no_prompt"),
        ("preference", {"messages": [GOOD_USER, GOOD_REPLY]}, "no_chosen_rejected"),
        ("sft", {"prompt": "q", "chosen": "a", "rejected": "b"}, "no_messages"),
        ("prompt", {"prompt": [GOOD_USER, GOOD_REPLY]}, "no_user_turn"),
    ],
)
def test_each_bad_record_has_its_reason(kind, record, reason):
    with pytest.raises(records.BadRecord) as e:
        records.canonical(kind, record)
    assert e.value.reason == reason and str(e.value)


def test_formats_share_one_canonical_form():
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    want = {"messages": turns, "system": "be brief"}
    assert records.canonical("sft", {"system": "be brief", "messages": turns}) == want
    assert records.canonical("sft", _openai(1, "be brief", turns)) == want
    assert records.canonical("sft", _sharegpt("be brief", turns)) == want
    assert records.canonical("sft", {"messages": turns})["system"] == DEFAULT_SYSTEM
    completion = {"system": "be brief", "prompt": "q", "completion": "a"}  # TRL's format
    assert records.canonical("sft", completion) == want
    completion = {"prompt": [{"role": "system", "content": "be brief"}, turns[0]]}
    assert records.canonical("sft", {**completion, "completion": [turns[1]]}) == want
    assert records.detect_kind({"prompt": "q", "completion": "a"}) == "sft"
    pair = {"prompt": [turns[0]], "chosen": "good", "rejected": "bad", "system": DEFAULT_SYSTEM}
    reply = [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]
    for rec in (
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"messages": [turns[0]], "chosen": "good", "rejected": "bad"},
        {"prompt": [turns[0]], "chosen": reply[0], "rejected": reply[1]},  # TRL conversational
        {"chosen": [turns[0], *reply[0]], "rejected": [turns[0], *reply[1]]},  # implicit prompt
    ):
        assert records.canonical("preference", rec) == pair, rec


def _bad_sft_file(tmp_path):
    """20 good conversations and 6 bad lines (line number -> reason)."""
    good = [_openai(k, *CONVERSATIONS[k % 12]) for k in range(20)]
    bad = {
        3: {"messages": [GOOD_USER]},
        7: {"conversations": [{"from": "human", "value": "hi"}]},
        10: {"messages": [{"role": "tool", "content": "x"}, GOOD_REPLY]},
        14: {"messages": [{"role": "user", "content": ""}, GOOD_REPLY]},
        18: {"messages": [{"role": "user", "content": {"text": "hi"}}, GOOD_REPLY]},
        22: '{"messages": [',
    }
    reasons = ["no_assistant_turn", "no_assistant_turn", "unknown_role", "empty_message"]
    reasons += ["non_string_content", "bad_json"]
    rows = []
    for line in range(1, 27):
        rows.append(bad[line] if line in bad else good.pop())
    return _jsonl(tmp_path / "chats.jsonl", rows), dict(zip(bad, reasons))


def test_bad_records_are_counted_and_skipped_with_file_and_line(tmp_path, tok, caplog):
    path, bad = _bad_sft_file(tmp_path)
    name = dataset_name(str(path))
    with caplog.at_level(logging.WARNING):
        batches, stats = _batches(name, max_bad_fraction=0.25)  # 6 of 26: within
    assert len(list(_segments(batches))) == 20
    reader = stats["reader"]
    assert reader["records"] == 26 and reader["malformed"] == 6 and reader["kept"] == 20
    for reason, n in Counter(bad.values()).items():
        assert reader[f"malformed_{reason}"] == n, reason
    for line in sorted(bad)[:5]:  # the first five per file, then a count
        assert f"{path}:{line}: " in caplog.text
    assert f"{path}: skipped 6 malformed records" in caplog.text


def test_past_the_fraction_the_data_error_itself_names_file_count_reason_and_knob(tmp_path):
    path, _ = _bad_sft_file(tmp_path)
    name = dataset_name(str(path))
    with pytest.raises(DataError) as e:
        _batches(name)  # the default limit, 1%
    assert type(e.value) is DataError
    msg = str(e.value)
    assert msg.startswith(f"{path}: 6 malformed of 26 records")
    assert "--config.data.max_bad_fraction=" in msg
    assert "most common reason: no_assistant_turn (2x, first at line 3: conversation has no " in msg
    assert "Traceback" not in msg and "tensorflow" not in msg.lower()
    # it never passed through TensorFlow, whose logging prints the traceback of any that does
    frames = traceback.extract_tb(e.value.__traceback__)
    assert not [f.filename for f in frames if "tensorflow" in f.filename]
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_preference_files_give_the_registered_task_pairs(tmp_path, tok):
    paths = write_preference_files(tmp_path / "synthetic", seed=3, train=20, validation=4)
    pairs = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    _jsonl(tmp_path / "registered" / "train.jsonl", pairs)  # the registered task's format
    name = "t_chat_files_pref_v1"
    if name not in seqio.TaskRegistry.names():
        add_corpus_task(name, "preference", {"train": ["registered/*.jsonl"]})
    user_rows = []
    for k, p in enumerate(pairs):  # every user format, line by line
        user = [{"role": "user", "content": p["prompt"]}]
        chosen = [{"role": "assistant", "content": p["chosen"]}]
        rejected = [{"role": "assistant", "content": p["rejected"]}]
        user_rows.append(
            [
                p,
                {"messages": user, "chosen": p["chosen"], "rejected": p["rejected"]},
                {"prompt": user, "chosen": chosen, "rejected": rejected},
                {"chosen": user + chosen, "rejected": user + rejected},
            ][k % 4]
        )
    user_rows.insert(5, {"prompt": "q", "chosen": "same", "rejected": "same"})
    user_file = _jsonl(tmp_path / "user" / "pairs.jsonl", user_rows)
    user_name = dataset_name(str(user_file))
    assert user_name.startswith("user_files_preference_")

    expected = Counter()
    for p in pairs:
        c, n = preference_tokens(tok, [{"role": "user", "content": p["prompt"]}], p["chosen"])
        r, _ = preference_tokens(tok, [{"role": "user", "content": p["prompt"]}], p["rejected"])
        expected[(tuple(c), tuple(r), n)] += 1
    got = {}
    for key, kw in ((name, {"data_dir": str(tmp_path)}), (user_name, {"max_bad_fraction": 0.1})):
        batches, stats = _batches(key, length=96, batch=8, **kw)
        got[key] = batches
        rows = Counter()
        for b in batches:
            for i in range(8):
                n_c, n_r = b["chosen_lengths"][i], b["rejected_lengths"][i]
                if n_c:
                    c, r = b["chosen_tokens"][i], b["rejected_tokens"][i]
                    assert (c[n_c:] == tok.pad_id).all() and (r[n_r:] == tok.pad_id).all()
                    rows[(tuple(c[:n_c]), tuple(r[:n_r]), int(b["prompt_lengths"][i]))] += 1
        assert rows == expected, key
    assert stats["reader"]["malformed_chosen_equals_rejected"] == 1
    reference, user = got[name][0], got[user_name][0]
    assert {k: (v.dtype, v.shape) for k, v in reference.items()} == {
        k: (v.dtype, v.shape) for k, v in user.items()
    }


@pytest.mark.parametrize("rule", ["parity", "signoff"])
def test_synthetic_preference_rule_split_and_determinism(tmp_path, rule):
    train, val = preference_pairs(seed=1, train=300, validation=60, rule=rule)
    assert (train, val) == preference_pairs(seed=1, train=300, validation=60, rule=rule)
    assert preference_pairs(seed=2, train=300, validation=60, rule=rule)[0] != train
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}  # held out
    for p in train + val:
        records.canonical("preference", p)  # a valid pair (chosen != rejected, ...)
        n = int(re.search(r"\d+", p["prompt"]).group())
        if rule == "parity":
            assert p["chosen"] == f"{n} is {('even', 'odd')[n % 2]}."
            assert p["rejected"] == f"{n} is {('odd', 'even')[n % 2]}."
        else:
            assert p["chosen"] == f"{p['rejected']} {SIGNOFF}" and str(n) in p["rejected"]
    # both labels of the rule are well represented in training
    words = Counter(p["chosen"].split()[-1] for p in train)
    if rule == "parity":
        assert min(words["even."], words["odd."]) > 100
    paths = write_preference_files(tmp_path, seed=1, train=300, validation=60, rule=rule)
    assert paths["validation"].read_text().splitlines() == [json.dumps(p) for p in val]
    assert np.unique([p["prompt"] for p in train]).size == len(train)
