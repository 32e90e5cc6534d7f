"""The compiler: trace a model's step once and analyse it for online learning.

The step `(params, state, x) -> (y, state')` is traced to a jaxpr and flattened
(`_ir`). Then:

1. Every variable is marked by what it depends on: parameters only (*param-only*),
   or the state and input (*dynamic*).
2. *Cut ops*: a `dot_general` with one param-only operand `W` and one dynamic operand
   `x` is a matrix weight op; its output `y` becomes a free input of the rest.
3. The *tail* is everything between the previous hidden state, the cut outputs and the
   element-wise parameter values (param-only values read there) on one side, and the
   new hidden state on the other.
4. `_labels` checks that the tail is neuron-local, forms hidden groups and maps every
   site output to its neuron.
5. An evaluation plan says, for each equation, which version of each operand it reads
   (see `_runtime`), and where the gradient hooks go.
"""

from __future__ import annotations

import dataclasses
import heapq
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import _ir, _labels, _ops, _rewrite
from ._errors import EtraceError, EtraceWarning
from ._graph import Graph, Group, Site, Unit


_MISSING_STATE = """\
`etrace.compile` needs the model's initial hidden state, but `eqx.nn.State(model)`
failed: {err}
A model built with `eqx.nn.make_with_state` has had its initial state values removed
from the model. Pass the state it returned: `etrace.compile(model, x0, state=state)`."""

_NOT_LOCAL = """\
The recurrent update is not neuron-local: {culprit} makes {what}.
etrace's traces need every new hidden value to depend only on the same neuron's
previous values, its weight outputs and its element-wise parameters (the tail of the
step, after each weight op). A mean, normalisation, roll, sort or neuron-mixing
reshape between hidden states breaks this. Apply such an operation to the readout
instead, or put the mixing behind a weight (a matrix multiply), which etrace cuts."""


def is_state_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def keystr(path: Any) -> str:
    """A key path as a readable parameter path: `cell.weight_ih`."""
    s = jtu.keystr(path)
    return s[1:] if s.startswith(".") else s


@dataclasses.dataclass(frozen=True, eq=False)
class ModelLayout:
    """How a model is split into dynamic leaves (arrays) and the rest."""

    treedef: Any
    static: Any
    paths: tuple[str, ...]
    is_param: tuple[bool, ...]
    avals: tuple[jax.ShapeDtypeStruct, ...]


def split_model(model: Any) -> tuple[list[Any], Any, Any]:
    dynamic, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    return leaves, treedef, static


def model_layout(model: Any) -> ModelLayout:
    init_ids = {
        id(a)
        for si in jtu.tree_leaves(model, is_leaf=is_state_index)
        if is_state_index(si)
        for a in jtu.tree_leaves(si.init)
    }
    dynamic, static = eqx.partition(model, eqx.is_array)
    with_path, treedef = jtu.tree_flatten_with_path(dynamic)
    paths = tuple(keystr(p) for p, _ in with_path)
    is_param = tuple(
        bool(eqx.is_inexact_array(x)) and id(x) not in init_ids for _, x in with_path
    )
    avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for _, x in with_path)
    return ModelLayout(treedef, static, paths, is_param, avals)


def state_names(model: Any, state: Any) -> list[str]:
    """Readable names of the state leaves: model paths for `eqx.nn.State`."""
    if isinstance(state, eqx.nn.State):
        where = {}
        for path, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_state_index)[0]:
            if is_state_index(leaf):
                where[leaf.marker] = keystr(path)
        names = []
        for marker, value in state._state.items():  # pyright: ignore
            base = where.get(marker, str(marker))
            for path, _ in jtu.tree_flatten_with_path(value)[0]:
                names.append(base + jtu.keystr(path))
        return names
    return ["state" + jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(state)[0]]


def initial_state(model: Any, state: Any) -> Any:
    if state is not None:
        return state
    try:
        return eqx.nn.State(model)
    except ValueError as err:
        raise EtraceError(_MISSING_STATE.format(err=err)) from None


def _leaf_desc(a: Any) -> str:
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


@dataclasses.dataclass(eq=False)
class Compiled:
    """Everything the runtime needs; static (hashed by identity)."""

    program: _ir.Program
    graph: Graph
    layout: ModelLayout
    state_def: Any
    state_avals: tuple[jax.ShapeDtypeStruct, ...]
    state_names: tuple[str, ...]
    x_def: Any
    x_avals: tuple[jax.ShapeDtypeStruct, ...]
    y_def: Any
    n_y: int
    # The plan.
    order: tuple[int, ...]
    tail: frozenset[int]
    group_tail: tuple[tuple[int, ...], ...]
    sinks: tuple[tuple[_ir.Operand, ...], ...]
    sink_group: dict[int, int]
    esite_vars: frozenset[int]
    cut_sites: dict[int, Site]
    site_of_out: dict[int, Site]
    modes: dict[tuple[int, int], str]
    out_modes: tuple[str, ...]
    roles: tuple[tuple[str, str], ...]
    skeleton: Any
    # Per unit name: bitmasks of the groups whose previous / new state its weight
    # op's input depends on (how temporal layers connect; used by exactness rules).
    x_deps: dict[str, tuple[int, int]]
    # Weight ops whose input depends on a new hidden value of this step: equation
    # index -> positions of those inputs.
    reads_new: dict[int, tuple[int, ...]]
    one_step_reads: tuple[str, ...]
    # For whole-state algorithms: the equations upstream of any hidden state, the
    # parameter-only variables, and the parameters (dynamic-leaf indices) involved.
    anc_all: frozenset[int]
    param_only_vars: frozenset[int]
    joint_params: tuple[int, ...]
    # Non-parameter model arrays that a weight's structural zeros were read from
    # (masks): dynamic-leaf index and where they were non-zero at compile time.
    mask_leaves: tuple[tuple[int, np.ndarray], ...] = ()

    @property
    def state_vars(self) -> list[int]:
        n = len(self.layout.paths)
        return self.program.invars[n : n + len(self.state_avals)]


