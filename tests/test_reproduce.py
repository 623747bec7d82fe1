"""`qwen-jax reproduce`: the chain base -> Code-Qwen -> Code-Qwen-Chat, base -> Math-Qwen-Chat at a
test-sized setting runs end to end from the demo assets (results table with every model x
metric, a valid loss plot per stage); a second run skips every finished stage and evaluation;
a DIR holding another chain's chain.json, or files the chain does not write, is refused with
nothing changed; a stage whose init_from is missing fails with one clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qwen_jax import cli, reproduce
from qwen_jax.reproduce import METRICS, MODELS, STAGES, ChainError, Settings

# tiny.py's :runlocal model (d=64, 2 layers) on 64-token rows; 3 items per benchmark.
TEST = Settings(
    "test",
    base_steps=8,
    stage_steps=4,
    model=(
        ("hidden_size", 64),
        ("num_layers", 2),
        ("ffn_size", 176),
        ("num_heads", 4),
        ("num_kv_heads", 4),
        ("head_dim", 16),
    ),
    seq_len=64,
    eval_limit=3,
    eval_batch=4,
    entropy_batches=0,
)
PNG = b"\x89PNG\r\n\x1a\n"


def _with_assets(root: Path, demo_assets) -> Path:
    """A chain DIR already holding the demo corpus and vocabulary (the base reuses them)."""
    data_dir, spm = demo_assets
    shutil.copytree(data_dir, root / "data")
    shutil.copytree(Path(spm).parent, root / "tokenizer")
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root -> (mtime_ns, sha256): what "nothing changed" compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (
                p.stat().st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


@pytest.fixture(scope="module")
def chain(demo_assets, tmp_path_factory):
    """(DIR, results, stdout) of the test-sized chain, run once for the module."""
    out = _with_assets(tmp_path_factory.mktemp("chain"), demo_assets)
    results = reproduce.run_chain(out, TEST)
    return out, results


@pytest.mark.slow
def test_chain_writes_every_model_and_metric_and_the_plots(chain):
    out, results = chain
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert set(results["models"]) == set(MODELS)
    for model, row in results["models"].items():
        assert set(row) == set(METRICS), model
        for bench, score in row.items():
            assert isinstance(score, float), (model, bench, score)
    # Each variant carries its delta over the base on (only) its own domain's benchmarks.
    for stage in STAGES:
        own = {col for col, (_, _, domain) in METRICS.items() if domain == stage.domain}
        assert set(results["deltas"][stage.name]) == own, stage.name
        for b in own:
            want = results["models"][stage.name][b] - results["models"]["base"][b]
            assert results["deltas"][stage.name][b] == pytest.approx(want, abs=1e-4)
    table = (out / "results.md").read_text()
    for model in MODELS:
        assert f"| {model} |" in table
    for col in METRICS:
        assert col in table
    for model in MODELS:
        png = out / "plots" / f"{model}_loss.png"
        assert png.read_bytes()[:8] == PNG, png
        assert png.stat().st_size > 2000, png  # axes, two curves: not an empty canvas
    chain_json = json.loads((out / "chain.json").read_text())
    assert [s["name"] for s in chain_json["identity"]["stages"]] == list(MODELS)
    assert set(chain_json["finished"]) == set(MODELS)


@pytest.mark.slow
def test_a_second_run_skips_every_finished_stage(chain, capsys):
    out, results = chain
    capsys.readouterr()
    before = _snapshot(out)
    again = reproduce.run_chain(out, TEST)
    log = capsys.readouterr().out
    assert again == results
    for model in MODELS:
        assert f"{model}: finished" in log and f"{model}: evaluated, skipped" in log, log
    after = _snapshot(out)
    # Exports, training runs and per-sample eval records are untouched (the tables and plots
    # are rewritten from them, to the same results).
    kept = [k for k in before if not k.startswith(("plots/", "results.", "chain.json"))]
    assert kept and all(after[k] == before[k] for k in kept)


def test_another_chains_directory_is_refused_with_nothing_changed(chain, tmp_path, capsys):
    out, _ = chain
    other = tmp_path / "other"
    other.mkdir()
    record = json.loads((out / "chain.json").read_text())
    record["identity"]["stages"][1]["config_hash"] = "0" * 16  # another chain's code_qwen
    (other / "chain.json").write_text(json.dumps(record))
    (other / "results.md").write_text("their results\n")
    before = _snapshot(other)
    with pytest.raises(ChainError, match="another chain"):
        reproduce.run_chain(other, TEST)
    assert _snapshot(other) == before
    # The same through the CLI: one error line, exit 1, nothing written.
    code = cli.main(["reproduce", "--out", str(other), "--quick"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1 and "another chain" in err, err
    assert _snapshot(other) == before


@pytest.mark.parametrize(
    "files, message",
    [
        ({"notes.txt": "mine"}, "does not write"),
        ({"results.json": "{}"}, "no chain.json"),
        ({"chain.json": '{"format": "something-else"}'}, "not a qwen-jax-reproduce"),
    ],
)
def test_unrelated_files_are_refused_with_nothing_changed(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path)
    with pytest.raises(ChainError, match=message):
        reproduce.run_chain(tmp_path, TEST)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)


def test_a_stage_whose_init_from_is_missing_fails_clearly(tmp_path):
    stage = next(s for s in STAGES if s.name == "code_qwen_chat")
    config = reproduce.stage_config(stage, tmp_path, TEST)
    assert config.init_from == str(tmp_path / "code_qwen")
    with pytest.raises(ChainError, match=r"code_qwen_chat: its init_from .*code_qwen.* missing"):
        reproduce.train_stage(stage, tmp_path, config)
    assert list(tmp_path.iterdir()) == []


def test_unknown_force_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ChainError, match="no such stage"):
        reproduce.run_chain(tmp_path / "new", TEST, force=("coder",))
    assert not (tmp_path / "new").exists()


def test_full_settings_change_only_the_math_stage(tmp_path):
    """FULL's stage_changes reach the math stage's config (batch, dropout, schedule length) and
    no other stage's."""
    configs = {s.name: reproduce.stage_config(s, tmp_path, reproduce.FULL) for s in STAGES}
    math = configs["math_qwen_chat"]
    assert (math.data.global_batch, dict(math.model_overrides)["dropout"]) == (32, 0.0)
    assert math.run.steps == math.optim.total_steps == 600
    assert math.run.eval_every == 300
    for name in ("code_qwen", "code_qwen_chat"):
        c = configs[name]
        assert c.run.steps == c.optim.total_steps == 300
        assert c.data.global_batch == 8
