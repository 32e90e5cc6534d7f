"""The evaluation plan: for every equation outside the tail, which version of each
operand it reads (`Mode`), where each group's gradient hook goes in the order of
evaluation, and each parameter's role."""

from __future__ import annotations

import dataclasses
import enum
import heapq
import warnings

from .. import _ir
from .._errors import EtraceError, EtraceWarning
from .._graph import Group, Site, Unit
from . import labels as _labels
from .classify import Classified
from .locality import tail_of
from .sites import Sites
from .trace import TracedStep


class Mode(enum.Enum):
    """Which version of a value a reader outside the tail sees (see `_step`)."""

    PLAIN = "plain"  # the value as computed
    TAIL = "tail"  # as the update computed it: parameters under stop_gradient
    LIVE = "live"  # recomputed with live parameters: a one-step gradient
    HOOKED = "hooked"  # a new hidden value through its group's gradient hook


@dataclasses.dataclass(frozen=True, eq=False)
class Regions:
    """The parts of the step behind each hidden group's new state.

    **Attributes:**

    - `sinks`: per group, the new values of its state leaves.
    - `group_tail`: per group, the equations of its update (its tail).
    - `tail`: the equations of every group's update.
    - `upstream`: per group, every equation its new state depends on.
    """

    sinks: tuple[tuple[_ir.Operand, ...], ...]
    group_tail: tuple[tuple[int, ...], ...]
    tail: frozenset[int]
    upstream: tuple[frozenset[int], ...]

    @property
    def upstream_all(self) -> frozenset[int]:
        return frozenset().union(*self.upstream)

    def group_of_sink(self, v: _ir.Operand) -> int | None:
        for g, sinks in enumerate(self.sinks):
            if v in sinks:
                return g
        return None


def regions(step: TracedStep, classified: Classified, groups) -> Regions:
    program = classified.program
    new_state = program.outvars[step.n_y :]
    sinks = tuple(tuple(new_state[j] for j in g.leaves) for g in groups)
    group_tail, upstream = [], []
    for s in sinks:
        ints = [v for v in s if isinstance(v, int)]
        group_tail.append(tuple(sorted(tail_of(classified, ints)[0])))
        upstream.append(frozenset(_ir.everything(program, ints)))
    every = [v for s in sinks for v in s if isinstance(v, int)]
    tail = frozenset(tail_of(classified, every)[0])
    return Regions(sinks, tuple(group_tail), tail, tuple(upstream))


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """How `_step` evaluates the step.

    **Attributes:**

    - `order`: equations and hook nodes (`len(eqns) + g` for group `g`) in a
        valid order.
    - `modes`: per `(equation, operand position)` outside the tail, the version
        of the operand it reads (`Mode.PLAIN` where absent).
    - `out_modes`: the same for the step's outputs.
    - `one_step_reads`: the equations (described) that read a value from inside
        an update before it is stored as state.
    """

    order: tuple[int, ...]
    modes: dict[tuple[int, int], Mode]
    out_modes: tuple[Mode, ...]
    one_step_reads: tuple[str, ...]


class _Reader:
    """Decides the mode of each read from outside the tail."""

    def __init__(self, classified, sites: Sites, regs: Regions, groups, units):
        self.program = classified.program
        self.regs = regs
        self.site_of_out = sites.site_of_out
        self.sink_group = {
            v: g for g, s in enumerate(regs.sinks) for v in s if isinstance(v, int)
        }
        self.tail_vars = {o for i in regs.tail for o in self.program.eqns[i].outs}
        # The groups whose update computes each tail value (or consumes each site).
        self.owners: dict[int, set[int]] = {}
        for g, gt in enumerate(regs.group_tail):
            for i in gt:
                for o in self.program.eqns[i].outs:
                    self.owners.setdefault(o, set()).add(g)
        for u in units:
            self.owners.setdefault(u.site.out, set()).add(groups.index(u.group))
        self.one_step: list[str] = []

    def feeds_back(self, reader: int | None, v: int) -> bool:
        """Whether `reader` is upstream of the group(s) that computed `v`."""
        return reader is not None and any(
            reader in self.regs.upstream[g] for g in self.owners.get(v, ())
        )

    def mode(self, reader: int | None, v: _ir.Operand) -> Mode:
        # A reader upstream of the same group's new state (a recurrent weight's
        # input, a peephole) sees the value as the update computed it: paths back
        # into the group through weights are what the diagonal traces leave out.
        if not isinstance(v, int):
            return Mode.PLAIN
        if v in self.sink_group:
            return Mode.TAIL if self.feeds_back(reader, v) else Mode.HOOKED
        if v in self.tail_vars:
            if self.feeds_back(reader, v):
                return Mode.TAIL
            eqn = self.program.producer[v] if reader is None else reader
            self.one_step.append(_labels.describe(self.program.eqns[eqn]))
            return Mode.LIVE
        site = self.site_of_out.get(v)
        if site is not None and site.kind == "matrix":
            return Mode.TAIL if self.feeds_back(reader, v) else Mode.LIVE
        return Mode.PLAIN


