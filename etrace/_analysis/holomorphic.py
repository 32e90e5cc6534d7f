"""Per-group algorithms on complex hidden states need a holomorphic update.

They carry a complex hidden value's traces through one complex number per
Jacobian entry, `dh^t = D dh^{t-1}`, which is the derivative only where the update
is holomorphic in the complex values it reads (`lam * h + B x`). An update that
takes a real part, imaginary part, conjugate or modulus of such a value has no
complex derivative, and the traces would be silently wrong. Whole-state algorithms
follow the real and imaginary parts apart (`Graph.hidden_size`) and need nothing.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .._errors import EtraceError
from .compiled import Compiled
from .labels import describe


# Primitives without a complex derivative when an operand is complex.
_NOT_HOLOMORPHIC = frozenset({"real", "imag", "conj", "abs", "sign"})

_MESSAGE = (
    "The update of the complex hidden group `{group}` is not holomorphic: "
    "{culprit} takes {what} of a complex value between the previous state (or a "
    "weight output) and the new state. {algorithm} carries complex traces through "
    "the update's complex derivative, which this update does not have. Write the "
    "update holomorphically (as `lam * h + B @ x`, taking real parts only where "
    "the new state is read, e.g. in the read-out), or use a whole-state algorithm, "
    "which follows real and imaginary parts apart: `etrace.RTRL()`, "
    "`etrace.SnAp(n)` or `etrace.UORO()`."
)


def _is_complex(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.complexfloating)


def _what(eqn: Any, program: Any) -> str | None:
    """What a non-holomorphic equation takes of its complex operand, or `None`."""
    complex_in = any(
        isinstance(a, int) and _is_complex(program.avals[a]) for a in eqn.ins
    )
    if not complex_in:
        return None
    if eqn.name in _NOT_HOLOMORPHIC:
        return {"real": "the real part", "imag": "the imaginary part"}.get(
            eqn.name, f"the `{eqn.name}`"
        )
    if eqn.name == "convert_element_type" and not any(
        _is_complex(program.avals[o]) for o in eqn.outs
    ):
        return "a real conversion"
    return None


def check_holomorphic(compiled: Compiled, algorithm: str) -> None:
    """Raises an `EtraceError` naming the equation where a complex group's update
    is not holomorphic."""
    program = compiled.program
    for g, group in enumerate(compiled.graph.groups):
        if not _is_complex(group):
            continue
        for i in compiled.regions.group_tail[g]:
            eqn = program.eqns[i]
            what = _what(eqn, program)
            if what is not None:
                raise EtraceError(
                    _MESSAGE.format(
                        group=group.name,
                        culprit=describe(eqn),
                        what=what,
                        algorithm=algorithm,
                    )
                )
