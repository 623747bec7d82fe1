"""scripts/tpu_kernel_aot.py end to end at its smoke shapes on one chip (v5e): the JSON holds,
for the decode and int8 matmul kernels and their XLA paths, the compiler's memory figures, and
they agree with the bytes computed from the shapes (the compiled program's arguments are
exactly the op's inputs)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.tpu_aot

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tpu_kernel_aot.py"


def _script():
    spec = importlib.util.spec_from_file_location("tpu_kernel_aot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("libtpu")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    rc = _script().main(
        [
            "--chips",
            "v5e",
            "--preset",
            "smoke",
            "--kernels",
            "decode,int8_matmul",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def _expected_bytes(rec):
    """(bytes of each input, output bytes) from the recorded dims, computed independently of
    the script."""
    d = rec["dims"]
    if rec["kernel"] == "decode_attention":
        q = d["B"] * d["N"] * d["H"] * 2  # bf16
        kv = d["B"] * d["S"] * d["K"] * d["H"] * 2  # each of k and v, bf16
        return [q, kv, kv, d["B"] * 4, d["B"] * 4, 4], q  # lengths, starts [B], window ()
    return [d["M"] * d["K"] * 2, d["K"] * d["N"], d["N"] * 4], d["M"] * d["N"] * 2


def test_records_cover_both_kernels_and_paths(result):
    got = {(r["kernel"], r["impl"]) for r in result["records"]}
    assert got == {(k, i) for k in ("decode_attention", "int8_matmul") for i in ("pallas", "xla")}
    for rec in result["records"]:
        assert "error" not in rec, rec
        assert rec["chip"] == "v5e" and rec["device_kind"] == "TPU v5 lite"
        # The kernel path is a Mosaic custom call; the XLA path has none.
        assert (rec["tpu_custom_calls"] > 0) == (rec["impl"] == "pallas"), rec
        assert rec["compile_s"] > 0


def test_bytes_match_the_compiler(result):
    for rec in result["records"]:
        inputs, write = _expected_bytes(rec)
        mem = rec["memory"]
        assert (rec["hbm_read_bytes"], rec["hbm_write_bytes"]) == (sum(inputs), write), rec
        # The compiled program's arguments are the op's inputs, each buffer rounded up to its
        # tiled layout (a small 1-D array to one tile of at most 4 KiB: f32[384] takes 4 KiB).
        assert sum(inputs) <= mem["argument_bytes"] < sum(inputs) + 4096 * len(inputs), rec
        assert mem["output_bytes"] == write, rec
        assert mem["generated_code_bytes"] > 0 and mem["temp_bytes"] >= 0
        assert rec["roofline_us"] == pytest.approx((sum(inputs) + write) / 819e9 * 1e6, abs=1e-3)


def test_kernel_and_xla_take_the_same_arguments(result):
    by_case = {}
    for rec in result["records"]:
        by_case.setdefault(rec["case"], set()).add(rec["memory"]["argument_bytes"])
    assert len(by_case) == 2 and all(len(v) == 1 for v in by_case.values()), by_case


def test_layout_moves_are_read_from_the_optimized_hlo(result):
    script = _script()
    for rec in result["records"]:
        moves = rec["layout_moves"]
        assert rec["hbm_copy_bytes"] == sum(m["bytes"] for m in moves if not m["vmem"])
    # The parser on a hand-written entry computation: a relayout of the whole cache into HBM,
    # a prefetch into VMEM (S(1)), a bitcast (free) and a small pad under the threshold.
    hlo = """HloModule m
%fused (p: s32[]) -> s32[] {
  %copy.9 = bf16[64,64]{1,0} copy(%p)
}

ENTRY %main (k: bf16[8,2048,32,128]) -> bf16[8,2048,4096] {
  %k = bf16[8,2048,32,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %copy-start = (f32[1024,256]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%w)
  %bitcast.1 = bf16[8,2048,4096]{2,1,0:T(8,128)(2,1)} bitcast(%k)
  %pad.2 = bf16[32,256]{1,0:T(8,128)(2,1)} pad(%x, %c), padding=0_24x0_0
  ROOT %reshape.1 = bf16[8,2048,4096]{2,1,0:T(8,128)(2,1)} reshape(%k), backend_config={}
}
"""
    got = script.layout_moves(hlo, min_bytes=1 << 20)
    assert got == [
        dict(op="copy-start", name="copy-start", shape="f32[1024,256]", bytes=1 << 20, vmem=True),
        dict(
            op="reshape",
            name="reshape.1",
            shape="bf16[8,2048,4096]",
            bytes=8 * 2048 * 4096 * 2,
            vmem=False,
        ),
    ]


def test_unknown_chip_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        _script().main(["--chips", "v9x", "--out", "/dev/null"])
    assert e.value.code == 2