def _schedule(program, regs: Regions, modes, graph_units, groups) -> tuple[int, ...]:
    """A topological order of equations and hook nodes (`len(eqns) + g`)."""
    n = len(program.eqns)
    deps: dict[int, set[int]] = {}
    for i, e in enumerate(program.eqns):
        deps[i] = {program.producer[a] for a in e.ins if a in program.producer}
    for (reader, pos), m in modes.items():
        if m is Mode.HOOKED:
            g = regs.group_of_sink(program.eqns[reader].ins[pos])
            assert g is not None
            deps[reader].add(n + g)
    for g, sinks in enumerate(regs.sinks):
        d = {program.producer[v] for v in sinks if v in program.producer}
        for u in graph_units:
            if u.group is groups[g]:
                s = u.site
                if s.eqn is not None:
                    d.add(s.eqn)
                elif s.out in program.producer:
                    d.add(program.producer[s.out])
        deps[n + g] = d
    users: dict[int, list[int]] = {k: [] for k in deps}
    indeg = {k: len(v) for k, v in deps.items()}
    for k, ds in deps.items():
        for d in ds:
            users[d].append(k)

    def prio(k: int) -> float:
        if k < n:
            return float(k)
        return max((float(d) for d in deps[k] if d < n), default=-1.0) + 0.5

    heap = [(prio(k), k) for k, c in indeg.items() if c == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, k = heapq.heappop(heap)
        order.append(k)
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (prio(u), u))
    if len(order) != len(deps):
        raise EtraceError(
            "A hidden group reads its own new state before that state is complete "
            "(through a weight op inside the same step), so etrace cannot place its "
            "gradient hook. Compute the new state before any layer reads it."
        )
    return tuple(order)


def plan(
    step: TracedStep,
    classified: Classified,
    sites: Sites,
    regs: Regions,
    groups: tuple[Group, ...],
    units: tuple[Unit, ...],
) -> Plan:
    program = classified.program
    reader = _Reader(classified, sites, regs, groups, units)
    modes: dict[tuple[int, int], Mode] = {}
    for i, e in enumerate(program.eqns):
        if i in regs.tail:
            continue
        for pos, v in enumerate(e.ins):
            if i in sites.cut_sites and pos == classified.cuts[i]:
                continue
            m = reader.mode(i, v)
            if m is not Mode.PLAIN:
                modes[(i, pos)] = m
    out_modes = tuple(reader.mode(None, v) for v in program.outvars[: step.n_y])
    order = _schedule(program, regs, modes, units, groups)
    one_step = tuple(sorted(set(reader.one_step)))
    if one_step:
        warnings.warn(
            "The output or a later layer reads a value computed inside the "
            "recurrent update before it is stored as state "
            f"({one_step[0]}); gradients through that read are "
            "one-step (they carry no history). Read the stored state instead to "
            "get traced gradients.",
            EtraceWarning,
            stacklevel=4,
        )
    return Plan(order, modes, out_modes, one_step)


def roles(
    step: TracedStep,
    classified: Classified,
    cut_sites: dict[int, Site],
    regs: Regions,
    sites: tuple[Site, ...],
) -> tuple[tuple[str, str], ...]:
    """Each parameter's role and the reason, for `summary()` and warnings."""
    program = classified.program
    any_upstream = regs.upstream_all
    out_vars = [v for v in program.outvars[: step.n_y] if isinstance(v, int)]
    to_out = _ir.everything(program, out_vars)
    traced_matrix: set[int] = set()
    traced_elem: set[int] = set()
    for s in sites:
        (traced_matrix if s.kind == "matrix" else traced_elem).update(s.params)
    one_step: set[int] = set()
    readout: set[int] = set()
    for i, e in enumerate(program.eqns):
        if not any(o in classified.dyn for o in e.outs):
            continue  # a computation on parameters alone
        for pos, a in enumerate(e.ins):
            if not isinstance(a, int) or a in classified.dyn:
                continue
            bits = classified.params_of(a)
            if not bits or i in regs.tail:
                continue
            if i in cut_sites and classified.cuts[i] == pos:
                continue
            if i in any_upstream:
                one_step.update(bits)
            elif i in to_out:
                readout.update(bits)
    out = []
    for k, is_p in enumerate(step.layout.is_param):
        if not is_p:
            out.append(("none", "not a parameter (non-float array or state init)"))
        elif k in traced_matrix:
            out.append(("matrix", "weight of a matrix op feeding a hidden group"))
        elif k in traced_elem:
            out.append(("elementwise", "enters the recurrent update element-wise"))
        elif k in one_step:
            out.append(
                (
                    "one-step*",
                    "reaches the hidden state only through another "
                    "weight op: learned with this step's gradient, no trace",
                )
            )
        elif k in readout:
            out.append(("one-step", "reaches no hidden state (readout)"))
        else:
            out.append(("none", "does not affect the output"))
    return tuple(out)
