"""Pallas kernels, installed as `qwen_jax.kernels` (never the top-level name `kernels`).

Each module is a triple: the Pallas kernel body, a wrapper taking `interpret=`, and a pure-jnp
`*_reference`. Kernels are single-device; callers wrap them in `jax.shard_map`.
"""
