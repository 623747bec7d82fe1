"""ChatML rendering, inference prompts and SFT loss masks (spec §5.1), on the real Qwen vocab.

The label reference below transcribes the spec's layout (Qwen finetune.py `preprocess`:
IGNORE = -100, labels then shifted by the model) independently of qwen_jax.tokenizer.chatml.
"""

import pytest

from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.chatml import (
    DEFAULT_SYSTEM,
    build_prompt,
    preference_tokens,
    render,
    sft_example,
)

IGN = -100
CONVERSATION = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "And doubled? <|im_end|> try me"},
    {"role": "assistant", "content": "2 x 42 = 84."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen")


def spec_labels(tok, messages):
    """Spec §5.1 / finetune.py: (input_ids, labels) of a conversation with a system prompt."""
    im_start, im_end, nl = tok.im_start_id, tok.im_end_id, tok.encode("\n")
    system, turns = messages[0]["content"], messages[1:]
    ids = [im_start] + tok.encode("system") + nl + tok.encode(system, allowed_special=set())
    ids += [im_end] + nl
    labels = [im_start] + [IGN] * (len(ids) - 3) + [im_end] + nl
    for m in turns:
        role = [im_start] + tok.encode(m["role"])  # tokenizer("<|im_start|>" + role)
        turn = role + nl + tok.encode(m["content"], allowed_special=set()) + [im_end] + nl
        ids += turn
        if m["role"] == "user":
            labels += [im_start] + [IGN] * (len(turn) - 3) + [im_end] + nl
        else:
            labels += [im_start] + [IGN] * len(role) + turn[len(role) + 1 : -2] + [im_end] + nl
    return ids, labels


def test_render_matches_spec_text():
    msgs = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
    ]
    assert render(msgs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!"
        "<|im_end|>\n<|im_start|>assistant\nHello! How can I assist you today?<|im_end|>\n"
    )
    assert render(msgs[:1], add_generation_prompt=True).endswith(
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_turn_ids_and_labels(tok):
    ids, weights = sft_example(tok, [], DEFAULT_SYSTEM)
    assert ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert weights == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]


def test_sft_mask_matches_spec_label_layout(tok):
    ids, weights = sft_example(tok, CONVERSATION)
    ref_ids, ref_labels = spec_labels(tok, CONVERSATION)
    assert ids == ref_ids
    assert [i if w else IGN for i, w in zip(ids, weights)] == ref_labels
    # the learned tokens are exactly the structure plus the assistant replies
    learned = tok.decode([i for i, w in zip(ids, weights) if w])
    assert learned == (
        "<|im_start|><|im_end|>\n" * 2
        + "<|im_start|>12 + 30 = 42.<|im_end|>\n"
        + "<|im_start|><|im_end|>\n<|im_start|>2 x 42 = 84.<|im_end|>\n"
    )
    # typed <|im_end|> in user content is plain text: one <|im_end|> id per turn
    assert ids.count(tok.im_end_id) == len(CONVERSATION)
    assert tok.decode(ids) == render(CONVERSATION)


def test_build_prompt_truncates_oldest_turns(tok):
    turns = []
    for k in range(4):
        turns += [
            {"role": "user", "content": f"question {k} " + "word " * 20},
            {"role": "assistant", "content": f"answer {k} " + "word " * 20},
        ]
    turns.append({"role": "user", "content": "final question"})
    full = build_prompt(tok, turns, max_window_tokens=10_000)
    assert full == tok.encode(render(turns, add_generation_prompt=True))
    assert full[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n
    pair = len(sft_example(tok, turns[:2], "")[0]) - len(sft_example(tok, [], "")[0])
    for budget in (len(full) - 1, len(full) - pair, len(full) - pair - 1):
        ids = build_prompt(tok, turns, max_window_tokens=budget)
        assert len(ids) <= budget
        kept = (len(full) - len(ids)) // pair  # whole (user, assistant) pairs dropped
        assert ids == tok.encode(render(turns[2 * kept :], add_generation_prompt=True))
    only_query = build_prompt(tok, turns, max_window_tokens=60)
    assert only_query == tok.encode(render(turns[-1:], add_generation_prompt=True))
    with pytest.raises(ValueError, match="max_window_tokens"):
        build_prompt(tok, turns, max_window_tokens=10)
    with pytest.raises(ValueError, match="ends with a user"):
        build_prompt(tok, turns[:2])


def test_preference_tokens_end_at_im_end(tok):
    ids, n = preference_tokens(tok, [{"role": "user", "content": "2+2?"}], "4")
    assert ids[:n] == build_prompt(tok, [{"role": "user", "content": "2+2?"}])
    assert ids[n:] == tok.encode("4") + [tok.im_end_id]


def test_chatml_with_multi_piece_role_names(tmp_path):
    from qwen_jax.tokenizer.spm import train_sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"sentence number {i} about things\n" for i in range(200)))
    tok = load_tokenizer(train_sentencepiece([corpus], tmp_path, vocab_size=300))
    ids, weights = sft_example(tok, CONVERSATION)
    assert len(tok.encode("assistant")) > 1  # the role spans several pieces here
    ref_ids, ref_labels = spec_labels(tok, CONVERSATION)
    assert ids == ref_ids
    # the spec formula assumes one-token "\n"; it is one piece here too
    assert [i if w else IGN for i, w in zip(ids, weights)] == ref_labels
    assert tok.decode(ids) == render(CONVERSATION)
