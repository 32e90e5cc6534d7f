"""Which values of the step depend on parameters only and which on the state or
the input; the rewrites that move parameters to where they can be traced; and
the weight operations that are cut."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import _interpret, _ir
from . import rewrite, weights
from .model import ModelLayout
from .trace import TracedStep


@dataclasses.dataclass(frozen=True, eq=False)
class Classified:
    """The step's program after the rewrites, with what each value depends on.

    **Attributes:**

    - `program`: the rewritten program.
    - `pmask`: per variable, a bitmask of the parameters (model-array indices) it
        depends on.
    - `dyn`: the variables that depend on the state or the input.
    - `cuts`: per weight operation (equation index), the position of its weight.
    - `forms`: per weight operation, its canonical form.
    """

    program: _ir.Program
    pmask: dict[int, int]
    dyn: frozenset[int]
    cuts: dict[int, int]
    forms: dict[int, weights.Form]

    def param_only(self, v: _ir.Operand) -> bool:
        """Whether `v` is computed from parameters alone."""
        return isinstance(v, int) and v not in self.dyn and self.pmask.get(v, 0) != 0

    def dynamic(self, v: _ir.Operand) -> bool:
        """Whether `v` depends on the state or the input."""
        return isinstance(v, int) and v in self.dyn

    def params_of(self, v: int) -> tuple[int, ...]:
        """The indices of the parameters `v` depends on."""
        m = self.pmask.get(v, 0)
        return tuple(i for i in range(m.bit_length()) if m >> i & 1)


def dependencies(
    program: _ir.Program, layout: ModelLayout
) -> tuple[dict[int, int], frozenset[int]]:
    """Per variable, a bitmask of the parameters it depends on; and the set of
    variables that depend on the state or the input."""
    n_dyn = len(layout.paths)
    invars = program.invars
    # One bit per model array, and one more for the state and the input.
    dynamic = 1 << n_dyn
    seeds = {v: dynamic for v in invars[n_dyn:]}
    for i, is_p in enumerate(layout.is_param):
        if is_p:
            seeds[invars[i]] = 1 << i
    bits = _interpret.union_bits(program, range(len(program.eqns)), seeds)
    pmask = {v: m & (dynamic - 1) for v, m in bits.items() if m & (dynamic - 1)}
    return pmask, frozenset(v for v, m in bits.items() if m & dynamic)


def _rewritten(step: TracedStep) -> _ir.Program:
    """The program with shared parameters broadcast explicitly and products of
    parameter-only factors re-associated (`rewrite`), to a fixed point."""
    program = step.program
    pmask, dyn = dependencies(program, step.layout)

    def param_only(v: Any) -> bool:
        return isinstance(v, int) and v not in dyn and pmask.get(v, 0) != 0

    def dynamic(v: Any) -> bool:
        return isinstance(v, int) and v in dyn

    program = rewrite.broadcast_shared(program, param_only, dynamic)
    for _ in range(8):
        pmask, dyn = dependencies(program, step.layout)
        again = rewrite.reassociate(program, param_only, dynamic, len(step.state_avals))
        if again is program:
            break
        program = again
    return program


def classify(step: TracedStep) -> Classified:
    """Runs the rewrites, then marks dependencies and finds the weight operations:
    a weight operator (`weights`) with a parameter-only weight and a dynamic other
    operand, in a form etrace can trace."""
    program = _rewritten(step)
    pmask, dyn = dependencies(program, step.layout)
    base = Classified(program, pmask, dyn, {}, {})
    cuts: dict[int, int] = {}
    forms: dict[int, weights.Form] = {}
    for i, e in enumerate(program.eqns):
        w_pos = weights.weight_position(program, e, base.param_only, base.dynamic)
        if w_pos is not None:
            form = weights.form(program, e, w_pos)
            if form is not None:
                cuts[i], forms[i] = w_pos, form
    return dataclasses.replace(base, cuts=cuts, forms=forms)
