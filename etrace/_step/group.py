"""One step of an analysed model for per-group algorithms.

Each equation reads one of several versions of its operands (`_analysis.Mode`):

* in the tail (the recurrent update), weight outputs and element-wise parameter values
  are under `stop_gradient`, so autodiff through the tail reaches only the inputs of
  weight ops (the same-step paths into earlier layers), never the traced parameters;
* outside the tail, a new hidden state is read through its group's *hook*: a
  `custom_vjp` identity whose backward pass turns the cotangent `dL/dh` into parameter
  gradients with the algorithm's read-out. Readers that feed back into the same
  group's update (a recurrent weight's input, a peephole) read the value as the tail
  computed it, so no gradient outside the algorithm's equations reaches the traced
  parameters;
* a value from inside the tail read outside it (other than the new state) is
  recomputed with live parameters: a one-step gradient, which the compiler warns about.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _ir
from .._analysis import Compiled, Mode
from .._errors import EtraceError
from .._graph import Graph, Group
from .._kernels import turned_product
from . import chunk
from .hooks import gradient_hook, output_hook, summed_over_batch
from .jacobians import as_dtype, diagonal_blocks, group_jacobians, Jacobians
from .options import ChunkIO, StepOptions


_sg = jax.lax.stop_gradient


def _flat(a: Any) -> Any:
    return jnp.reshape(a, (-1,))


def _to_weights(units, grads, dtypes) -> list[Any]:
    return [
        as_dtype(u.site.weight_from_canonical(grads[u.name]), dt)
        for u, dt in zip(units, dtypes)
    ]


def read_out_hook(algorithm, sub: Graph, group: Group, dtypes, anchored, summed):
    """The group's gradient hook: the learning signal from the cotangent of its
    new state (plus the feedback signal on its output states where `anchored`),
    or the modulator in its place, read out by the algorithm from the traces
    before or after the update."""
    outputs = list(sub.outputs.get(group.name, ()))
    previous = algorithm.reads_previous(sub)

    def learning_signal(cot, anchor_cot, modulator):
        if modulator is not None:  # the same third factor for each state
            return {group.name: jnp.stack([modulator] * group.k, axis=-1)}
        signal = jnp.stack([_flat(c) for c in cot], axis=-1)
        if anchor_cot is not None:
            signal = signal.at[:, outputs].add(anchor_cot[:, None])
        return {group.name: signal}

    def read_out(traces, jac, cot, anchor_cot):
        before, after, modulator = traces
        signal = learning_signal(cot, anchor_cot, modulator)
        if previous:
            grads = algorithm.gradients_from_previous(sub, before, signal, jac)
        else:
            grads = algorithm.gradients(sub, after, signal, jac)
        return _to_weights(sub.units, grads, dtypes)

    def batch_read_out(traces, jac, cot, anchor_cot):
        before, after, modulator = traces
        signal = jax.vmap(learning_signal)(cot, anchor_cot, modulator)
        if previous:
            grads = algorithm.gradients_from_previous(
                sub, before, signal, jac, summed=True
            )
        else:
            grads = algorithm.summed_gradients(sub, after, signal, jac)
        return _to_weights(sub.units, grads, dtypes)

    return gradient_hook(summed_over_batch(read_out, batch_read_out, summed), anchored)


# Learning signals that replace back-propagation through the weights that read
# hidden values with a projection delivered to the groups' outputs.
FEEDBACK = ("error_feedback", "target_feedback")

_MODULATOR_KEYS = (
    "`modulator` is a dict keyed by hidden group, but {problem} (the groups: "
    "{groups}). Key the modulators by group name, as `print(learner)` shows them, "
    "or pass one array for every group."
)
_MODULATOR_SHAPE = (
    "The modulator of hidden group `{group}` has shape {shape}; it takes a scalar "
    "(the same for every neuron) or one value per neuron, shape {neurons} or "
    "({n},)."
)


def group_modulators(graph: Graph, modulator: Any) -> dict[str, Any]:
    """Per group name, the modulator of each of its `N` neurons, `(N,)`: from a
    scalar for every neuron of every group, an array of a group's neuron shape,
    or a dict of those keyed by group name."""
    if isinstance(modulator, dict):
        names = [g.name for g in graph.groups]
        unknown = [k for k in modulator if k not in names]
        missing = [n for n in names if n not in modulator]
        if unknown or missing:
            problem = (
                f"`{unknown[0]}` is not a group of this model"
                if unknown
                else f"it has no entry for `{missing[0]}`"
            )
            groups = ", ".join(f"`{n}`" for n in names)
            raise EtraceError(_MODULATOR_KEYS.format(problem=problem, groups=groups))
        per_group = modulator
    else:
        per_group = {g.name: modulator for g in graph.groups}
    out = {}
    for g in graph.groups:
        m = jnp.asarray(per_group[g.name])
        if m.ndim == 0:
            m = jnp.broadcast_to(m, (g.n,))
        elif m.size != g.n or m.shape not in (g.shapes[0], (g.n,)):
            raise EtraceError(
                _MODULATOR_SHAPE.format(
                    group=g.name, shape=tuple(m.shape), neurons=g.shapes[0], n=g.n
                )
            )
        out[g.name] = jnp.reshape(m, (g.n,)).astype(g.dtype)
    return out


class GroupStep:
    """The evaluation of one step: environments of values by version, filled in
    the compiled order; each group's hook placed where its new state is complete."""

    def __init__(
        self,
        compiled: Compiled,
        algorithm,
        inputs,
        traces,
        t,
        target,
        options: StepOptions,
        io: ChunkIO,
        modulator: Any = None,
    ):
        self.c = compiled
        self.algorithm = algorithm
        self.modulators = (
            None if modulator is None else group_modulators(compiled.graph, modulator)
        )
        self.traces = traces
        self.t = t
        self.target = target
        self.options = options
        self.io = io
        program = compiled.program
        self.main: dict[int, Any] = dict(program.consts)
        self.main.update(zip(program.invars, inputs))
        self.tail: dict[int, Any] = {}
        self.live: dict[int, Any] = {}
        self.hooked: dict[int, Any] = {}
        self.new_traces = dict(traces)
        self.records: dict[str, Any] = {}
        self.anchors: list[Any] = []
        self.anchor_sizes: list[tuple[int, Any]] = []
        self.feedback = algorithm.learning_signal in FEEDBACK
        self.H = None
        if algorithm.full_diagonal:
            n_dyn, n_state = compiled.step.n_dyn, len(compiled.step.state_avals)
            self.H = diagonal_blocks(
                compiled,
                inputs[:n_dyn],
                inputs[n_dyn : n_dyn + n_state],
                inputs[n_dyn + n_state :],
            )
        self.read_live_sites = self._read_live_sites()

    def _read_live_sites(self) -> set[int]:
        """Sites whose output is also read with its weight live (a same-step path
        around the state) keep the product as written: XLA computes the cut and
        the live product once only while they are the same expression."""
        c = self.c
        eqns = c.program.eqns
        reads = [
            eqns[i].ins[pos] for (i, pos), m in c.plan.modes.items() if m is Mode.LIVE
        ]
        reads += [
            v for m, v in zip(c.plan.out_modes, c.program.outvars) if m is Mode.LIVE
        ]
        return {v for v in reads if isinstance(v, int) and v in c.sites.site_of_out}

    def cut_operands(self, i: int, stop: bool) -> list[Any]:
        site = self.c.sites.cut_sites[i]
        args = []
        for pos, a in enumerate(self.c.program.eqns[i].ins):
            if pos == site.w_pos and isinstance(a, int):
                args.append(_sg(self.main[a]) if stop else self.main[a])
            else:
                args.append(self.read_main(i, pos, a))
        return args

    def site_value(self, v: int, stop: bool) -> Any:
        cache = self.tail if stop else self.live
        if v in cache:
            return cache[v]
        site = self.c.sites.site_of_out[v]
        if site.kind == "elementwise" or site.eqn is None:
            cache[v] = _sg(self.main[v]) if stop else self.main[v]
            return cache[v]
        eqn = self.c.program.eqns[site.eqn]
        bind = _ir.bind_weight_first if site.w_pos == 0 else _ir.bind
        operands = self.cut_operands(site.eqn, stop)
        if stop and v not in self.read_live_sites:  # the weight's value only
            cache[v] = turned_product(bind, eqn, operands, site.w_pos)
        else:
            cache[v] = bind(eqn, *operands)[0]
        return cache[v]

    def read_tail(self, v: _ir.Operand) -> Any:
        if isinstance(v, _ir.Lit):
            return v.val
        if v in self.c.sites.site_of_out:
            return self.site_value(v, stop=True)
        return self.tail[v] if v in self.tail else self.main[v]

    def read_live(self, v: _ir.Operand) -> Any:
        if isinstance(v, _ir.Lit):
            return v.val
        if v in self.c.sites.site_of_out:
            return self.site_value(v, stop=False)
        program = self.c.program
        p = program.producer.get(v)
        if p is None or p not in self.c.regions.tail:
            return self.main[v]
        if v not in self.live:
            eqn = program.eqns[p]
            outs = _ir.bind(eqn, *(self.read_live(a) for a in eqn.ins))
            self.live.update(zip(eqn.outs, outs))
        return self.live[v]

    def read(self, mode: Mode, v: _ir.Operand) -> Any:
        if mode is Mode.HOOKED:
            return self.hooked[v]  # pyright: ignore
        if mode is Mode.LIVE:
            return self.read_live(v)
        if mode is Mode.TAIL:
            return self.read_tail(v)
        return v.val if isinstance(v, _ir.Lit) else self.main[v]

    def read_main(self, i: int, pos: int, v: _ir.Operand) -> Any:
        value = self.read(self.c.plan.modes.get((i, pos), Mode.PLAIN), v)
        if self.feedback and pos in self.c.connections.reads_new.get(i, ()):
            # Feedback replaces the backward pass through weights that read hidden
            # values: nothing flows back through them.
            value = _sg(value)
        return value

    def jacobians(self, g: int) -> Jacobians:
        """This step's `D`, `Df`, `x` (and `H`) for group `g`."""
        c = self.c
        program = c.program
        group = c.graph.groups[g]
        units = [u for u in c.graph.units if u.group is group]
        group_tail = c.regions.group_tail[g]
        prev = [_sg(self.main[c.state_vars[j]]) for j in group.leaves]
        site_vals = [_sg(self.site_value(u.site.out, stop=True)) for u in units]
        fixed: dict[int, Any] = {}
        for i in group_tail:
            for a in program.eqns[i].ins:
                if not isinstance(a, int) or a in fixed or a in c.sites.site_of_out:
                    continue
                if program.producer.get(a) not in group_tail:
                    fixed[a] = _sg(self.read_tail(a))
        D, Df = group_jacobians(c, g, prev, site_vals, fixed)
        xs = {}
        for u in units:
            site = u.site
            if site.kind == "matrix" and site.eqn is not None:
                ins = program.eqns[site.eqn].ins
                operands = [
                    _sg(self.read_main(site.eqn, k, a))
                    for k, a in enumerate(ins)
                    if k != site.w_pos
                ]
                xs[u.name] = site.canonical_x(*operands)
            else:
                xs[u.name] = site.canonical_x()
        return Jacobians(
            D={group.name: D},
            Df={u.name: d for u, d in zip(units, Df)},
            x=xs,
            t=self.t,
            H=None if self.H is None else {group.name: self.H[group.name]},
        )

    def hook(self, g: int) -> None:
        """Advances group `g`'s traces and places its gradient hook."""
        c = self.c
        group = c.graph.groups[g]
        sub = c.graph.subgraph(group)
        sinks = c.regions.sinks[g]
        new_vals = [self.read_tail(s) for s in sinks]
        jac = self.jacobians(g)
        weights = [self.main[u.site.weight] for u in sub.units]
        if self.options.chunk is not None:
            out = chunk.hook(self, sub, group, jac, new_vals, weights)
        else:
            out = self._hook(sub, group, jac, new_vals, weights)
        for s, val in zip(sinks, out):
            if isinstance(s, int):
                self.hooked[s] = val

    def _hook(self, sub, group, jac, new_vals, weights) -> list[Any]:
        algorithm = self.algorithm
        mine = {u.name: self.traces[u.name] for u in sub.units}
        updated = jtu.tree_map(_sg, algorithm.update(sub, mine, jac))
        self.new_traces.update(updated)
        anchored = self.feedback and bool(sub.outputs.get(group.name))
        dtypes = [jnp.result_type(w) for w in weights]
        hook = read_out_hook(
            algorithm, sub, group, dtypes, anchored, self.options.summed
        )
        # Both the traces before and after the update: the read-out may use either
        # (`AbstractAlgorithm.reads_previous`); and the modulator, if any.
        modulator = None if self.modulators is None else self.modulators[group.name]
        pair = (jtu.tree_map(_sg, mine), updated, modulator)
        out = hook(new_vals, weights, pair, jtu.tree_map(_sg, jac))
        if anchored:
            out, anchor = out
            self.anchors.append(anchor)
            self.anchor_sizes.append((group.n, group.dtype))
        return out

    def run(self):
        """`(y, new state, new traces, records)`, evaluating in the compiled order."""
        c = self.c
        program = c.program
        eqns = program.eqns
        n_eqns = len(eqns)
        for node in c.plan.order:
            if node >= n_eqns:
                self.hook(node - n_eqns)
                continue
            if node in c.sites.cut_sites:
                continue  # evaluated on demand, with or without stop_gradient
            eqn = eqns[node]
            if node in c.regions.tail:
                outs = _ir.bind(eqn, *(self.read_tail(a) for a in eqn.ins))
                self.tail.update(zip(eqn.outs, outs))
            else:
                args = [self.read_main(node, pos, a) for pos, a in enumerate(eqn.ins)]
                self.main.update(zip(eqn.outs, _ir.bind(eqn, *args)))
        n_y = c.step.n_y
        y = [self.read(m, v) for m, v in zip(c.plan.out_modes, program.outvars[:n_y])]
        if self.anchors:
            from_target = self.algorithm.learning_signal == "target_feedback"
            hook = output_hook(self.algorithm.project, from_target, self.anchor_sizes)
            y = hook(y, self.anchors, self.target)
        new_state = []
        for v, aval in zip(program.outvars[n_y:], c.step.state_avals):
            val = (
                self.read_tail(v)
                if isinstance(v, int)
                else jnp.asarray(v.val, aval.dtype)
            )
            new_state.append(_sg(jnp.broadcast_to(val, aval.shape)))
        return y, new_state, self.new_traces, self.records
