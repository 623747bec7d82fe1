"""scripts/gpu_check.py runs end to end on CPU (--interpret --small), so it cannot rot before a
GPU session: parity checks of every kernel, every timing row, the table and the JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--interpret", "--small", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["interpret"] and result["backend"] == "cpu"
    names = [c["name"] for c in result["checks"]]
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    for prefix in ("decode ", "matmul ", "int8_matmul ", "timings: time_matmul"):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    rows = {(r["group"], r["impl"]): r for r in result["timings"]}
    expected = [
        ("decode", "pallas"),
        ("decode", "xla reference"),
        ("matmul", "pallas"),
        ("matmul", "xla jnp.dot"),
        ("int8 matmul", "pallas"),
        ("int8 matmul", "xla dequant"),
        ("flash fwd", "xla"),
        ("flash fwd+bwd", "xla"),
    ]
    if importlib.util.find_spec("qwen_jax.kernels.flash_attention_gpu") is not None:
        expected += [("flash fwd", "pallas"), ("flash fwd+bwd", "pallas")]
        assert any(n.startswith("flash ") for n in names)
    for key in expected:
        assert key in rows and rows[key]["ms"] > 0 and rows[key]["tflops"] > 0, key
    assert rows[("flash fwd", "cudnn")].get("skipped")


def test_gpu_check_refuses_to_run_without_a_gpu(gpu_check, tmp_path, capsys):
    if jax.default_backend() == "gpu":
        pytest.skip("this host has a GPU: the real check would run")
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "no GPU" in capsys.readouterr().err
