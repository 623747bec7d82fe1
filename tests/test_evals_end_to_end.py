"""`qwen-jax eval run` end to end: a tiny model exported with its SentencePiece tokenizer, the
real benchmark files, a few items of each available benchmark (C-Eval is not obtainable
offline), base and chat protocols. Near-zero scores are expected; the run must complete, score
every item and write its table."""

import json

import pytest

from qwen_jax.checkpoint import save_params
from qwen_jax.cli import main as cli_main
from qwen_jax.evals.fetch import ensure_data
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.tokenizer import load_tokenizer
from tests.train_fixtures import demo_assets  # noqa: F401  (pytest fixture)

BENCHMARKS = "mmlu,gsm8k,math,humaneval,mbpp"


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["base", "chat"])
def test_eval_run_on_a_tiny_export(demo_assets, tmp_path, chat):  # noqa: F811
    _, spm = demo_assets
    vocab = -(-load_tokenizer(str(spm)).vocab_size // 128) * 128
    model = create_model(C.tiny(vocab_size=vocab, max_position_embeddings=4096), seed=0)
    save_params(model, tmp_path / "export", tokenizer_files=[spm])
    out = tmp_path / "results"
    args = [
        "eval",
        "run",
        "--checkpoint",
        str(tmp_path / "export"),
        "--benchmarks",
        BENCHMARKS,
        "--data-dir",
        str(ensure_data()),
        "--limit",
        "2",
        "--out",
        str(out),
    ]
    assert cli_main(args + (["--chat"] if chat else [])) == 0
    table = (out / "results.md").read_text()
    samples = sorted(out.glob("*.samples.jsonl"))
    assert len(samples) == 5
    for path in samples:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 2 and all("prompt" in r and "status" in r for r in rows), path.name
        assert path.name.split(".")[0] in table
