"""Turned storage of a dense D-RTRL trace: `(B, C, Fw, Fx)` instead of canonical
`(B, Fw, Fx, C)`, for a weight with few inputs (`_kernels.turns`)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ..._graph import Unit


def turned_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A turned trace's shape: `(B, Fw, Fx, C)` to `(B, C, Fw, Fx)`."""
    b, w, f, c = shape
    return (b, c, w, f)


def is_turned(unit: Unit, trace: Any) -> bool:
    """Whether `trace` (one unit's tuple, any leading axes) is stored turned."""
    shape = turned_shape(unit.shape)
    return shape != tuple(unit.shape) and any(
        eps is not None and tuple(eps.shape[-4:]) == shape for eps in trace
    )


def stored_turned(unit: Unit, trace: Any) -> bool:
    """`is_turned` for a trace of any structure: `False` unless it is a D-RTRL
    trace, a tuple of arrays (or shapes) and `None`s, stored turned."""
    if not isinstance(trace, tuple) or not all(
        eps is None or hasattr(eps, "shape") for eps in trace
    ):
        return False
    return is_turned(unit, trace)


def canonical(unit: Unit, trace: Any) -> Any:
    """`trace` in canonical layout `(..., B, Fw, Fx, C)`, whichever it is stored in."""
    if not is_turned(unit, trace):
        return trace
    return tuple(None if eps is None else jnp.moveaxis(eps, -3, -1) for eps in trace)


def lift(a: Any, turned: bool) -> Any:
    """A per-output factor `(..., B, Fw, Fx)` against the traces (with a unit `C`
    axis where the trace has it)."""
    return jnp.expand_dims(a, -3) if turned else a[..., None]
