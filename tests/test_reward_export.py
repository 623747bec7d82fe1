"""Reward-model export: transformers' Qwen2ForSequenceClassification gives our rewards (fp32,
1e-4) on a right-padded batch; our importer reads the export back; `qwen-jax rm score` end to
end on a tiny jsonl, and its bad-record errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen_jax.checkpoint import CheckpointError
from qwen_jax.checkpoint.seqcls import export_reward_model, load_reward_model
from qwen_jax.model import config as C
from qwen_jax.model.factory import abstract_model
from qwen_jax.testing.tolerance import ATOL_LOGITS
from qwen_jax.tokenizer import chatml

PAD = 3  # a pad id that is not the "<|im_end|>" stand-in (any other token) of these batches


def _reward_model(seed=0, **changes):
    """Tiny Qwen2-layout GQA reward model, every parameter (score too) drawn at random with
    numpy (no per-shape compiles), norms near 1."""
    base = dict(vocab_size=320, num_kv_heads=2, model_type="qwen2", reward_head=True)
    cfg = C.tiny(C.QWEN_7B, **(base | changes))
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract_model(cfg))

    def draw(path, x):
        mean = 1.0 if str(path[-1].key).startswith("ln") else 0.0
        return jnp.asarray(mean + 0.1 * rng.standard_normal(x.shape), x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _our_rewards(model, tokens, lengths):
    """Qwen.rewards at index length-1 of each right-padded row (pads masked out)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, lengths):
        m = nnx.merge(graphdef, state)
        mask = (jnp.arange(tokens.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
        h, _ = m(tokens, segment_ids_bt=mask, return_hidden=True)
        return m.rewards(h, lengths - 1)

    return np.asarray(run(state, jnp.asarray(tokens), jnp.asarray(lengths)))


def _padded_batch(vocab, lengths, seed=0):
    """Rows of random non-pad tokens, right-padded with PAD to the longest."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), max(lengths)), PAD, np.int64)
    for i, n in enumerate(lengths):
        row = rng.integers(0, vocab - 1, size=n)
        tokens[i, :n] = np.where(row >= PAD, row + 1, row)  # never PAD inside a sequence
    return tokens, np.asarray(lengths, np.int32)


@pytest.mark.parametrize("tied,shard_bytes", [(False, 2 << 30), (True, 64_000)])
def test_seqcls_export_gives_our_rewards(tmp_path, tied, shard_bytes):
    import torch
    from transformers import Qwen2ForSequenceClassification

    model = _reward_model(tie_embeddings=tied)
    out = export_reward_model(
        model, tmp_path / "rm", pad_token_id=PAD, im_end_id=PAD + 1, max_shard_bytes=shard_bytes
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["pad_token_id"] == PAD
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "score.weight" in index and "lm_head.weight" not in index
    # One trunk shard + the score's, or (small shards) several trunk shards + the score's.
    n_files = len(set(index.values()))
    assert (n_files == 2) if shard_bytes > 1e6 else (n_files > 2)

    tokens, lengths = _padded_batch(model.cfg.vocab_size, [9, 5, 13, 1])
    ours = _our_rewards(model, tokens, lengths)
    hf = Qwen2ForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        mask = torch.tensor(np.arange(tokens.shape[1])[None] < lengths[:, None], dtype=torch.long)
        theirs = hf(input_ids=torch.tensor(tokens), attention_mask=mask).logits.float().numpy()
    assert theirs.shape == (4, 1)
    np.testing.assert_allclose(theirs[:, 0], ours, atol=ATOL_LOGITS, rtol=0)
    # Reading any other position gives other scores: the comparison pins the pooled token.
    assert np.max(np.abs(_our_rewards(model, tokens, np.maximum(lengths - 1, 1)) - ours)) > 1e-2

    _, again = load_reward_model(out)
    assert again.cfg.reward_head
    np.testing.assert_allclose(_our_rewards(again, tokens, lengths), ours, atol=1e-6, rtol=0)


def test_lora_reward_model_exports_merged(tmp_path):
    model = _reward_model(seed=2, lora_rank=4, lora_targets=("c_attn", "w2"))
    out = export_reward_model(model, tmp_path / "rm", pad_token_id=PAD)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("lora" in name for name in index)
    tokens, lengths = _padded_batch(model.cfg.vocab_size, [7, 11], seed=1)
    _, again = load_reward_model(out)
    assert again.cfg.lora_rank == 0
    np.testing.assert_allclose(
        _our_rewards(again, tokens, lengths), _our_rewards(model, tokens, lengths), atol=ATOL_LOGITS
    )


def test_export_refuses_im_end_as_pad_and_lm(tmp_path):
    model = _reward_model()
    with pytest.raises(CheckpointError, match="HF would skip that token"):
        export_reward_model(model, tmp_path / "a", pad_token_id=7, im_end_id=7)
    with pytest.raises(CheckpointError, match="no reward head"):
        export_reward_model(_reward_model(reward_head=False), tmp_path / "b", pad_token_id=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- rm score


@pytest.fixture(scope="module")
def scored_export(tmp_path_factory):
    """(export dir, model, tokenizer): a random reward model exported with a small
    SentencePiece vocab (ChatML specials included) as its tokenizer."""
    from qwen_jax.tokenizer.load import load_tokenizer
    from qwen_jax.tokenizer.spm import train_sentencepiece

    tmp = tmp_path_factory.mktemp("rm")
    corpus = tmp / "c.txt"
    corpus.write_text("".join(f"the answer to question {i} is {i * 7}\n" for i in range(300)))
    spm = train_sentencepiece([corpus], tmp / "tok", vocab_size=300)
    tok = load_tokenizer(spm)
    model = _reward_model(seed=5)
    out = export_reward_model(
        model,
        tmp / "rm",
        pad_token_id=tok.pad_id,
        im_end_id=tok.im_end_id,
        extra_files={"tokenizer.model": spm},
    )
    return out, model, tok


def _score(capsys, export_dir, data, *extra):
    from qwen_jax.train.rm_score import main

    code = main(["score", "--checkpoint", str(export_dir), "--data", str(data), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rm_score_pairs_and_responses(tmp_path, capsys, scored_export):
    out_dir, model, tok = scored_export
    records = [
        {"prompt": "question 3?", "chosen": "the answer is 21", "rejected": "no"},
        {"messages": [{"role": "user", "content": "q 4"}], "response": "28"},
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "question 5"},
            ],
            "chosen": "35",
            "rejected": "the answer to question 5 is 36",
        },
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, out, err = _score(capsys, out_dir, data, "--batch", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]

    # The expected scores: Qwen.rewards of the original model on preference_tokens.
    seqs = []
    for r in records:
        prompt = r.get("prompt", r.get("messages"))
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        for key in ("chosen", "rejected", "response"):
            if key in r:
                seqs.append(chatml.preference_tokens(tok, prompt, r[key])[0])
    lengths = [len(s) for s in seqs]
    tokens = np.full((len(seqs), max(lengths)), tok.pad_id, np.int64)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    want = _our_rewards(model, tokens, np.asarray(lengths, np.int32))

    got = [rows[0]["chosen"], rows[0]["rejected"], rows[1]["score"]]
    got += [rows[2]["chosen"], rows[2]["rejected"]]
    np.testing.assert_allclose(got, want, atol=ATOL_LOGITS, rtol=0)
    assert [r["line"] for r in rows[:3]] == [1, 2, 3]
    correct = [want[0] > want[1], want[3] > want[4]]
    assert [rows[0]["correct"], rows[2]["correct"]] == correct
    assert rows[3]["pairs"] == 2 and rows[3]["accuracy"] == pytest.approx(np.mean(correct))


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "2: Expecting property name"),
        (json.dumps({"prompt": "q", "chosen": "a"}), '2: a record needs "chosen" and "rejected"'),
        (json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}), "2: chosen equals rejected"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}], "response": "a"}), "robot"),
        (json.dumps({"messages": [{"role": "user", "content": ""}], "response": "a"}), "content"),
    ],
)
def test_rm_score_bad_record_names_the_line(tmp_path, capsys, scored_export, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "fine"}) + "\n" + line + "\n")
    code, out, err = _score(capsys, scored_export[0], data)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert f"{data}:" in err and message in err
