"""The one exception type that etrace raises for user errors, its warning, and how
messages describe what the user passed."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


class EtraceError(ValueError):
    """Raised for every user error: the message names the parameter path, primitive
    or shape at fault and says what to do."""


class EtraceWarning(UserWarning):
    """Issued when a parameter is learned with a coarser gradient than its traces
    could give (for example a one-step gradient), so that the choice is visible."""


def _shape(a: Any) -> str:
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def describe(tree: Any) -> str:
    """A structure in words: `an array float32[4]`, `a list of 4 numbers`."""
    if isinstance(tree, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(tree, "dtype"):
        return f"an array {_shape(tree)}"
    if isinstance(tree, (bool, int, float, complex)):
        return f"a Python {type(tree).__name__} ({tree!r})"
    if isinstance(tree, (list, tuple)):
        kind = type(tree).__name__
        if tree and all(isinstance(v, (bool, int, float, complex)) for v in tree):
            return f"a {kind} of {len(tree)} numbers"
        parts = ", ".join(describe(v) for v in tree[:4])
        more = ", ..." if len(tree) > 4 else ""
        return f"a {kind} of {len(tree)} ({parts}{more})"
    if isinstance(tree, dict):
        return "a dict with keys " + ", ".join(repr(k) for k in list(tree)[:6])
    if tree is None:
        return "None"
    return f"a {type(tree).__name__} ({jtu.tree_structure(tree)})"
