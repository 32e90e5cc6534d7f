"""One step for whole-state algorithms (RTRL and its relatives).

These algorithms keep `M = dh/dtheta` for the whole hidden vector `h` (every hidden
group, flattened, in group order) and read gradients out as `c^T M`, with `c` the
gradient of this step's loss with respect to the new hidden state *holding the other
hidden values fixed*. So, unlike the per-group routing of `_runtime`, every
computation upstream of a hidden state runs with parameters under `stop_gradient`,
and one hook over all hidden values (placed after the last of them) hands `c` to
the read-out.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _ir
from ._compiler import Compiled
from ._errors import EtraceError
from ._runtime import (
    batch_summed,
    capability,
    gradient_hook,
    Jacobians,
    NotFormed,
)


def _hidden_leaves(compiled: Compiled) -> list[int]:
    return [j for g in compiled.graph.groups for j in g.leaves]


def _joint_hook(algorithm: Any, graph: Any, dtypes: list[Any]):
    def signal(cot):
        return {"hidden": jnp.concatenate([jnp.reshape(c, (-1,)) for c in cot])}

    def to_params(grads):
        return [
            grads[path].astype(dt) for (path, _, _), dt in zip(graph.params, dtypes)
        ]

    def read_out(traces, jac, cot, anchor_cot):
        del anchor_cot
        return to_params(algorithm.gradients(graph, traces, signal(cot), jac))

    def summed(traces, jac, cot, anchor_cot):
        del anchor_cot
        signals = jax.vmap(signal)(cot)
        return to_params(algorithm.summed_gradients(graph, traces, signals, jac))

    return gradient_hook(batch_summed(read_out, summed))


def _transition(compiled, dyn_leaves, state_leaves, x_leaves):
    """`(theta, h^{t-1}) -> h^t` for the parameters that reach a hidden state."""
    program = compiled.program
    hidden = _hidden_leaves(compiled)
    state_vars = compiled.state_vars
    sinks = [program.outvars[compiled.n_y + j] for j in hidden]
    order = sorted(compiled.anc_all)

    def transition(ps, hs):
        env: dict[int, Any] = dict(program.consts)
        env.update(zip(program.invars, list(dyn_leaves) + state_leaves + x_leaves))
        for i, p in zip(compiled.joint_params, ps):
            env[program.invars[i]] = p
        for j, h in zip(hidden, hs):
            env[state_vars[j]] = h
        _ir.evaluate(program, order, env)
        return [s.val if isinstance(s, _ir.Lit) else env[s] for s in sinks]

    sg = jax.lax.stop_gradient
    ps0 = [sg(dyn_leaves[i]) for i in compiled.joint_params]
    hs0 = [sg(state_leaves[j]) for j in hidden]
    return transition, ps0, hs0


def _unit_cotangents(compiled, new_hidden):
    size = compiled.graph.hidden_size
    eye = jnp.eye(size, dtype=compiled.graph.groups[0].dtype)
    offsets = [0]
    for h in new_hidden:
        offsets.append(offsets[-1] + h.size)
    return [
        eye[:, a:b].reshape((size,) + h.shape)
        for a, b, h in zip(offsets[:-1], offsets[1:], new_hidden)
    ]


def full_jacobians(compiled, dyn_leaves, state_leaves, x_leaves):
    """`J = dh^t/dh^{t-1}` `(H, H)` and, per parameter path, `dh^t/dtheta`.

    One pullback per hidden value (vmapped), in reverse mode so that `custom_vjp`
    surrogates work.
    """
    transition, ps0, hs0 = _transition(compiled, dyn_leaves, state_leaves, x_leaves)
    new_hidden, pullback = jax.vjp(transition, ps0, hs0)
    size = compiled.graph.hidden_size
    if not size:  # no parameter reaches a hidden state: nothing to carry
        return jnp.zeros((0, 0)), {path: None for path, _, _ in compiled.graph.params}
    d_params, d_prev = jax.vmap(pullback)(_unit_cotangents(compiled, new_hidden))
    J = jnp.concatenate([jnp.reshape(d, (size, -1)) for d in d_prev], axis=1)
    Jtheta = {path: d for (path, _, _), d in zip(compiled.graph.params, d_params)}
    return J, Jtheta


def transition_products(compiled, dyn_leaves, state_leaves, x_leaves):
    """`v -> J v` and `u -> (u^T J, {path: u^T dh^t/dtheta})` for flat vectors of
    length `H`, without forming either Jacobian: one linearisation of the step, its
    pullback for `u^T`, and the pullback's transpose for `J v` (reverse mode
    throughout, so that `custom_vjp` surrogates work)."""
    graph = compiled.graph
    size = graph.hidden_size

    def checked(name, v):
        if jnp.shape(v) != (size,):
            raise EtraceError(
                f"`jac.{name}` takes a flat vector over the whole hidden state, "
                f"shape ({size},); got shape {jnp.shape(v)}. Flatten the hidden "
                "values in group order (as `signal['hidden']` is)."
            )
        return v

    if not size:  # no parameter reaches a hidden state
        zeros = {path: jnp.zeros(shape, dt) for path, shape, dt in graph.params}
        return (lambda v: checked("jvp", v)), (lambda u: (checked("vjp", u), zeros))
    transition, ps0, hs0 = _transition(compiled, dyn_leaves, state_leaves, x_leaves)
    new_hidden, pullback = jax.vjp(transition, ps0, hs0)
    paths = [path for path, _, _ in graph.params]

    def split(v, like):
        out, start = [], 0
        for h in like:
            out.append(jnp.reshape(v[start : start + h.size], h.shape).astype(h.dtype))
            start += h.size
        return out

    def join(parts):
        return jnp.concatenate([jnp.reshape(a, (-1,)) for a in parts])

    def vjp(u):
        d_params, d_prev = pullback(split(checked("vjp", u), new_hidden))
        return join(d_prev), dict(zip(paths, d_params))

    def hidden_pullback(u_parts):
        return pullback(u_parts)[1]

    transposed = jax.linear_transpose(hidden_pullback, new_hidden)

    def jvp(v):
        (out,) = transposed(split(checked("jvp", v), hs0))
        return join(out)

    return jvp, vjp


def diagonal_blocks(compiled, dyn_leaves, state_leaves, x_leaves):
    """Per group name, `H[n, k, k'] = d h_k^t[n] / d h_{k'}^{t-1}[n]` through every
    path of the step (recurrent weights included): the per-neuron diagonal blocks of
    the full hidden-to-hidden Jacobian."""
    transition, ps0, hs0 = _transition(compiled, dyn_leaves, state_leaves, x_leaves)
    new_hidden, pullback = jax.vjp(lambda hs: transition(ps0, hs), hs0)
    if not compiled.graph.hidden_size:
        return {}
    (d_prev,) = jax.vmap(pullback)(_unit_cotangents(compiled, new_hidden))
    size = compiled.graph.hidden_size
    J = jnp.concatenate([jnp.reshape(d, (size, -1)) for d in d_prev], axis=1)
    out = {}
    start = 0
    for g in compiled.graph.groups:
        n, k = g.n, g.k
        block = J[start : start + n * k, start : start + n * k].reshape(k, n, k, n)
        out[g.name] = jnp.einsum("anbn->nab", block)
        start += n * k
    return out


def run_step_joint(compiled, algorithm, dyn_leaves, state_leaves, x_leaves, traces, t):
    program = compiled.program
    eqns = program.eqns
    anc = compiled.anc_all
    sg = jax.lax.stop_gradient
    hidden = _hidden_leaves(compiled)
    out_state = program.outvars[compiled.n_y :]
    sinks = [out_state[j] for j in hidden]
    main: dict[int, Any] = dict(program.consts)
    main.update(zip(program.invars, list(dyn_leaves) + state_leaves + x_leaves))
    upstream: dict[int, Any] = {}
    live: dict[int, Any] = {}

    def is_param_only(i: int) -> bool:
        return all(o in compiled.param_only_vars for o in eqns[i].outs)

    def read_up(a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        if a in compiled.param_only_vars:
            return sg(main[a])
        return upstream[a] if a in upstream else main[a]

    # 1. Everything upstream of a hidden state, parameters under stop_gradient.
    for i in sorted(anc):
        e = eqns[i]
        if is_param_only(i):
            # Parameter-only values stay live; constants computed in the step (a
            # broadcast zero, a converted mask) may have been put upstream.
            args = (upstream[a] if a in upstream else _plain(main, a) for a in e.ins)
            main.update(zip(e.outs, _ir.bind(e, *args)))
        else:
            upstream.update(zip(e.outs, _ir.bind(e, *(read_up(a) for a in e.ins))))

    # 2. The transition h^{t-1}, theta -> h^t, and its full Jacobians.
    params = [dyn_leaves[i] for i in compiled.joint_params]
    if capability(algorithm, "dense_jacobians", True):
        J, Jtheta = full_jacobians(compiled, dyn_leaves, state_leaves, x_leaves)
    else:
        name = type(algorithm).__name__
        J, Jtheta = NotFormed("J", name), NotFormed("Jtheta", name)
    jac = Jacobians(D={}, Df={}, x={}, t=t, J=J, Jtheta=Jtheta)

    # Linearised here, outside any transformation `update` applies to the products
    # (a `vmap` over many vectors); XLA drops it if `update` takes none.
    jvp, vjp = transition_products(compiled, dyn_leaves, state_leaves, x_leaves)
    with_products = Jacobians(
        D={}, Df={}, x={}, t=t, J=J, Jtheta=Jtheta, jvp=jvp, vjp=vjp
    )
    update = algorithm.update(compiled.graph, traces, with_products)
    new_traces = jtu.tree_map(sg, update)

    # 3. One hook over all hidden values; everything downstream reads through it.
    upstream_sinks = [read_up(s) for s in sinks]
    hook = _joint_hook(algorithm, compiled.graph, [jnp.result_type(p) for p in params])
    hooked: dict[int, Any] = {}
    if sinks:
        hooked_vals = hook(upstream_sinks, params, new_traces, jtu.tree_map(sg, jac))
        hooked = {s: v for s, v in zip(sinks, hooked_vals) if isinstance(s, int)}

    def read_live(a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        p = program.producer.get(a)
        if p is None or p not in anc or a in compiled.param_only_vars:
            return main[a]
        if a not in live:
            e = eqns[p]
            live.update(zip(e.outs, _ir.bind(e, *(read_live(b) for b in e.ins))))
        return live[a]

    def read_down(a: _ir.Operand) -> Any:
        if isinstance(a, _ir.Lit):
            return a.val
        if a in hooked:
            return hooked[a]
        if a in upstream:
            return read_live(a)
        return main[a]

    for i in range(len(eqns)):
        if i in anc:
            continue
        e = eqns[i]
        main.update(zip(e.outs, _ir.bind(e, *(read_down(a) for a in e.ins))))

    y = [read_down(v) for v in program.outvars[: compiled.n_y]]
    new_state = []
    for v, aval in zip(out_state, compiled.state_avals):
        if isinstance(v, _ir.Lit):
            val = jnp.asarray(v.val, aval.dtype)
        else:
            val = upstream[v] if v in upstream else main[v]
        new_state.append(sg(jnp.broadcast_to(val, aval.shape)))
    return y, new_state, new_traces


def _plain(env: dict[int, Any], a: _ir.Operand) -> Any:
    return a.val if isinstance(a, _ir.Lit) else env[a]
