"""scripts/gpu_perf.py runs end to end on CPU (--smoke), so the prepared GPU run cannot rot
before a GPU session: the train phase (base row and the fused-loss lever, in its own process),
the torch peer (train and generate), a serve phase with no budget left (every row recorded as
skipped), the ratios and the JSON's fields."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_perf.py"


@pytest.mark.slow
def test_gpu_perf_smoke(tmp_path):
    out = tmp_path / "gpu_perf.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--levers", "base,loss"]
    cmd += ["--rows", "2", "--budget-s", "train=600,peer=600,serve=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["smoke"]
    env = result["env"]
    assert env["backend"] == "cpu" and env["jax"] and env["peak_bf16_flops"] is None

    train = result["phases"]["train"]
    assert [r["label"] for r in train["rows"]] == ["1.8b-L2-T64 base", "1.8b-L2-T64 loss=fused"]
    for r in train["rows"]:
        assert r["status"] == "ok", r
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["model_tflops"] > 0
        assert r["mfu"] is None  # no published CPU peak: no made-up MFU
        assert r["layers"] == 2 and r["batch"] * r["seq"] == 256 and r["remat"] == "full"
    assert train["rows"][1]["loss"] == pytest.approx(train["rows"][0]["loss"], abs=1e-3)
    (lever,) = result["ratios"]["levers"]
    assert lever["lever"] == "loss" and lever["speedup"] > 0

    peer = result["phases"]["peer"]["rows"]
    assert {(r["kind"], r["status"]) for r in peer} == {("train", "ok"), ("serve", "ok")}
    assert all(r["tokens_per_s"] > 0 for r in peer if r["kind"] == "train")
    assert all(r["decode_tokens_per_s"] > 0 for r in peer if r["kind"] == "serve")
    (vs,) = result["ratios"]["train_vs_peer"]  # only the shape our train phase ran
    assert vs["shape"] == ["1.8b", 2, 64] and vs["base_ratio"] > 0 and vs["best_ratio"] > 0

    serve = result["phases"]["serve"]
    assert serve["rows"] and all(r["status"] == "skipped: budget" for r in serve["rows"])
    assert result["ratios"]["decode_vs_peer"] == []
