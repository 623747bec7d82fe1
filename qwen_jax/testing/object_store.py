"""gs:// offline, for tests: an in-memory object store behind etils.epath.

No bucket is reachable from a test, so the store is TensorFlow's in-memory `ram://` filesystem
routed through etils.epath (which knows gs://, s3://, az://, hf:// only) and made to behave like
an object store: no append, no directory rename (GCS has neither). gs://B/X is served from
ram://gcs/B/X, so the code under test sees real gs:// paths. Orbax cannot write or read ram://
(its arrays go through TensorStore's own drivers, never gfile): a test that checkpoints keeps
the Orbax directories local by patching `qwen_jax.train.checkpointing._orbax_directory`.
"""

from __future__ import annotations

import contextlib

import pytest


def _object_store_backend():
    """epath's TensorFlow backend on ram://, refusing what an object store cannot do."""
    from etils.epath import backend

    class ObjectStore(backend._TfBackend):
        def open(self, path, mode):
            if "a" in mode:
                raise OSError(f"object store: cannot append to {path}")
            return super().open(path, mode)

        def rename(self, path, dst):
            if self.isdir(path):
                raise OSError(f"object store: cannot rename directory {path}")
            super().rename(path, dst)

        def replace(self, path, dst):
            if self.isdir(path):
                raise OSError(f"object store: cannot rename directory {path}")
            super().replace(path, dst)

    return ObjectStore()


class _Rewrite:
    """A backend whose path arguments are rewritten from one prefix to another."""

    def __init__(self, inner, old: str, new: str):
        self.inner, self.old, self.new = inner, old, new

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            args = [a.replace(self.old, self.new, 1) if isinstance(a, str) else a for a in args]
            return method(*args, **kwargs)

        return call


@contextlib.contextmanager
def object_store():
    """Route ram:// and gs:// through epath to the in-memory store while the block runs;
    yields tf.io.gfile to write and inspect it (gs://B/X is ram://gcs/B/X there)."""
    import tensorflow as tf
    from etils.epath import gpath, register

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpath, "_URI_PREFIXES", (*gpath._URI_PREFIXES, "ram://"))
        mp.setattr(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"})
        mp.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
        mp.setitem(register._URI_PREFIXES_TO_CLS, "ram://", gpath.PosixGPath)
        backend = _object_store_backend()
        gs = _Rewrite(backend, "gs://", "ram://gcs/")
        original = gpath._GPath._backend

        # epath picks its TensorFlow backend for any URI when TF is installed: route ram:// and
        # gs:// to the object store instead.
        def routed(self):
            return {"ram": backend, "gs": gs}.get(self._uri_scheme) or original.fget(self)

        mp.setattr(gpath._GPath, "_backend", property(routed))
        yield tf.io.gfile
