"""qwen-jax: a JAX/Flax, TPU-native reproduction of the Qwen (v1) model family."""

__version__ = "0.1.0"
