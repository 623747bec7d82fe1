"""A persistent XLA compilation cache for one test module: what makes a module that builds the
same train step many times (a resume, each init_from source, each stage's second run) compile
it once.

`train()` builds its steps anew on each call, so jit's in-memory cache never hits across calls;
with a persistent cache the second build loads the executable (measured on the tiny runlocal
config: a second `train()` costs 7 CPU s instead of 33). An executable loaded from the cache is
the one XLA compiled for the same program, so results stay bit-identical, and jit's in-memory
caches (what the "compiles nothing" tests count) are not involved.

Use it in a module-scoped autouse fixture; it restores the process's previous cache setting on
exit, so other modules of the same pytest worker are unaffected:

    @pytest.fixture(scope="module", autouse=True)
    def _compile_cache(tmp_path_factory):
        with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
            yield
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
