"""Running a block of code, or a test, in float64."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Enables `jax_enable_x64` for the duration of a `with` block.

    Exactness checks agree to 1e-9 relative only in float64. Create the model and data
    inside the block (or cast them with `etrace.testing.f64`); the previous setting is
    restored when the block ends.

    !!! Example

        ```python
        with etrace.testing.float64():
            xs = jax.random.normal(jax.random.key(0), (10, 3))  # float64
        ```
    """
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


try:
    import pytest
except ImportError:  # pytest is only needed for the fixture
    pytest = None


def _x64(request):
    """A pytest fixture that runs the test in float64."""
    # Not a generator: runtime type-checking hooks wrap fixtures in plain functions,
    # which would hand the test the generator instead of running it.
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    request.addfinalizer(lambda: jax.config.update("jax_enable_x64", old))


x64 = _x64 if pytest is None else pytest.fixture(name="x64")(_x64)
"""A pytest fixture that runs a test in float64 (`jax_enable_x64` on for the test,
restored after it).

Import it where pytest finds fixtures, `from etrace.testing import x64` in a
`conftest.py` or in the test module, then request it per module
(`pytestmark = pytest.mark.usefixtures("x64")`), per test
(`@pytest.mark.usefixtures("x64")`) or as an argument (`def test_f(x64): ...`).
Create the model and data inside the test, where float64 is on.
"""
