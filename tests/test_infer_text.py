"""Streaming text and stop strings: held-back prefixes, split UTF-8, and the engine's cut."""

import pytest

from qwen_jax.infer.engine import Engine
from qwen_jax.infer.text import StopChecker
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model


class LetterTokenizer:
    """Token i is the letter chr(97 + i % 26); ids 300/301 are the two bytes of 'é'."""

    name, vocab_size, eod_id = "letters", 302, 299

    def token_bytes(self, i: int) -> bytes:
        return {300: b"\xc3", 301: b"\xa9"}.get(i, bytes([97 + i % 26]))


def ids(text: str) -> list[int]:
    return [ord(c) - 97 for c in text]


def _stream(checker: StopChecker, tokens: list[int]):
    out, hit = [], None
    for t in tokens:
        delta, hit = checker.push(t)
        out.append(delta)
        if hit:
            break
    return out, hit


def test_stop_string_over_several_tokens_is_cut_and_never_streamed():
    checker = StopChecker(LetterTokenizer(), ["obs"])
    deltas, hit = _stream(checker, ids("xyzoboobsqq"))
    assert hit == "obs" and checker.text == "xyzobo"
    # "o", then "ob" are held back until they turn out not to be "obs"
    assert deltas == ["x", "y", "z", "", "", "ob", "o", "", ""]
    assert "".join(deltas) + checker.finish() == "xyzobo"


def test_earliest_of_several_stop_strings_wins():
    checker = StopChecker(LetterTokenizer(), ["cd", "bcde"])
    _, hit = _stream(checker, ids("abcde"))
    assert hit == "cd" and checker.text == "ab"


def test_held_back_text_is_released_at_the_end():
    checker = StopChecker(LetterTokenizer(), ["xyz"])
    deltas, hit = _stream(checker, ids("abxy"))
    assert hit is None and "".join(deltas) == "ab"
    assert checker.finish() == "xy" and checker.text == "abxy"


def test_split_utf8_character_waits_for_its_last_byte():
    checker = StopChecker(LetterTokenizer())
    assert checker.push(300) == ("", None)
    assert checker.push(301) == ("é", None)
    assert checker.push(300) == ("", None)
    assert checker.finish() == "\ufffd"  # a cut character decodes to U+FFFD, as Qwen does


@pytest.fixture(scope="module")
def engine():
    return Engine(create_model(C.tiny(vocab_size=256, init_std=0.1), seed=2))


def test_engine_cuts_text_before_the_stop_string(engine):
    tok = LetterTokenizer()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    (free,) = engine.generate([prompt], max_new_tokens=12, tokenizer=tok)
    assert free.text == "".join(chr(97 + t % 26) for t in free.token_ids)
    stop = free.text[4:7]
    cut = free.text.find(stop)
    streamed = []
    (res,) = engine.generate(
        [prompt],
        max_new_tokens=12,
        tokenizer=tok,
        stop_strings=[stop],
        on_token=lambda r, t, lp, d: streamed.append(d),
    )
    assert (res.finish_reason, res.stop, res.text) == ("stop", stop, free.text[:cut])
    assert res.token_ids == free.token_ids[: cut + len(stop)]
    assert "".join(streamed) == res.text
