import jax
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


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
