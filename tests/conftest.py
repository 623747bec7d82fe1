"""Test-wide setup: CPU only, 8 fake devices for sharding tests, quiet libtpu/TensorFlow.

These must be set before jax is imported anywhere, hence module level here.
"""

import os

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
