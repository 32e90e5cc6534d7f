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


def _reached(program: Any, tail: list[int], sources: set[int]) -> set[int]:
    """The variables of the update `tail` (in program order) that depend on
    `sources`."""
    reached = set(sources)
    for i in tail:
        eqn = program.eqns[i]
        if any(isinstance(a, int) and a in reached for a in eqn.ins):
            reached.update(eqn.outs)
    return reached


def check_holomorphic(compiled: Compiled, algorithm: str) -> None:
    """Raises an `EtraceError` naming the equation where a complex group's update
    is not holomorphic in what its complex states read, or naming the real state
    through which a complex state would read back a real part of itself."""
    program = compiled.program
    for g, group in enumerate(compiled.graph.groups):
        if not _is_complex(group):
            continue
        tail = sorted(compiled.regions.group_tail[g])
        sinks = compiled.regions.sinks[g]
        complex_k = [
            k
            for k in range(group.k)
            if jnp.issubdtype(group.leaf_dtype(k), jnp.complexfloating)
        ]
        complex_sinks = {sinks[k] for k in complex_k if isinstance(sinks[k], int)}
        for i in tail:
            eqn = program.eqns[i]
            what = _what(eqn, program)
            if what is not None and _reached(program, tail, set(eqn.outs)) & (
                complex_sinks
            ):
                raise EtraceError(
                    _MESSAGE.format(
                        group=group.name,
                        culprit=describe(eqn),
                        what=what,
                        algorithm=algorithm,
                    )
                )
        _check_mixed(compiled, g, tail, complex_k, complex_sinks, algorithm)


_MIXED = (
    "In the hidden group `{group}` the complex state `{complex}` reads the previous "
    "value of the real state `{real}`, which itself reads a complex value (its real "
    "part, imaginary part or modulus). {algorithm} keeps one complex trace per state "
    "and takes a real state's real part only where it is read out, so this loop "
    "back into a complex state would be silently wrong. Keep the real states "
    "downstream of the complex ones (a complex recurrence read out through its real "
    "part), move the real state into a layer of its own (read through a weight), "
    "or use a whole-state algorithm: `etrace.RTRL()`, `etrace.SnAp(n)` or "
    "`etrace.UORO()`."
)


def _check_mixed(compiled, g, tail, complex_k, complex_sinks, algorithm) -> None:
    """A real state of a complex group keeps a complex trace whose real part is
    the true one. That is exact while no complex state reads it back, unless the
    real state reads nothing complex (its trace is then real)."""
    program = compiled.program
    group = compiled.graph.groups[g]
    sinks = compiled.regions.sinks[g]
    complex_vars = {
        v
        for i in tail
        for v in (*program.eqns[i].ins, *program.eqns[i].outs)
        if isinstance(v, int) and _is_complex(program.avals[v])
    }
    tainted = _reached(program, tail, complex_vars)
    for k in range(group.k):
        if k in complex_k or sinks[k] not in tainted:
            continue
        prev = compiled.state_vars[group.leaves[k]]
        read_by = _reached(program, tail, {prev}) & complex_sinks
        if read_by:
            first = next(c for c in complex_k if sinks[c] in read_by)
            raise EtraceError(
                _MIXED.format(
                    group=group.name,
                    complex=group.leaf_names[first],
                    real=group.leaf_names[k],
                    algorithm=algorithm,
                )
            )
