"""The tail of the step and its neuron-locality: which hidden state leaves form
groups, and which neuron each element of the tail belongs to.

The *tail* is everything between the previous hidden state, the cut weight outputs
and the element-wise parameter values on one side, and the new hidden state on the
other. Every element of a hidden leaf and of a site output is a node; the label
domain (`labels`) joins the nodes that an equation of the tail combines, and each
connected component must then hold elements of at most one neuron position."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .. import _interpret, _ir
from .._errors import EtraceError
from .._graph import Group
from . import labels as _labels, weights
from .classify import Classified
from .trace import TracedStep


_NOT_LOCAL = """\
The recurrent update is not neuron-local: {culprit} makes {what}.
etrace's traces need every new hidden value to depend only on the same neuron's
previous values, its weight outputs and its element-wise parameters (the tail of the
step, after each weight op). A mean, normalisation, roll, sort or neuron-mixing
reshape between hidden states breaks this. Apply such an operation to the readout
instead, or put the mixing behind a weight (a matrix multiply), which etrace cuts."""

_CONTROL_FLOW = """\
Unsupported primitive {prim} in the recurrent update{uses}.
etrace cannot see through control flow between the previous and the new hidden
state, so it cannot trace {what}. Write the update without
`lax.cond`/`while_loop`/`scan` (use `jnp.where` to pick between branches, unroll a
short loop in Python), or compute that part outside the recurrent update (an input
encoder, the readout)."""

_UNTRACEABLE_WEIGHT = """\
etrace cannot trace parameter {names}: it enters the recurrent update through
{prim}, which is not a weight operator in a form etrace can trace: {why}.
Supported weight operators: products (`@`, `einsum`, `dot_general`), convolutions
with the parameter as the kernel (`feature_group_count` allowed,
`batch_group_count=1`), and look-ups of whole rows `W[index]` at input-dependent
indices. Rewrite that use in one of these forms, or move it out of the recurrent
update."""

_WHY_UNTRACEABLE = {
    "conv_general_dilated": "the parameter must be the kernel, with "
    "`batch_group_count=1`",
    "gather": "a look-up must take whole rows (every other dimension in full)",
    "dynamic_slice": "a slice must take whole rows at the dynamic index (size 1 "
    "there, everything else in full)",
    "dot_general": "both operands depend on parameters and the state",
}

_NON_STATIC = (
    "Unsupported primitive {prim} in the recurrent update: its indices depend on "
    "the state, so etrace cannot tell which neuron each element belongs to. Use "
    "static indices there."
)


class UnionFind:
    """Disjoint sets of integers; the root of a set is its smallest member."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Joins the sets of `a` and `b`; returns the root of the joined set."""
        ra, rb = self.find(a), self.find(b)
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        return lo


