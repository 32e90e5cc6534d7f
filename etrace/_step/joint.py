"""One step for whole-state algorithms (RTRL and its relatives).

These algorithms keep `M = dh/dtheta` for the whole hidden vector `h` (every hidden
group, flattened, in group order) and read gradients out as `c^T M`, with `c` the
gradient of this step's loss with respect to the new hidden state *holding the other
hidden values fixed*. So, unlike the per-group routing, every computation upstream
of a hidden state runs with parameters under `stop_gradient`, and one hook over all
hidden values (placed after the last of them) hands `c` to the read-out.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _ir
from .._analysis import Compiled
from .hooks import gradient_hook, summed_over_batch
from .jacobians import (
    as_dtype,
    full_jacobians,
    hidden_leaves,
    Jacobians,
    NotFormed,
    site_jacobians,
    transition_products,
)


_sg = jax.lax.stop_gradient


def _joint_hook(algorithm: Any, graph: Any, dtypes: list[Any], summed: bool):
    def signal(cot):
        # A complex value `z = u + iv` with cotangent `c` changes the loss by
        # `Re(c dz) = Re(c) du - Im(c) dv`: its parts' cotangents.
        flat = []
        for c in cot:
            c = jnp.reshape(c, (-1,))
            flat += [jnp.real(c), -jnp.imag(c)] if jnp.iscomplexobj(c) else [c]
        return {"hidden": jnp.concatenate(flat)}

    def to_params(grads):
        return [
            as_dtype(grads[path], dt) for (path, _, _), dt in zip(graph.params, dtypes)
        ]

    def read_out(traces, jac, cot, anchor_cot):
        del anchor_cot
        return to_params(algorithm.gradients(graph, traces, signal(cot), jac))

    def batch_read_out(traces, jac, cot, anchor_cot):
        del anchor_cot
        signals = jax.vmap(signal)(cot)
        return to_params(algorithm.summed_gradients(graph, traces, signals, jac))

    return gradient_hook(summed_over_batch(read_out, batch_read_out, summed))


def _plain(env: dict[int, Any], a: _ir.Operand) -> Any:
    return a.val if isinstance(a, _ir.Lit) else env[a]


class JointStep:
    """The evaluation of one step: everything upstream of a hidden state with
    parameters under `stop_gradient`, the traces' update, one hook over every new
    hidden value, then the rest of the step reading through it."""

    def __init__(self, compiled: Compiled, algorithm, inputs, traces, t, options):
        self.c = compiled
        self.algorithm = algorithm
        self.traces = traces
        self.t = t
        self.options = options
        n_dyn, n_state = compiled.step.n_dyn, len(compiled.step.state_avals)
        self.dyn = list(inputs[:n_dyn])
        self.state = list(inputs[n_dyn : n_dyn + n_state])
        self.x = list(inputs[n_dyn + n_state :])
        self.main: dict[int, Any] = dict(compiled.program.consts)
        self.main.update(zip(compiled.program.invars, inputs))
        self.upstream: dict[int, Any] = {}
        self.live: dict[int, Any] = {}
        self.hooked: dict[int, Any] = {}

    def read_up(self, a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        if a in self.c.joint.param_only:
            return _sg(self.main[a])
        return self.upstream[a] if a in self.upstream else self.main[a]

    def read_live(self, a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        if a in self.hooked:
            # A new hidden value, read on the way to a value recomputed with live
            # parameters (`W @ h1` read by the output and by the next layer): its
            # gradient is the traces', as for any other reader of it.
            return self.hooked[a]
        p = self.c.program.producer.get(a)
        if p is None or p not in self.c.joint.upstream or a in self.c.joint.param_only:
            return self.main[a]
        if a not in self.live:
            e = self.c.program.eqns[p]
            outs = _ir.bind(e, *(self.read_live(b) for b in e.ins))
            self.live.update(zip(e.outs, outs))
        return self.live[a]

    def read_down(self, a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        if a in self.hooked:
            return self.hooked[a]
        if a in self.upstream:
            return self.read_live(a)
        return self.main[a]

    def run_upstream(self) -> None:
        """Everything upstream of a hidden state, parameters under stop_gradient."""
        joint = self.c.joint
        eqns = self.c.program.eqns
        for i in sorted(joint.upstream):
            e = eqns[i]
            if all(o in joint.param_only for o in e.outs):
                # Parameter-only values stay live; constants computed in the step
                # (a broadcast zero, a converted mask) may have been put upstream.
                args = [
                    self.upstream[a] if a in self.upstream else _plain(self.main, a)
                    for a in e.ins
                ]
                self.main.update(zip(e.outs, _ir.bind(e, *args)))
            else:
                args = [self.read_up(a) for a in e.ins]
                self.upstream.update(zip(e.outs, _ir.bind(e, *args)))

    def jacobians(self) -> tuple[Jacobians, Jacobians]:
        """The step's Jacobians, without and with the products `jvp`, `vjp`."""
        c, algorithm = self.c, self.algorithm
        at = (c, self.dyn, self.state, self.x)
        if algorithm.dense_jacobians:
            J, Jtheta = full_jacobians(*at)
        else:
            name = type(algorithm).__name__
            J, Jtheta = NotFormed("J", name), NotFormed("Jtheta", name)
        sinks = [c.program.outvars[c.step.n_y :][j] for j in hidden_leaves(c)]
        parts = [jnp.reshape(self.read_up(v), (-1,)) for v in sinks]
        h = jnp.concatenate(parts) if parts else jnp.zeros((0,))
        jac = Jacobians(D={}, Df={}, x={}, t=self.t, J=J, Jtheta=Jtheta, h=h)
        # Linearised here, outside any transformation `update` applies to the
        # products (a `vmap` over many vectors); XLA drops it if `update` takes none.
        jvp, vjp = transition_products(*at)
        xs, Df = site_jacobians(*at) if algorithm.site_jacobians else ({}, {})
        products = Jacobians(
            D={}, Df=Df, x=xs, t=self.t, J=J, Jtheta=Jtheta, h=h, jvp=jvp, vjp=vjp
        )
        return jac, products

    def run(self):
        c = self.c
        program = c.program
        self.run_upstream()
        jac, products = self.jacobians()
        new_traces = jtu.tree_map(
            _sg, self.algorithm.update(c.graph, self.traces, products)
        )
        new_state_vars = program.outvars[c.step.n_y :]
        sinks = [new_state_vars[j] for j in hidden_leaves(c)]
        if sinks:
            params = [self.dyn[i] for i in c.joint.params]
            dtypes = [jnp.result_type(p) for p in params]
            hook = _joint_hook(self.algorithm, c.graph, dtypes, self.options.summed)
            vals = hook(
                [self.read_up(s) for s in sinks],
                params,
                new_traces,
                jtu.tree_map(_sg, jac),
            )
            self.hooked = {s: v for s, v in zip(sinks, vals) if isinstance(s, int)}
        for i, e in enumerate(program.eqns):
            if i not in c.joint.upstream:
                outs = _ir.bind(e, *(self.read_down(a) for a in e.ins))
                self.main.update(zip(e.outs, outs))
        y = [self.read_down(v) for v in program.outvars[: c.step.n_y]]
        new_state = []
        for v, aval in zip(new_state_vars, c.step.state_avals):
            if isinstance(v, _ir.Lit):
                val = jnp.asarray(v.val, aval.dtype)
            else:
                val = self.upstream[v] if v in self.upstream else self.main[v]
            new_state.append(_sg(jnp.broadcast_to(val, aval.shape)))
        return y, new_state, new_traces, {}
