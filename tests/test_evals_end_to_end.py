"""`qwen-jax eval run` end to end: a tiny model exported with its SentencePiece tokenizer, the
real benchmark files, a few items of each available benchmark (C-Eval is not obtainable
offline), base and chat protocols. Near-zero scores are expected; the run must complete, score
every item and write its table."""

import json

import pytest

from qwen_jax.checkpoint import save_params
from qwen_jax.cli import main as cli_main
from qwen_jax.evals.fetch import ensure_data
from qwen_jax.infer.engine import Engine
from qwen_jax.model import config as C
from qwen_jax.model.factory import create_model
from qwen_jax.tokenizer import load_tokenizer

BENCHMARKS = "mmlu,gsm8k,math,humaneval,mbpp"


def tiny_export(demo_assets, path):
    """A random tiny Qwen exported with the demo SentencePiece tokenizer (vocab padded to 128)."""
    _, spm = demo_assets
    vocab = -(-load_tokenizer(str(spm)).vocab_size // 128) * 128
    model = create_model(C.tiny(vocab_size=vocab, max_position_embeddings=4096), seed=0)
    save_params(model, path, tokenizer_files=[spm])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["base", "chat"])
def test_eval_run_on_a_tiny_export(demo_assets, tmp_path, chat):
    tiny_export(demo_assets, tmp_path / "export")
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


@pytest.mark.slow
def test_eval_run_takes_the_model_flags_of_generate(demo_assets, tmp_path, monkeypatch):
    """`eval run` loads the model like `generate` (here --dtype and --mesh) and its --batch-size
    reaches the engine: 10 prompts in one engine call, more than the adapter's default of 8."""
    export = tiny_export(demo_assets, tmp_path / "export")
    calls = []
    scores = Engine.next_token_logprobs

    def spy(engine, prompts):
        mesh = None if engine.mesh is None else dict(engine.mesh.shape)
        calls.append((len(prompts), str(engine.cfg.dtype), mesh))
        return scores(engine, prompts)

    monkeypatch.setattr(Engine, "next_token_logprobs", spy)
    args = ["eval", "run", "--checkpoint", str(export), "--benchmarks", "mmlu"]
    args += ["--data-dir", str(ensure_data()), "--limit", "10", "--out", str(tmp_path / "r")]
    args += ["--batch-size", "10", "--dtype", "bfloat16", "--mesh", "dp"]
    assert cli_main(args) == 0
    assert calls == [(10, "bfloat16", {"data": 8, "fsdp": 1, "tensor": 1})]
