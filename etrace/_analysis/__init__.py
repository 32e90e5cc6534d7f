"""The compiler: trace a model's step once and analyse it for online learning.

The steps, each a function returning a frozen record:

1. `trace`: the step `(params, state, x) -> (y, state')` as a flat program.
2. `classify`: rewrites that move parameters where they can be traced; what each
   value depends on (parameters only, or the state and input); the weight
   operations whose output is cut.
3. `find_tail`, `locality`: the recurrent update behind the new state, checked
   neuron-local; the hidden groups.
4. `find_sites`: where parameters enter the update, and the units (site, group).
5. `regions`, `with_coupling`, `with_same_df`, `connections`: each group's
   update, the structure of its diagonal Jacobian, units that share `Df`, and how
   groups connect.
6. `plan`, `roles`: which version of each value every reader sees, the order of
   evaluation with the gradient hooks, and each parameter's role.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from .. import _ir
from .._errors import EtraceWarning
from .._graph import Graph
from .classify import Classified, classify
from .compiled import Compiled, Joint
from .connections import connections
from .dependency import dependency_pattern
from .holomorphic import check_holomorphic as check_holomorphic
from .locality import find_tail, locality
from .model import (
    initial_state as initial_state,
    keystr as keystr,
    Leaf as Leaf,
    skeleton,
    split_model as split_model,
)
from .plan import Mode as Mode, plan, Regions, regions, roles
from .sites import find_sites, with_coupling, with_same_df
from .trace import trace as trace, TracedStep


def _joint(classified: Classified, regs: Regions, n_dyn: int) -> Joint:
    upstream = regs.upstream_all
    param_only = frozenset(v for v in classified.pmask if v not in classified.dyn)
    bits = 0
    for i in upstream:
        e = classified.program.eqns[i]
        if any(o in classified.dyn for o in e.outs):
            for a in e.ins:
                if isinstance(a, int) and a in param_only:
                    bits |= classified.pmask[a]
    return Joint(upstream, param_only, tuple(i for i in range(n_dyn) if bits >> i & 1))


class _LazyPattern:
    """`Graph.pattern`: the structural Jacobian pattern, computed on first use."""

    def __init__(self, step: TracedStep, program: _ir.Program, joint: Joint, groups):
        self.args = (step, program, joint, groups)
        self.cache: dict[bool, Any] = {}

    def __call__(self, as_sparse: bool = False):
        if True not in self.cache:
            # First use may come while tracing a step: evaluate constants eagerly.
            with jax.ensure_compile_time_eval():
                self.cache[True] = dependency_pattern(*self.args)
        if as_sparse not in self.cache:
            J, immediate = self.cache[True]
            layout = self.args[0].layout
            shapes = dict(zip(layout.paths, (tuple(a.shape) for a in layout.avals)))
            self.cache[False] = (
                J.toarray(),
                {
                    path: m.toarray().reshape((J.shape[0],) + shapes[path])
                    for path, m in immediate.items()
                },
            )
        return self.cache[as_sparse]


def _direct_sites(program, sites, joint: Joint, layout) -> dict[str, str]:
    """`Graph.direct_sites`: the parameters that enter the hidden state only as the
    unchanged weight of one site, or as one element-wise site's value itself."""
    out = {}
    for i in joint.params:
        v = program.invars[i]
        mine = [s for s in sites if i in s.params]
        if len(mine) != 1 or mine[0].params != (i,):
            continue
        site = mine[0]
        if site.kind == "elementwise":
            direct = site.out == v
        else:
            readers = {k for k in joint.upstream if v in program.eqns[k].ins}
            direct = site.weight == v and readers == {site.eqn}
            direct = direct and site.pattern is None
        if direct:
            out[layout.paths[i]] = site.name
    return out


def _graph(step, classified, local, found, regs, joint, links) -> Graph:
    layout = step.layout
    groups = local.groups
    return Graph(
        groups=groups,
        units=found.units,
        hidden_size=sum(g.n * g.parts for g in groups),
        params=tuple(
            (layout.paths[i], tuple(layout.avals[i].shape), layout.avals[i].dtype)
            for i in joint.params
        ),
        pattern=_LazyPattern(step, classified.program, joint, groups),
        downstream=links.downstream,
        outputs=links.outputs,
        paths=layout.paths,
        direct_sites=_direct_sites(classified.program, found.sites, joint, layout),
    )


def warn_one_step(compiled: Compiled) -> None:
    """Warns about parameters that per-group algorithms learn one-step."""
    paths = compiled.layout.paths
    one_step = [paths[i] for i, (r, _) in enumerate(compiled.roles) if r == "one-step*"]
    if one_step:
        warnings.warn(
            "These parameters reach the hidden state only through another weight "
            f"op, so they are learned with a one-step gradient: {one_step}. "
            "See `learner.summary()`.",
            EtraceWarning,
            stacklevel=3,
        )


def analyse(model: Any, sample_input: Any, state: Any) -> Compiled:
    """Traces one step of `model` and analyses it (see the module docstring)."""
    step = trace(model, sample_input, state)
    classified = classify(step)
    program = classified.program
    step = step._replace(program=program)
    tail = find_tail(step, classified)
    local = locality(step, classified, tail)
    found = find_sites(model, step, classified, tail, local)
    regs = regions(step, classified, local.groups)
    groups, units = with_coupling(
        program,
        local.groups,
        found.units,
        regs.group_tail,
        regs.sinks,
        step.state_vars,
    )
    units = with_same_df(program, groups, units, regs.group_tail)
    local = dataclasses.replace(local, groups=groups)
    found = dataclasses.replace(found, units=units)
    links = connections(step, classified, regs, groups, units)
    joint = _joint(classified, regs, step.n_dyn)
    return Compiled(
        step=step,
        graph=_graph(step, classified, local, found, regs, joint, links),
        sites=found,
        regions=regs,
        plan=plan(step, classified, found, regs, groups, units),
        connections=links,
        joint=joint,
        roles=roles(step, classified, found.cut_sites, regs, found.sites),
        skeleton=skeleton(step.layout),
    )
