"""TensorFlow is the input pipeline's engine only: hide accelerators from it (design.md §3:
tf.data must never take an accelerator, e.g. pre-allocate GPU memory JAX needs).

Data modules import `tf` from here so the hiding happens before TensorFlow touches a device.
"""

import tensorflow as tf

for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # devices already initialized / kind unknown
        pass

__all__ = ["tf"]