def trace(model: Any, sample_input: Any, state: Any) -> tuple[Any, ...]:
    """Traces one step of the model to a flat program."""
    layout = model_layout(model)
    dyn_leaves, _, _ = split_model(model)
    state_leaves, state_def = jtu.tree_flatten(state)
    x_leaves, x_def = jtu.tree_flatten(sample_input)
    for what, leaves in (("state", state_leaves), ("sample_input", x_leaves)):
        for leaf in leaves:
            if not eqx.is_array(leaf):
                raise EtraceError(
                    f"Every leaf of `{what}` must be a JAX or NumPy array, got "
                    f"{type(leaf).__name__} ({leaf!r}). Convert it with `jnp.asarray`."
                )
    state_leaves = [jnp.asarray(x) for x in state_leaves]
    x_leaves = [jnp.asarray(x) for x in x_leaves]
    state_avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state_leaves)
    y_def_box: list[Any] = []

    def step(dyn, st, xs):
        m = eqx.combine(jtu.tree_unflatten(layout.treedef, dyn), layout.static)
        out = m(jtu.tree_unflatten(x_def, xs), jtu.tree_unflatten(state_def, st))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise EtraceError(
                "The model must return a pair `(y, new_state)`, got "
                f"{type(out).__name__}. Write `__call__(self, x, state)` to return "
                "the output and the updated state."
            )
        y, new_state = out
        new_leaves, new_def = jtu.tree_flatten(new_state)
        if new_def != state_def:
            raise EtraceError(
                "The model returned a new state whose structure differs from the "
                f"state it was given: {new_def} instead of {state_def}. Return the "
                "same structure (e.g. `state.set(index, value)` on the state passed "
                "in)."
            )
        for name, old, new in zip(names, state_avals, new_leaves):
            if old.shape != jnp.shape(new) or old.dtype != jnp.result_type(new):
                raise EtraceError(
                    f"State leaf `{name}` changes from {_leaf_desc(old)} to "
                    f"{_leaf_desc(jnp.asarray(new))} in one step. Keep each state "
                    "leaf's shape and dtype fixed (initialise it with the dtype the "
                    "update produces)."
                )
        y_leaves, y_def = jtu.tree_flatten(y)
        y_def_box.append(y_def)
        return list(y_leaves) + list(new_leaves)

    names = state_names(model, state)
    clean = jtu.tree_unflatten(state_def, state_leaves)
    del clean  # flattening already copied the leaves; the caller's state is untouched
    closed = jax.make_jaxpr(step)(list(dyn_leaves), state_leaves, x_leaves)
    program = _ir.from_closed_jaxpr(closed)
    y_def = y_def_box[0]
    return (
        program,
        layout,
        state_def,
        state_avals,
        tuple(names),
        x_def,
        tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in x_leaves),
        y_def,
        y_def.num_leaves,
    )


