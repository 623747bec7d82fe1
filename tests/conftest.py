"""Test-wide setup: CPU only, 8 fake devices for sharding tests, quiet libtpu/TensorFlow.

These must be set before jax is imported anywhere, hence module level here.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """(data_dir, spm model): the demo corpus and a 1024-piece vocab, built once per session."""
    from qwen_jax.testing.demo_assets import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo_assets"))


@pytest.fixture(scope="module")
def xla_cache_dir(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache folder for one test module, for
    qwen_jax.testing.compile_cache.persistent_compile_cache: the module's repeated runs (and the
    trainer subprocesses it starts) load the step its first run compiled.

    One folder per module, not one per test run: a folder shared by both xdist workers had
    processes of two modules writing and reading the same entries at once, and the fresh-clone
    suite then failed bit-identical-resume tests that pass with a folder of their own.
    Not set process-wide (JAX_COMPILATION_CACHE_DIR for every test) on purpose: JAX decides once
    per process whether to use the cache, for every backend after, so the TPU AOT tests would
    write their executables too, and every small test program would be written."""
    return tmp_path_factory.mktemp("xla_cache")
