import os


# The tests compile many small programs and run each a few times, where LLVM's
# optimisation of the compiled code costs more than it saves: without it the suite
# takes 220 s instead of 285 s on 2 CPU cores. XLA reads the flag when JAX first
# runs something, after this file is imported; a level the user sets is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
    """A compilation cache on disk for this run. The tests build the same small
    programs again and again (a layer's random initialisation, a family's step,
    in other tests and other modules); from the cache they load in milliseconds
    instead of compiling for a second. It starts empty (nothing carries over from
    an earlier run) and is each worker's own: JAX writes an entry without a lock
    unless the cache has a size limit, and with one it rescans the whole
    directory on every write."""
    path = tmp_path_factory.getbasetemp() / "compiled"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture
def key():
    return jax.random.key(5678)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after every test module. Each CPU executable
    holds memory mappings of its own, and a whole session of them would reach the
    kernel's per-process limit (`vm.max_map_count`), where XLA crashes."""
    yield
    jax.clear_caches()
