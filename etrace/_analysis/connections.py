"""How hidden groups connect within one step: which groups' previous and new
states each unit's input depends on, which weight operations read a new hidden
value, and which groups feed which."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import _interpret
from .._graph import Group, Unit
from .classify import Classified
from .plan import Regions
from .trace import TracedStep


@dataclasses.dataclass(frozen=True, eq=False)
class Connections:
    """**Attributes:**

    - `x_deps`: per unit name, bitmasks over groups of the previous and the new
        states its weight operation's input depends on (how temporal layers
        connect; read by the exactness rules).
    - `reads_new`: per weight operation whose input depends on a new hidden value
        of this step, the positions of those inputs.
    - `downstream`, `outputs`: `Graph.downstream` and `Graph.outputs`.
    """

    x_deps: dict[str, tuple[int, int]]
    reads_new: dict[int, tuple[int, ...]]
    downstream: dict[str, tuple[str, ...]]
    outputs: dict[str, tuple[int, ...]]


def _leaf_bits(step, program, groups, regs: Regions):
    """Per variable, bitmasks over groups of the previous states it depends on;
    and over every hidden leaf (in group order) of the new hidden values it
    depends on: `new_leaf` transitively, through other groups' updates;
    `leaf_bit` as readers outside the tail see it (a hooked new state stands for
    itself only)."""
    state_bit: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for j in g.leaves:
            v = step.state_vars[j]
            state_bit[v] = state_bit.get(v, 0) | 1 << gi
    flat = [(gi, j) for gi, g in enumerate(groups) for j in g.leaves]
    sink_bit: dict[int, int] = {}
    new_state = program.outvars[step.n_y :]
    for b, (gi, j) in enumerate(flat):
        v = new_state[j]
        if isinstance(v, int) and regs.group_of_sink(v) == gi:
            sink_bit[v] = sink_bit.get(v, 0) | 1 << b
    everything = range(len(program.eqns))
    prev = _interpret.union_bits(program, everything, state_bit)
    new_leaf = _interpret.union_bits(program, everything, sink_bit)
    leaf_bit = _interpret.union_bits(program, everything, sink_bit, pinned=sink_bit)
    return prev, new_leaf, leaf_bit, flat


def connections(
    step: TracedStep,
    classified: Classified,
    regs: Regions,
    groups: tuple[Group, ...],
    units: tuple[Unit, ...],
) -> Connections:
    program = classified.program
    prev, new_leaf, leaf_bit, flat = _leaf_bits(step, program, groups, regs)

    def groups_of(bits: int) -> int:
        out = 0
        for b, (gi, _) in enumerate(flat):
            if bits >> b & 1:
                out |= 1 << gi
        return out

    def bits_of(x: Any, table: dict[int, int]) -> int:
        return table.get(x, 0) if isinstance(x, int) else 0

    x_deps = {}
    for u in units:
        p = n = 0
        for x in u.site.inputs:
            p |= bits_of(x, prev)
            n |= bits_of(x, new_leaf)
        x_deps[u.name] = (p, groups_of(n))
    # Every weight op (cut or not) whose input depends on a new hidden value.
    reads_new: dict[int, tuple[int, ...]] = {}
    for i, w in classified.cuts.items():
        pos = tuple(
            k
            for k, a in enumerate(program.eqns[i].ins)
            if k != w and bits_of(a, new_leaf)
        )
        if pos:
            reads_new[i] = pos
    downstream: dict[str, list[str]] = {g.name: [] for g in groups}
    for u in units:
        bits = 0
        for x in u.site.inputs:
            bits |= bits_of(x, leaf_bit)
        for b, (gi, _) in enumerate(flat):
            mine = downstream[groups[gi].name]
            if bits >> b & 1 and groups[gi] is not u.group and u.group.name not in mine:
                mine.append(u.group.name)
    read = 0
    for i, ks in reads_new.items():
        for k in ks:
            read |= bits_of(program.eqns[i].ins[k], leaf_bit)
    outputs: dict[str, list[int]] = {g.name: [] for g in groups}
    for b, (gi, k) in enumerate(
        (gi, k) for gi, g in enumerate(groups) for k in range(g.k)
    ):
        if read >> b & 1:
            outputs[groups[gi].name].append(k)
    return Connections(
        x_deps=x_deps,
        reads_new=reads_new,
        downstream={k: tuple(v) for k, v in downstream.items()},
        outputs={k: tuple(v) for k, v in outputs.items()},
    )
