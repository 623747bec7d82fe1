"""Every full-size experiment compiles for its declared TPU slice (ahead of time, on this CPU).

The suite's variant (every pretraining file and two alignment stages) keeps the full width,
batch, sequence and mesh but scans 2 layers, at the fast optimisation level, so it proves the
sharded step lowers and compiles for the real topology in about a minute. `make compile-full`
runs the real depth at the default level and prints the HBM/FLOPs figures recorded in
WORKSPACE.md.
"""

from pathlib import Path

import pytest

from qwen_jax.testing.experiments import EXPERIMENTS
from qwen_jax.train.aot import compile_for_topology, topology_devices
from qwen_jax.train.config import TrainConfig, load_experiment

# Every pretraining file, and of the alignment stages the two whose state differs most from
# pretraining (LoRA: frozen base, adapter-only optimizer; DPO: pair batches and a reference
# copy); `make compile-full` compiles all of them at full depth.
ALIGNMENT = {"qwen_7b_chat_lora", "qwen_7b_chat_dpo"}
FULL_SIZE = [
    p
    for p in EXPERIMENTS
    if load_experiment(p).model.preset != "tiny"
    and (p.parent.name == "pretrain" or p.stem in ALIGNMENT)
]


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.stem)
def test_full_size_experiment_compiles_for_its_topology(path: Path):
    c = load_experiment(path)
    c.model.num_layers = 2
    config = TrainConfig.from_config_dict(c)
    report = compile_for_topology(config, config.tpu.topology, fast=True)
    assert not report.error, report.error
    assert report.fits, report.summary()
    assert report.flops_per_step > 0 and report.temp_bytes > 0


@pytest.mark.tpu_aot
def test_oversized_state_is_reported_as_not_fitting():
    c = load_experiment(Path(__file__).resolve().parent.parent / "experiments/pretrain/qwen_7b.py")
    c.model.num_layers = 2
    c.mesh.data, c.mesh.fsdp = -1, 1  # replicate a 7B-wide model on every 16 GiB v5e chip
    c.data.global_batch = 4
    c.tpu.topology = "v5e-4"
    c.model.vocab_size = 151_936 * 8  # 10 GiB of embeddings per chip, replicated: cannot fit
    config = TrainConfig.from_config_dict(c)
    report = compile_for_topology(config, config.tpu.topology, fast=True)
    assert not report.fits
    assert "RESOURCE_EXHAUSTED" in report.error or report.peak_bytes > report.hbm_per_device


def test_topology_names():
    gen, devices = topology_devices("v5e-4")
    assert gen == "v5e" and len(devices) == 4
    with pytest.raises(ValueError, match="unknown topology 'v7-8'"):
        topology_devices("v7-8")