def _inexact(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _backward(
    program: _ir.Program, roots: list[int], stop: Any
) -> tuple[set[int], set[int]]:
    """Equations reached backwards from `roots`; `stop(v)` ends the walk at `v`.

    Returns the equations and the variables where the walk stopped.
    """
    eqns: set[int] = set()
    stopped: set[int] = set()
    seen: set[int] = set()
    stack = [v for v in roots]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if stop(v):
            stopped.add(v)
            continue
        p = program.producer.get(v)
        if p is None or p in eqns:
            continue
        eqns.add(p)
        stack.extend(a for a in program.eqns[p].ins if isinstance(a, int))
    return eqns, stopped


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


def _param_list(bits: int, paths: tuple[str, ...]) -> str:
    return ", ".join(f"`{paths[k]}`" for k in range(len(paths)) if bits >> k & 1)


def _check_tail_eqn(program, eqn, param_only, pmask, paths) -> None:
    """Refuses an equation of the recurrent update that hides a parameter from the
    compiler (control flow, a weight operator out of canonical form)."""
    bits = 0
    for a in eqn.ins:
        if isinstance(a, int):
            bits |= pmask.get(a, 0)
    if eqn.name in _labels.CONTROL:
        names = _param_list(bits, paths)
        raise EtraceError(
            _CONTROL_FLOW.format(
                prim=_labels.describe(eqn),
                uses=f", which uses parameter(s) {names}" if names else "",
                what="the parameters used inside it" if names else "the state in it",
            )
        )
    if eqn.name in _ops.WEIGHT_PRIMS:
        weights = [a for a in eqn.ins if param_only(a)]
        if weights:
            wbits = 0
            for a in weights:
                wbits |= pmask.get(a, 0)
            why = {
                "conv_general_dilated": "the parameter must be the kernel, with "
                "`batch_group_count=1`",
                "gather": "a look-up must take whole rows (every other dimension "
                "in full)",
                "dynamic_slice": "a slice must take whole rows at the dynamic "
                "index (size 1 there, everything else in full)",
                "dot_general": "both operands depend on parameters and the state",
            }[eqn.name]
            raise EtraceError(
                _UNTRACEABLE_WEIGHT.format(
                    names=_param_list(wbits, paths),
                    prim=_labels.describe(eqn),
                    why=why,
                )
            )


_UNION = frozenset("add sub add_any max min or select_n concatenate".split())
_SAME = frozenset(
    "neg convert_element_type copy copy_p reduce_precision stop_gradient".split()
)
_MOVE = frozenset(
    "reshape broadcast_in_dim transpose squeeze expand_dims rev slice".split()
)


class _Structure:
    """Where a parameter-only value can be non-zero, from the constants it is
    computed with: `(mask * W)` is zero wherever a constant `mask` is."""

    def __init__(self, program, dyn, params, known: dict[int, np.ndarray]):
        self.program = program
        self.dyn = dyn
        self.params = params  # variables that depend on a parameter
        self.known = known  # non-parameter model arrays: variable -> value
        self.cache: dict[int, np.ndarray] = {}
        self.used: set[int] = set()

    def of(self, v: _ir.Operand) -> np.ndarray:
        program = self.program
        shape = tuple(program.aval(v).shape)
        if isinstance(v, _ir.Lit):
            return np.broadcast_to(np.asarray(v.val) != 0, shape)
        if v in self.cache:
            return self.cache[v]
        dense = np.ones(shape, bool)
        if v in program.consts:
            out = np.asarray(program.consts[v]) != 0
        elif v in self.known:
            out = np.asarray(self.known[v]) != 0
            self.used.add(v)
        elif v in self.dyn or v not in program.producer:
            out = dense
        else:
            out = self._eqn(program.eqns[program.producer[v]], v, dense)
        out = np.broadcast_to(out, shape)
        self.cache[v] = out
        return out

    def value(self, v: _ir.Operand) -> np.ndarray | None:
        """The concrete value of `v` if it depends on constants and non-parameter
        model arrays only (a mask's predicate), else `None`."""
        if isinstance(v, int) and v in self.known:
            self.used.add(v)
            return np.asarray(self.known[v])
        if isinstance(v, int) and (v in self.dyn or v in self.params):
            return None
        if isinstance(v, int) and v in self.program.producer:
            e = self.program.eqns[self.program.producer[v]]
            args = [self.value(a) for a in e.ins]
            if any(a is None for a in args):
                return None
            with jax.ensure_compile_time_eval():
                outs = _ir.bind(e, *(jnp.asarray(a) for a in args))
            return np.asarray(outs[e.outs.index(v)])
        return _ir.literal_value(self.program, v, {})

    def _eqn(self, e: _ir.Eqn, v: int, dense: np.ndarray) -> np.ndarray:
        if len(e.outs) != 1:
            return dense
        if e.name in ("mul", "and"):
            a, b = (self.of(x) for x in e.ins)
            return a & b
        if e.name in _SAME:
            return self.of(e.ins[0])
        if e.name == "select_n":
            cases = [self.of(x) for x in e.ins[1:]]
            which = self.value(e.ins[0])
            if which is None:
                return np.logical_or.reduce(cases)
            which = np.broadcast_to(np.asarray(which).astype(int), dense.shape)
            return np.choose(which, [np.broadcast_to(c, dense.shape) for c in cases])
        if e.name in _UNION - {"select_n", "concatenate"}:
            return np.logical_or.reduce([self.of(x) for x in e.ins])
        if e.name in _MOVE or e.name == "concatenate":
            if any(isinstance(a, int) and a in self.dyn for a in e.ins):
                return dense
            with jax.ensure_compile_time_eval():
                (out,) = _ir.bind(e, *(jnp.asarray(self.of(a)) for a in e.ins))
            return np.asarray(out)
        if e.name == "dot_general":
            with jax.ensure_compile_time_eval():
                args = [jnp.asarray(self.of(a), jnp.float32) for a in e.ins]
                (out,) = _ir.bind(e, *args)
            return np.asarray(out) > 0
        return dense


def _dependencies(
    program: _ir.Program, layout: ModelLayout, n_dyn: int
) -> tuple[dict[int, int], set[int]]:
    """Per variable, a bitmask of the parameters it depends on; and the set of
    variables that depend on the state or the input."""
    invars = program.invars
    pmask: dict[int, int] = {}
    dyn: set[int] = set(invars[n_dyn:])
    for i, is_p in enumerate(layout.is_param):
        if is_p:
            pmask[invars[i]] = 1 << i
    for e in program.eqns:
        m = 0
        d = False
        for a in e.ins:
            if isinstance(a, int):
                m |= pmask.get(a, 0)
                d = d or a in dyn
        for o in e.outs:
            if m:
                pmask[o] = m
            if d:
                dyn.add(o)
    return pmask, dyn


def analyse(model: Any, sample_input: Any, state: Any) -> Compiled:
    (
        program,
        layout,
        state_def,
        state_avals,
        names,
        x_def,
        x_avals,
        y_def,
        n_y,
    ) = trace(model, sample_input, state)
    eqns = program.eqns
    n_dyn = len(layout.paths)
    n_state = len(state_avals)
    invars = program.invars
    state_vars = invars[n_dyn : n_dyn + n_state]

    # 1. Dependencies: a bitmask of parameters, and whether state or input reach it.
    # The rewrites (`_rewrite`) change where parameters enter, so they run first.
    pmask, dyn = _dependencies(program, layout, n_dyn)

    def param_only(v: _ir.Operand) -> bool:
        return isinstance(v, int) and v not in dyn and pmask.get(v, 0) != 0

    def dynamic(v: _ir.Operand) -> bool:
        return isinstance(v, int) and v in dyn

    program = _rewrite.broadcast_shared(program, param_only, dynamic)
    for _ in range(8):
        pmask, dyn = _dependencies(program, layout, n_dyn)
        rewritten = _rewrite.reassociate(program, param_only, dynamic, n_state)
        if rewritten is program:
            break
        program = rewritten
    pmask, dyn = _dependencies(program, layout, n_dyn)
    eqns = program.eqns

    # 2. Cut ops: weight operators (`_ops`) with a param-only weight and a dynamic
    # other operand, in a form etrace can trace.
    cuts: dict[int, int] = {}
    forms: dict[int, _ops.Form] = {}
    for i, e in enumerate(eqns):
        w_pos = _ops.weight_position(program, e, param_only, dynamic)
        if w_pos is not None:
            f = _ops.form(program, e, w_pos)
            if f is not None:
                cuts[i], forms[i] = w_pos, f

    # 3. Sinks (float new-state leaves) and the tail region behind them.
    out_state = program.outvars[n_y:]
    float_leaves = [j for j in range(n_state) if _inexact(state_avals[j])]

    def tail_of(roots: list[int]) -> tuple[set[int], set[int]]:
        def stop(v: int) -> bool:
            if param_only(v) or v not in dyn:
                return True
            p = program.producer.get(v)
            return p is None or p in cuts

        return _backward(program, roots, stop)

    roots = [out_state[j] for j in float_leaves if isinstance(out_state[j], int)]
    tail_all, stopped = tail_of(roots)  # pyright: ignore
    for i in sorted(tail_all):
        _check_tail_eqn(program, eqns[i], param_only, pmask, layout.paths)
    site_outs = sorted(
        v for v in stopped if (program.producer.get(v) in cuts) or param_only(v)
    )

    # 4. Labels.
    seeds: dict[int, np.ndarray] = {}
    offset = 0
    leaf_off: dict[int, int] = {}
    for j in float_leaves:
        size = int(np.prod(state_avals[j].shape, dtype=int))
        leaf_off[j] = offset
        seeds[state_vars[j]] = (offset + np.arange(size, dtype=np.int32)).reshape(
            state_avals[j].shape
        )
        offset += size
    n_hidden = offset
    site_off: dict[int, int] = {}
    for v in site_outs:
        shape = program.avals[v].shape
        size = int(np.prod(shape, dtype=int))
        site_off[v] = offset
        seeds[v] = (offset + np.arange(size, dtype=np.int32)).reshape(shape)
        offset += size
    n_nodes = offset
    node_leaf = np.full(n_nodes, -1)
    node_idx = np.full(n_nodes, -1)
    for j, off in leaf_off.items():
        size = int(np.prod(state_avals[j].shape, dtype=int))
        node_leaf[off : off + size] = j
        node_idx[off : off + size] = np.arange(size)

    lab = _labels.Labeller(program, seeds)
    lab.n_hidden = n_hidden
    try:
        lab.run(sorted(tail_all))
    except _labels._NonStatic as err:
        raise EtraceError(
            f"Unsupported primitive {_labels.describe(err.eqn)} in the recurrent "
            "update: its indices depend on the state, so etrace cannot tell which "
            "neuron each element belongs to. Use static indices there."
        ) from None
    for j in float_leaves:
        v = out_state[j]
        if not isinstance(v, int):
            continue
        got = lab.get(v)
        if got is None:
            continue
        ids = seeds[state_vars[j]]
        ok = got >= 0
        lab.edges.append((got[ok].ravel(), ids[ok].ravel(), -(j + 1)))

    if lab.edges:
        a = np.concatenate([e[0] for e in lab.edges]).astype(np.int64)
        b = np.concatenate([e[1] for e in lab.edges]).astype(np.int64)
    else:
        a = b = np.zeros(0, np.int64)
    matrix = coo_matrix((np.ones(len(a)), (a, b)), shape=(n_nodes, n_nodes))
    _, comp = connected_components(matrix, directed=False)
    active_comp = np.zeros(comp.max() + 1 if n_nodes else 0, bool)
    if n_nodes > n_hidden:
        active_comp[comp[n_hidden:]] = True
    active_node = active_comp[comp] if n_nodes else np.zeros(0, bool)

    # Conflicts: an active component holding two neuron positions.
    hidden = np.arange(n_hidden)
    hid_active = hidden[active_node[:n_hidden]]
    if len(hid_active):
        pairs = np.unique(np.stack([comp[hid_active], node_idx[hid_active]]), axis=1)
        counts = np.bincount(pairs[0], minlength=len(active_comp))
        if (counts > 1).any():
            _raise_conflict(
                program, lab, node_idx, node_leaf, active_node, names, out_state
            )

    # Groups: leaves that share an active component.
    parent = {j: j for j in float_leaves}

    def find(j: int) -> int:
        while parent[j] != j:
            parent[j] = parent[parent[j]]
            j = parent[j]
        return j

    comp_leaf: dict[int, int] = {}
    for node in hid_active:
        c = int(comp[node])
        j = int(node_leaf[node])
        if c in comp_leaf:
            ra, rb = find(comp_leaf[c]), find(j)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        else:
            comp_leaf[c] = j
    active_leaves = sorted({int(node_leaf[n]) for n in hid_active})
    members: dict[int, list[int]] = {}
    for j in active_leaves:
        members.setdefault(find(j), []).append(j)
    groups: list[Group] = []
    leaf_group: dict[int, int] = {}
    for root in sorted(members):
        leaves = tuple(sorted(members[root]))
        shapes = tuple(state_avals[j].shape for j in leaves)
        sizes = {int(np.prod(s, dtype=int)) for s in shapes}
        dtypes = {state_avals[j].dtype for j in leaves}
        if len(sizes) > 1 or len(dtypes) > 1:
            desc = ", ".join(
                f"`{names[j]}` {_leaf_desc(state_avals[j])}" for j in leaves
            )
            raise EtraceError(
                f"The state leaves {desc} interact element-wise, so they form one "
                "hidden group, but they differ in size or dtype. Give every state "
                "of a neuron the same shape and dtype (one leaf per state kind)."
            )
        for j in leaves:
            leaf_group[j] = len(groups)
        groups.append(
            Group(
                name="+".join(names[j] for j in leaves),
                leaves=leaves,
                leaf_names=tuple(names[j] for j in leaves),
                shapes=shapes,
                n=sizes.pop(),
                k=len(leaves),
                dtype=dtypes.pop(),
            )
        )
    comp_group = np.full(len(active_comp), -1)
    comp_idx = np.zeros(len(active_comp), np.int64)
    for node in hid_active:
        c = comp[node]
        comp_group[c] = leaf_group[int(node_leaf[node])]
        comp_idx[c] = node_idx[node]

    # 5. Sites and units.
    names_of = layout.paths

    def param_names(v: int) -> tuple[int, ...]:
        m = pmask.get(v, 0)
        return tuple(i for i in range(n_dyn) if m >> i & 1)

    model_leaves, _, _ = split_model(model)
    structure = _Structure(
        program,
        dyn,
        set(pmask),
        {
            invars[k]: np.asarray(model_leaves[k])
            for k in range(n_dyn)
            if not layout.is_param[k]
        },
    )
    sites: list[Site] = []
    units: list[Unit] = []
    used_names: dict[str, int] = {}
    cut_sites: dict[int, Site] = {}
    site_of_out: dict[int, Site] = {}
    for v in site_outs:
        p = program.producer.get(v)
        nodes = site_off[v] + np.arange(int(np.prod(program.avals[v].shape, dtype=int)))
        feeds = comp_group[comp[nodes]]
        if not (feeds >= 0).any():
            continue
        if p is not None and p in cuts:
            site = _matrix_site(program, p, forms[p], param_names, names_of)
            pattern = site.canonical_w_np(structure.of(site.weight))
            if not pattern.all():
                site = dataclasses.replace(site, pattern=pattern)
        else:
            site = _elementwise_site(program, v, param_names, names_of)
        count = used_names.get(site.name, 0)
        used_names[site.name] = count + 1
        if count:
            site = dataclasses.replace(site, name=f"{site.name}#{count + 1}")
        sites.append(site)
        site_of_out[v] = site
        if site.kind == "matrix":
            assert p is not None
            cut_sites[p] = site
        labels = site.canonical_y_np(
            np.arange(len(nodes)).reshape(program.avals[v].shape)
        )
        for g in sorted(set(int(x) for x in feeds[feeds >= 0])):
            mine = comp_group[comp[nodes[labels]]] == g
            nmap = np.where(mine, comp_idx[comp[nodes[labels]]], 0).astype(np.int32)
            units.append(
                Unit(f"{site.name} -> {groups[g].name}", site, groups[g], nmap)
            )
    units.sort(key=lambda u: groups.index(u.group))
    graph = Graph(tuple(groups), tuple(units))
    mask_leaves = ()
    if any(s.pattern is not None for s in sites):
        where = {v: k for k, v in enumerate(invars[:n_dyn])}
        mask_leaves = tuple(
            (where[v], np.asarray(structure.known[v]) != 0)
            for v in sorted(structure.used)
        )

    # 6. The evaluation plan, for the active part only.
    active_sinks: list[list[_ir.Operand]] = [
        [out_state[j] for j in g.leaves] for g in groups
    ]
    sink_group: dict[int, int] = {}
    for gi, sinks in enumerate(active_sinks):
        for v in sinks:
            if isinstance(v, int):
                sink_group[v] = gi
    tail, _ = tail_of([v for v in sink_group])
    esite_vars = frozenset(
        v for v in site_out_set(site_of_out) if site_of_out[v].kind == "elementwise"
    )
    group_tail = []
    anc = []
    for sinks in active_sinks:
        ints = [v for v in sinks if isinstance(v, int)]
        gt, _ = tail_of(ints)
        group_tail.append(tuple(sorted(gt)))
        full, _ = _backward(program, ints, lambda v: False)
        anc.append(full)
    groups, units = _with_coupling(
        program, groups, units, group_tail, active_sinks, state_vars
    )
    units = _with_same_df(program, groups, units, group_tail)
    graph = dataclasses.replace(graph, groups=tuple(groups), units=tuple(units))
    anc_all = frozenset().union(*anc) if anc else frozenset()
    param_only_vars = frozenset(v for v in pmask if v not in dyn)
    joint_bits = 0
    for i in anc_all:
        if any(o in dyn for o in eqns[i].outs):
            for a in eqns[i].ins:
                if isinstance(a, int) and a in param_only_vars:
                    joint_bits |= pmask[a]
    joint_params = tuple(i for i in range(n_dyn) if joint_bits >> i & 1)
    graph = dataclasses.replace(
        graph,
        hidden_size=sum(g.n * g.k for g in groups),
        params=tuple(
            (layout.paths[i], tuple(layout.avals[i].shape), layout.avals[i].dtype)
            for i in joint_params
        ),
    )
    tail_vars = {o for i in tail for o in eqns[i].outs}
    modes: dict[tuple[int, int], str] = {}
    one_step_reads: list[str] = []

    # The groups whose update computes each tail value (or consumes each site).
    owners: dict[int, set[int]] = {}
    for gi, gt in enumerate(group_tail):
        for i in gt:
            for o in eqns[i].outs:
                owners.setdefault(o, set()).add(gi)
    for u in units:
        owners.setdefault(u.site.out, set()).add(groups.index(u.group))

    def feeds_back(reader: int | None, v: int) -> bool:
        """Whether `reader` is upstream of the group(s) that computed `v`."""
        return reader is not None and any(reader in anc[g] for g in owners.get(v, ()))

    def mode_for(reader: int | None, v: _ir.Operand) -> str:
        # A reader upstream of the same group's new state (a recurrent weight's
        # input, a peephole) sees the value as the update computed it: paths back
        # into the group through weights are what the diagonal traces leave out.
        if not isinstance(v, int):
            return "plain"
        if v in sink_group:
            return "tail" if feeds_back(reader, v) else "hooked"
        if v in tail_vars:
            if feeds_back(reader, v):
                return "tail"
            one_step_reads.append(
                _labels.describe(eqns[program.producer[v]])
                if reader is None
                else _labels.describe(eqns[reader])
            )
            return "live"
        if v in site_of_out and site_of_out[v].kind == "matrix":
            return "tail" if feeds_back(reader, v) else "live"
        return "plain"

    for i, e in enumerate(eqns):
        if i in tail:
            continue
        for pos, v in enumerate(e.ins):
            if i in cut_sites and pos == cuts[i]:
                continue
            m = mode_for(i, v)
            if m != "plain":
                modes[(i, pos)] = m
    out_modes = tuple(mode_for(None, v) for v in program.outvars[:n_y])
    order = _schedule(program, tail, modes, active_sinks, cut_sites, graph)

    roles = _roles(
        program,
        layout,
        pmask,
        dyn,
        cuts,
        cut_sites,
        tail,
        esite_vars,
        anc,
        sites,
        n_y,
    )
    if one_step_reads:
        warnings.warn(
            "The output or a later layer reads a value computed inside the "
            "recurrent update before it is stored as state "
            f"({sorted(set(one_step_reads))[0]}); gradients through that read are "
            "one-step (they carry no history). Read the stored state instead to "
            "get traced gradients.",
            EtraceWarning,
            stacklevel=3,
        )
    x_deps, new_leaf = _group_dependencies(
        program, groups, state_vars, sink_group, units
    )
    # Every weight op (cut or not) whose input depends on a new hidden value.
    reads_new: dict[int, tuple[int, ...]] = {}
    for i, w in cuts.items():
        pos = tuple(
            k
            for k, a in enumerate(eqns[i].ins)
            if k != w and isinstance(a, int) and new_leaf.get(a, 0)
        )
        if pos:
            reads_new[i] = pos
    graph = _with_connections(
        graph, [eqns[i].ins[k] for i, ks in reads_new.items() for k in ks], new_leaf
    )
    skeleton = eqx.combine(
        jtu.tree_unflatten(layout.treedef, [_Leaf(i) for i in range(n_dyn)]),
        layout.static,
    )
    return Compiled(
        program=program,
        graph=graph,
        layout=layout,
        state_def=state_def,
        state_avals=state_avals,
        state_names=names,
        x_def=x_def,
        x_avals=x_avals,
        y_def=y_def,
        n_y=n_y,
        order=order,
        tail=frozenset(tail),
        group_tail=tuple(group_tail),
        sinks=tuple(tuple(s) for s in active_sinks),
        sink_group=sink_group,
        esite_vars=esite_vars,
        cut_sites=cut_sites,
        site_of_out=site_of_out,
        modes=modes,
        out_modes=out_modes,
        roles=roles,
        skeleton=skeleton,
        x_deps=x_deps,
        reads_new=reads_new,
        one_step_reads=tuple(sorted(set(one_step_reads))),
        anc_all=anc_all,
        param_only_vars=param_only_vars,
        joint_params=joint_params,
        mask_leaves=mask_leaves,
    )


def _coupling(program, eqns, leaves, sinks, state_vars):
    """`Group.coupling` of one group: which new states depend on which previous
    ones through its update `eqns`. Dependence is carried by inexact values only
    (a comparison's boolean result has no derivative) and is cut by
    `stop_gradient`, as in autodiff; anything else counts as a dependence."""
    dep: dict[int, int] = {}
    for b, j in enumerate(leaves):
        dep[state_vars[j]] = 1 << b
    for i in eqns:
        e = program.eqns[i]
        if e.name == "stop_gradient":
            continue
        m = 0
        for a in e.ins:
            if isinstance(a, int):
                m |= dep.get(a, 0)
        if m:
            for o in e.outs:
                if jnp.issubdtype(program.avals[o].dtype, jnp.inexact):
                    dep[o] = m
    return tuple(
        tuple(
            isinstance(s, int) and bool(dep.get(s, 0) >> b & 1)
            for b in range(len(leaves))
        )
        for s in sinks
    )


def _with_coupling(program, groups, units, group_tail, active_sinks, state_vars):
    """The groups with their `coupling` pattern, and the units pointing at them."""
    new = [
        dataclasses.replace(
            g, coupling=_coupling(program, gt, g.leaves, sinks, state_vars)
        )
        for g, gt, sinks in zip(groups, group_tail, active_sinks)
    ]
    by_old = {id(g): n for g, n in zip(groups, new)}
    return new, [dataclasses.replace(u, group=by_old[id(u.group)]) for u in units]


def _sum_root(program, eqns, v: int) -> int:
    """The variable whose cotangent `v` has in the update `eqns`: `v` itself, or,
    while `v` is read exactly once and by an `add` of its own shape and dtype (so
    that the add passes its cotangent through unchanged), that add's result."""
    while True:
        reads = [
            (program.eqns[i], pos)
            for i in eqns
            for pos, a in enumerate(program.eqns[i].ins)
            if a == v
        ]
        if len(reads) != 1 or reads[0][0].name not in ("add", "add_any"):
            return v
        (out,) = reads[0][0].outs
        if program.avals[out].shape != program.avals[v].shape or (
            program.avals[out].dtype != program.avals[v].dtype
        ):
            return v
        v = out


def _with_same_df(program, groups, units, group_tail):
    """The units with `Unit.same_df` set: within a group, units whose site outputs
    reach the same sum (see `_sum_root`) and are laid out alike share their `Df`."""
    roots = []
    first: dict[tuple[int, int], Unit] = {}
    for u in units:
        g = groups.index(u.group)
        key = (g, _sum_root(program, group_tail[g], u.site.out))
        roots.append(key)
        # A matrix site keeps the shared trace where there is one (its input
        # trace is the larger), else the first unit.
        if key not in first or (
            first[key].site.kind != "matrix" and u.site.kind == "matrix"
        ):
            first[key] = u
    out = []
    for u, key in zip(units, roots):
        twin = first[key]
        s, t = u.site, twin.site
        alike = (
            twin is not u
            and key[1] != s.out
            and s.dtype == t.dtype
            and program.avals[s.out].shape == program.avals[t.out].shape
            and np.array_equal(u.nmap, twin.nmap)
            and np.array_equal(
                _canonical_order(program, s), _canonical_order(program, t)
            )
        )
        out.append(dataclasses.replace(u, same_df=twin.name) if alike else u)
    return out


def _canonical_order(program, site: Site) -> np.ndarray:
    """Which element of the site's output each canonical output is."""
    shape = program.avals[site.out].shape
    return site.canonical_y_np(np.arange(int(np.prod(shape, dtype=int))).reshape(shape))


def _group_dependencies(program, groups, state_vars, sink_group, units):
    """Which groups' previous and new states each unit's input depends on.

    Returns, per unit name, bitmasks over groups `(previous, new)`; and, per
    variable, a bitmask over all hidden leaves (in group order) of the new hidden
    values it depends on within the step.
    """
    leaf_bit: dict[int, int] = {}
    prev: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for j in g.leaves:
            prev[state_vars[j]] = prev.get(state_vars[j], 0) | 1 << gi
    flat = [(gi, j) for gi, g in enumerate(groups) for j in g.leaves]
    sink_bit: dict[int, int] = {}
    out_state = program.outvars[len(program.outvars) - len(state_vars) :]
    for b, (gi, j) in enumerate(flat):
        v = out_state[j]
        if isinstance(v, int) and sink_group.get(v) == gi:
            sink_bit[v] = sink_bit.get(v, 0) | 1 << b
    group_of_bit = [gi for gi, _ in flat]
    # `new_leaf`: transitively, through other groups' updates; `leaf_bit`: as
    # readers outside the tail see it (a hooked new state stands for itself only).
    new_leaf: dict[int, int] = {}
    for v, bits in sink_bit.items():
        if v not in program.producer:
            new_leaf[v] = leaf_bit[v] = bits
    for e in program.eqns:
        pb = lb = db = 0
        for a in e.ins:
            if isinstance(a, int):
                pb |= prev.get(a, 0)
                lb |= new_leaf.get(a, 0)
                db |= leaf_bit.get(a, 0)
        for o in e.outs:
            if pb:
                prev[o] = pb
            if lb | sink_bit.get(o, 0):
                new_leaf[o] = lb | sink_bit.get(o, 0)
            direct = sink_bit[o] if o in sink_bit else db
            if direct:
                leaf_bit[o] = direct

    def groups_of(bits: int) -> int:
        out = 0
        for b, gi in enumerate(group_of_bit):
            if bits >> b & 1:
                out |= 1 << gi
        return out

    out = {}
    for u in units:
        p = n = 0
        for x in u.site.inputs:
            if isinstance(x, int):
                p |= prev.get(x, 0)
                n |= new_leaf.get(x, 0)
        out[u.name] = (p, groups_of(n))
    return out, leaf_bit


def _with_connections(graph, weight_inputs, leaf_bit):
    """The graph with `downstream` and `outputs` filled in (see `Graph`)."""
    groups = graph.groups
    flat = [(gi, k) for gi, g in enumerate(groups) for k in range(len(g.leaves))]

    def bits_of(x: Any) -> int:
        return leaf_bit.get(x, 0) if isinstance(x, int) else 0

    downstream: dict[str, list[str]] = {g.name: [] for g in groups}
    for u in graph.units:
        bits = 0
        for x in u.site.inputs:
            bits |= bits_of(x)
        for b, (gi, _) in enumerate(flat):
            mine = downstream[groups[gi].name]
            if bits >> b & 1 and groups[gi] is not u.group and u.group.name not in mine:
                mine.append(u.group.name)
    read = 0
    for x in weight_inputs:
        read |= bits_of(x)
    outputs: dict[str, list[int]] = {g.name: [] for g in groups}
    for b, (gi, k) in enumerate(flat):
        if read >> b & 1:
            outputs[groups[gi].name].append(k)
    return dataclasses.replace(
        graph,
        downstream={k: tuple(v) for k, v in downstream.items()},
        outputs={k: tuple(v) for k, v in outputs.items()},
    )


def attach_pattern(compiled: Compiled) -> None:
    """Gives the graph a lazily computed structural Jacobian pattern."""
    cache: dict[bool, Any] = {}

    def pattern(as_sparse: bool = False):
        if True not in cache:
            from ._sparsity import dependency_pattern

            # First use may come while tracing a step: evaluate the constants eagerly.
            with jax.ensure_compile_time_eval():
                cache[True] = dependency_pattern(compiled)
        if as_sparse not in cache:
            J, immediate = cache[True]
            shapes = {
                path: tuple(aval.shape)
                for path, aval in zip(compiled.layout.paths, compiled.layout.avals)
            }
            cache[False] = (
                J.toarray(),
                {
                    path: m.toarray().reshape((J.shape[0],) + shapes[path])
                    for path, m in immediate.items()
                },
            )
        return cache[as_sparse]

    compiled.graph = dataclasses.replace(compiled.graph, pattern=pattern)


def warn_one_step(compiled: Compiled) -> None:
    """Warns about parameters that per-group algorithms learn one-step."""
    layout = compiled.layout
    one_step = [
        layout.paths[i] for i, (r, _) in enumerate(compiled.roles) if r == "one-step*"
    ]
    if one_step:
        warnings.warn(
            "These parameters reach the hidden state only through another weight "
            f"op, so they are learned with a one-step gradient: {one_step}. "
            "See `learner.summary()`.",
            EtraceWarning,
            stacklevel=3,
        )


def site_out_set(site_of_out: dict[int, Site]) -> list[int]:
    return list(site_of_out)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """Stands in for a model array in the skeleton used by `Learner.trace_of`."""

    index: int


def _site_name(params: tuple[int, ...], paths: tuple[str, ...]) -> str:
    return "*".join(paths[i] for i in params) or "<constant>"


def _matrix_site(program, i, form: _ops.Form, param_names, paths) -> Site:
    eqn = program.eqns[i]
    w = eqn.ins[form.w_pos]
    inputs = tuple(a for k, a in enumerate(eqn.ins) if k != form.w_pos)
    params = param_names(w)
    return Site(
        name=form.name.format(_site_name(params, paths)),
        kind="matrix",
        out=eqn.outs[0],
        weight=w,
        x=next((a for a in inputs if isinstance(a, int)), None),
        eqn=i,
        params=params,
        b=form.b,
        fw=form.fw,
        fx=form.fx,
        c=form.c,
        w_shape=tuple(program.aval(w).shape),
        w_perm=form.w_perm,
        y_perm=form.y_perm,
        dtype=program.avals[eqn.outs[0]].dtype,
        op=eqn.name,
        w_pos=form.w_pos,
        inputs=inputs,
        x_fn=form.x_fn,
    )


def _elementwise_site(program, v, param_names, paths) -> Site:
    shape = tuple(program.avals[v].shape)
    params = param_names(v)
    return Site(
        name=_site_name(params, paths),
        kind="elementwise",
        out=v,
        weight=v,
        x=None,
        eqn=None,
        params=params,
        b=1,
        fw=int(np.prod(shape, dtype=int)),
        fx=1,
        c=1,
        w_shape=shape,
        w_perm=tuple(range(len(shape))),
        y_perm=(),
        dtype=program.avals[v].dtype,
    )


def _raise_conflict(program, lab, node_idx, node_leaf, active_node, names, out_state):
    """Replays the joins in order to name the equation that mixed two neurons."""
    parent: dict[int, int] = {}
    pos: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def where_of(x: int) -> str:
        if node_leaf[x] >= 0:
            return f"`{names[node_leaf[x]]}`[{node_idx[x]}]"
        return "a weight output"

    for a_arr, b_arr, where in lab.edges:
        for a, b in zip(a_arr.tolist(), b_arr.tolist()):
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            ia = pos.get(ra, node_idx[ra] if node_idx[ra] >= 0 else None)
            ib = pos.get(rb, node_idx[rb] if node_idx[rb] >= 0 else None)
            if ia is not None and ib is not None and ia != ib and active_node[a]:
                if where >= 0:
                    culprit = _labels.describe(program.eqns[where])
                    what = f"one element depend on neurons {ia} and {ib}"
                else:
                    j = -where - 1
                    moved = lab.moved.get(out_state[j])
                    culprit = (
                        _labels.describe(program.eqns[moved])
                        if moved is not None
                        else f"the update of state `{names[j]}`"
                    )
                    what = (
                        f"the new `{names[j]}`[{ib}] depend on neuron {ia} of the "
                        "previous hidden state"
                    )
                raise EtraceError(_NOT_LOCAL.format(culprit=culprit, what=what))
            parent[ra] = rb
            merged = ia if ia is not None else ib
            if merged is not None:
                pos[rb] = merged
    raise EtraceError(
        _NOT_LOCAL.format(
            culprit="the recurrent update",
            what="elements of different neurons interact",
        )
    )


def _schedule(program, tail, modes, active_sinks, cut_sites, graph) -> tuple[int, ...]:
    """A topological order of equations and hook nodes (`len(eqns) + g`)."""
    n = len(program.eqns)
    deps: dict[int, set[int]] = {}
    for i, e in enumerate(program.eqns):
        d = {program.producer[a] for a in e.ins if a in program.producer}
        for (reader, pos), m in modes.items():
            if reader == i and m == "hooked":
                v = e.ins[pos]
                d.add(n + _group_of(active_sinks, v))
        deps[i] = d
    for g, sinks in enumerate(active_sinks):
        d = {program.producer[v] for v in sinks if v in program.producer}
        for u in graph.units:
            if u.group is graph.groups[g]:
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


def _group_of(active_sinks, v) -> int:
    for g, sinks in enumerate(active_sinks):
        if v in sinks:
            return g
    raise KeyError(v)


def _roles(
    program, layout, pmask, dyn, cuts, cut_sites, tail, esite_vars, anc, sites, n_y
) -> tuple[tuple[str, str], ...]:
    """Each parameter's role and the reason, for `summary()` and warnings."""
    eqns = program.eqns
    any_anc = set().union(*anc) if anc else set()
    out_vars = [v for v in program.outvars[:n_y] if isinstance(v, int)]
    to_out, _ = _backward(program, out_vars, lambda v: False)
    traced_matrix: set[int] = set()
    traced_elem: set[int] = set()
    for s in sites:
        (traced_matrix if s.kind == "matrix" else traced_elem).update(s.params)
    one_step: set[int] = set()
    readout: set[int] = set()
    for i, e in enumerate(eqns):
        if not any(o in dyn for o in e.outs):
            continue  # a computation on parameters alone
        for pos, a in enumerate(e.ins):
            if not isinstance(a, int) or a in dyn or not pmask.get(a, 0):
                continue
            bits = [k for k in range(len(layout.paths)) if pmask[a] >> k & 1]
            if i in tail or (i in cut_sites and cuts[i] == pos):
                continue
            if i in any_anc:
                one_step.update(bits)
            elif i in to_out:
                readout.update(bits)
    roles = []
    for k, is_p in enumerate(layout.is_param):
        if not is_p:
            roles.append(("none", "not a parameter (non-float array or state init)"))
        elif k in traced_matrix:
            roles.append(("matrix", "weight of a matrix op feeding a hidden group"))
        elif k in traced_elem:
            roles.append(("elementwise", "enters the recurrent update element-wise"))
        elif k in one_step:
            roles.append(
                (
                    "one-step*",
                    "reaches the hidden state only through another "
                    "weight op: learned with this step's gradient, no trace",
                )
            )
        elif k in readout:
            roles.append(("one-step", "reaches no hidden state (readout)"))
        else:
            roles.append(("none", "does not affect the output"))
    return tuple(roles)
