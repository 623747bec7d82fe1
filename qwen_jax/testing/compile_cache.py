"""A persistent XLA compilation cache for the tests: what makes a suite that builds the same
train step many times (a resume, each init_from source, each stage's second run, the tiny
experiment's step in several modules) compile it once.

`train()` builds its steps anew on each call, so jit's in-memory cache never hits across calls;
with a persistent cache the second build loads the executable (measured on the tiny runlocal
config: a second `train()` costs 7 CPU s instead of 33). An executable loaded from the cache is
the one XLA compiled for the same program, so results stay bit-identical, and jit's in-memory
caches (what the "compiles nothing" tests count) are not involved.

Use it in a module-scoped autouse fixture, on the run's one cache folder (tests/conftest.py's
`xla_cache_dir`, shared by the xdist workers); it restores the process's previous cache
setting on exit, so other modules of the same pytest worker are unaffected:

    @pytest.fixture(scope="module", autouse=True)
    def _compile_cache(xla_cache_dir):
        with persistent_compile_cache(xla_cache_dir):
            yield

Two processes may compile the same program at once: JAX writes an entry in place, so a reader
that meets a half-written one warns ("Error reading persistent compilation cache entry") and
compiles; results do not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


@contextlib.contextmanager
def persistent_compile_cache(path: Path) -> Iterator[dict[str, str]]:
    """Within: jit compilations are stored in and loaded from `path`. Yields the environment
    that points a trainer subprocess at the same cache (`subprocess.Popen(env={**os.environ,
    **env})`)."""
    previous = jax.config.jax_compilation_cache_dir
    compilation_cache.set_cache_dir(str(path))
    compilation_cache.reset_cache()  # the cache is set up once per process: set it up again
    try:
        yield {"JAX_COMPILATION_CACHE_DIR": str(path)}
    finally:
        compilation_cache.set_cache_dir(previous)
        compilation_cache.reset_cache()