def _inexact(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def float_leaves(step: TracedStep) -> tuple[int, ...]:
    """The state leaves that can be hidden state: the inexact ones."""
    return tuple(j for j, a in enumerate(step.state_avals) if _inexact(a))


def tail_of(classified: Classified, roots: list[int]) -> tuple[set[int], set[int]]:
    """The equations behind the variables `roots` back to the previous state,
    the cut weight outputs and parameter-only values; and where the walk stopped."""
    program = classified.program

    def stop(v: int) -> bool:
        if classified.param_only(v) or v not in classified.dyn:
            return True
        p = program.producer.get(v)
        return p is None or p in classified.cuts

    return _ir.ancestors(program, roots, stop)


@dataclasses.dataclass(frozen=True, eq=False)
class Tail:
    """The tail behind every inexact new state leaf.

    **Attributes:**

    - `eqns`: its equations.
    - `site_outs`: the variables where it begins other than the state: cut weight
        outputs and parameter-only values, sorted.
    """

    eqns: frozenset[int]
    site_outs: tuple[int, ...]


def _param_list(bits: int, paths: tuple[str, ...]) -> str:
    return ", ".join(f"`{paths[k]}`" for k in range(len(paths)) if bits >> k & 1)


def _check_tail_eqn(classified: Classified, eqn: _ir.Eqn, paths) -> None:
    """Refuses an equation of the recurrent update that hides a parameter from the
    compiler (control flow, a weight operator out of canonical form)."""
    bits = 0
    for a in eqn.ins:
        if isinstance(a, int):
            bits |= classified.pmask.get(a, 0)
    if eqn.name in _interpret.CONTROL:
        names = _param_list(bits, paths)
        raise EtraceError(
            _CONTROL_FLOW.format(
                prim=_labels.describe(eqn),
                uses=f", which uses parameter(s) {names}" if names else "",
                what="the parameters used inside it" if names else "the state in it",
            )
        )
    if eqn.name in weights.WEIGHT_PRIMS:
        wbits = 0
        for a in eqn.ins:
            if classified.param_only(a):
                wbits |= classified.pmask.get(a, 0)
        if wbits:
            raise EtraceError(
                _UNTRACEABLE_WEIGHT.format(
                    names=_param_list(wbits, paths),
                    prim=_labels.describe(eqn),
                    why=_WHY_UNTRACEABLE[eqn.name],
                )
            )


def find_tail(step: TracedStep, classified: Classified) -> Tail:
    """The tail behind every inexact new state leaf; refuses what it cannot trace."""
    program = classified.program
    new_state = program.outvars[step.n_y :]
    roots = [new_state[j] for j in float_leaves(step)]
    eqns, stopped = tail_of(classified, [v for v in roots if isinstance(v, int)])
    for i in sorted(eqns):
        _check_tail_eqn(classified, program.eqns[i], step.layout.paths)
    site_outs = sorted(
        v
        for v in stopped
        if program.producer.get(v) in classified.cuts or classified.param_only(v)
    )
    return Tail(frozenset(eqns), tuple(site_outs))


@dataclasses.dataclass(frozen=True, eq=False)
class Locality:
    """The hidden groups, and where each site output's elements go.

    **Attributes:**

    - `groups`: the hidden groups, ordered by their first state leaf.
    - `site_nodes`: per site output variable, the node ids of its elements.
    - `comp`: per node, its connected component.
    - `comp_group`: per component, the index of the group it belongs to (-1: none).
    - `comp_idx`: per component, its neuron position.
    """

    groups: tuple[Group, ...]
    site_nodes: dict[int, np.ndarray]
    comp: np.ndarray
    comp_group: np.ndarray
    comp_idx: np.ndarray

    def feeds(self, v: int) -> np.ndarray:
        """The group index of each element of site output `v` (-1: none)."""
        return self.comp_group[self.comp[self.site_nodes[v]]]


class _Nodes:
    """Node ids: every element of each inexact state leaf, then of each site
    output; and, for the state leaves' nodes, their leaf and position."""

    def __init__(self, step: TracedStep, program: _ir.Program, tail: Tail):
        self.seeds: dict[int, np.ndarray] = {}
        self.site_nodes: dict[int, np.ndarray] = {}
        sizes = [int(np.prod(a.shape, dtype=int)) for a in step.state_avals]
        offset = 0
        leaf, idx = [], []
        for j in float_leaves(step):
            shape = step.state_avals[j].shape
            ids = offset + np.arange(sizes[j], dtype=np.int32)
            self.seeds[step.state_vars[j]] = ids.reshape(shape)
            leaf.append(np.full(sizes[j], j))
            idx.append(np.arange(sizes[j]))
            offset += sizes[j]
        self.n_hidden = offset
        for v in tail.site_outs:
            shape = program.avals[v].shape
            ids = offset + np.arange(int(np.prod(shape, dtype=int)), dtype=np.int32)
            self.seeds[v] = ids.reshape(shape)
            self.site_nodes[v] = ids
            offset += ids.size
        self.n = offset
        pad = np.full(offset - self.n_hidden, -1)
        self.leaf = np.concatenate(leaf + [pad]).astype(int)
        self.idx = np.concatenate(idx + [pad]).astype(int)


def _labelled(step: TracedStep, program: _ir.Program, tail: Tail, nodes: _Nodes):
    """Runs the label domain over the tail and joins each new state leaf's labels
    to its own nodes."""
    lab = _labels.Labels(program, nodes.seeds, nodes.n_hidden)
    try:
        lab.run(sorted(tail.eqns))
    except _labels.NonStatic as err:
        raise EtraceError(_NON_STATIC.format(prim=_labels.describe(err.eqn))) from None
    new_state = program.outvars[step.n_y :]
    for j in float_leaves(step):
        v = new_state[j]
        got = lab.get(v) if isinstance(v, int) else None
        if got is None:
            continue
        ids = nodes.seeds[step.state_vars[j]]
        ok = got >= 0
        lab.edges.append((got[ok].ravel(), ids[ok].ravel(), -(j + 1)))
    return lab


def _components(lab, n: int) -> np.ndarray:
    if lab.edges:
        a = np.concatenate([e[0] for e in lab.edges]).astype(np.int64)
        b = np.concatenate([e[1] for e in lab.edges]).astype(np.int64)
    else:
        a = b = np.zeros(0, np.int64)
    matrix = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(matrix, directed=False)[1]


def _culprit(step, program, lab, where: int, ia: int, ib: int) -> tuple[str, str]:
    """The equation that joined neurons `ia` and `ib`, and what it made."""
    if where >= 0:
        return (
            _labels.describe(program.eqns[where]),
            f"one element depend on neurons {ia} and {ib}",
        )
    j = -where - 1
    name = step.state_names[j]
    new = program.outvars[step.n_y + j]
    moved = lab.moved.get(new) if isinstance(new, int) else None
    culprit = (
        _labels.describe(program.eqns[moved])
        if moved is not None
        else f"the update of state `{name}`"
    )
    return culprit, (
        f"the new `{name}`[{ib}] depend on neuron {ia} of the previous hidden state"
    )


def _raise_conflict(step, program, lab, nodes: _Nodes, active: np.ndarray):
    """Replays the joins in order to name the equation that mixed two neurons."""
    sets = UnionFind()
    pos: dict[int, int] = {}

    def position(root: int) -> int | None:
        if root in pos:
            return pos[root]
        return int(nodes.idx[root]) if nodes.idx[root] >= 0 else None

    for a_arr, b_arr, where in lab.edges:
        for a, b in zip(a_arr.tolist(), b_arr.tolist()):
            ra, rb = sets.find(a), sets.find(b)
            if ra == rb:
                continue
            ia, ib = position(ra), position(rb)
            if ia is not None and ib is not None and ia != ib and active[a]:
                culprit, what = _culprit(step, program, lab, where, ia, ib)
                raise EtraceError(_NOT_LOCAL.format(culprit=culprit, what=what))
            merged = ia if ia is not None else ib
            root = sets.union(ra, rb)
            if merged is not None:
                pos[root] = merged
    raise EtraceError(
        _NOT_LOCAL.format(
            culprit="the recurrent update",
            what="elements of different neurons interact",
        )
    )


def _desc(a: Any) -> str:
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def _groups(step: TracedStep, leaf_sets: list[tuple[int, ...]]) -> tuple[Group, ...]:
    groups = []
    names, avals = step.state_names, step.state_avals
    for leaves in leaf_sets:
        shapes = tuple(avals[j].shape for j in leaves)
        sizes = {int(np.prod(s, dtype=int)) for s in shapes}
        dtypes = tuple(avals[j].dtype for j in leaves)
        # Real and complex states of one precision may share a group (a complex
        # recurrence and a real state reading its real part).
        precisions = {jnp.finfo(d).dtype for d in dtypes}
        if len(sizes) > 1 or len(precisions) > 1:
            desc = ", ".join(f"`{names[j]}` {_desc(avals[j])}" for j in leaves)
            raise EtraceError(
                f"The state leaves {desc} interact element-wise, so they form one "
                "hidden group, but they differ in size or precision. Give every "
                "state of a neuron the same shape and precision (one leaf per state "
                "kind; real and complex states of one precision may mix)."
            )
        groups.append(
            Group(
                name="+".join(names[j] for j in leaves),
                leaves=leaves,
                leaf_names=tuple(names[j] for j in leaves),
                shapes=shapes,
                n=sizes.pop(),
                k=len(leaves),
                dtype=jnp.result_type(*dtypes),
                dtypes=None if len(set(dtypes)) == 1 else dtypes,
            )
        )
    return tuple(groups)


def locality(step: TracedStep, classified: Classified, tail: Tail) -> Locality:
    """Checks that the tail is neuron-local and forms the hidden groups: state
    leaves whose elements share a component that a site output reaches."""
    program = classified.program
    nodes = _Nodes(step, program, tail)
    lab = _labelled(step, program, tail, nodes)
    comp = _components(lab, nodes.n)
    n_comp = comp.max() + 1 if nodes.n else 0
    active_comp = np.zeros(n_comp, bool)
    if nodes.n > nodes.n_hidden:
        active_comp[comp[nodes.n_hidden :]] = True
    active = active_comp[comp] if nodes.n else np.zeros(0, bool)
    hidden = np.arange(nodes.n_hidden)[active[: nodes.n_hidden]]
    if len(hidden):
        pairs = np.unique(np.stack([comp[hidden], nodes.idx[hidden]]), axis=1)
        if (np.bincount(pairs[0], minlength=n_comp) > 1).any():
            _raise_conflict(step, program, lab, nodes, active)
    # Groups: the leaves that share an active component.
    sets = UnionFind()
    first: dict[int, int] = {}
    for node in hidden:
        j = int(nodes.leaf[node])
        sets.find(j)
        first.setdefault(int(comp[node]), j)
        sets.union(first[int(comp[node])], j)
    members: dict[int, list[int]] = {}
    for j in sorted({int(nodes.leaf[n]) for n in hidden}):
        members.setdefault(sets.find(j), []).append(j)
    leaf_sets = [tuple(members[root]) for root in sorted(members)]
    groups = _groups(step, leaf_sets)
    leaf_group = {j: g for g, leaves in enumerate(leaf_sets) for j in leaves}
    comp_group = np.full(n_comp, -1)
    comp_idx = np.zeros(n_comp, np.int64)
    for node in hidden:
        comp_group[comp[node]] = leaf_group[int(nodes.leaf[node])]
        comp_idx[comp[node]] = nodes.idx[node]
    return Locality(groups, nodes.site_nodes, comp, comp_group, comp_idx)
