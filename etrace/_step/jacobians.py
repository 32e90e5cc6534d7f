"""Every Jacobian the algorithms receive, from one evaluation of the step's
transition: per hidden group the diagonal `D` and each unit's `Df`; for the whole
hidden state the full `J`, the immediate `Jtheta`, products with them, and the
per-neuron diagonal blocks `H`.

All in reverse mode: surrogate spike functions are often `custom_vjp`, which
cannot be differentiated forwards."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import _ir
from .._analysis import Compiled
from .._errors import EtraceError


class Jacobians(eqx.Module):
    """The per-step quantities an algorithm's `update` and `gradients` receive.

    **Attributes:**

    - `D`: per hidden group name, `D[n, k, k']` = d h_k^t[n] / d h_{k'}^{t-1}[n] with
        weight outputs held fixed, shape `(N, K, K)`.
    - `Df`: per unit name, `Df[b, w, f, k]` = d h_k^t[n(b,w,f)] / d y^t[b, w, f],
        shape `(B, Fw, Fx, K)`.
    - `x`: per unit name, the weight op's input in canonical form `(B, Fx, C)`.
    - `t`: the index of this step since `init`/`reset` (`TraceState.t` before the
        step), for rules that depend on it (e.g. a warm-up bias correction).
    - `J`: for whole-state algorithms, the full hidden-to-hidden Jacobian
        `dh^t/dh^{t-1}` of shape `(H, H)` (through every weight), else `None`; a
        placeholder that raises an `EtraceError` when used if the algorithm declares
        `dense_jacobians = False`.
    - `Jtheta`: for whole-state algorithms, per parameter path the immediate Jacobian
        `dh^t/dtheta` of shape `(H, *theta.shape)`, else `None` (the same placeholder
        under `dense_jacobians = False`).
    - `H`: for algorithms that declare `full_diagonal = True` (`OSTLRecurrent`), per
        hidden group name the per-neuron diagonal blocks of the *full*
        hidden-to-hidden Jacobian, recurrent weights included, shape `(N, K, K)`;
        else `None`.
    - `jvp`: in a whole-state algorithm's `update`, `v -> J v` for `v` of shape
        `(H,)`, without forming `J`; else `None`.
    - `vjp`: in a whole-state algorithm's `update`, `u -> (u^T J, {path: u^T
        Jtheta[path]})` for `u` of shape `(H,)`, without forming either; else
        `None`. Together they cost a few passes over the step, where `J` and
        `Jtheta` take one pullback per hidden value.
    """

    D: dict[str, Any]
    Df: dict[str, Any]
    x: dict[str, Any]
    t: Any
    J: Any = None
    Jtheta: Any = None
    H: Any = None
    jvp: Any = eqx.field(default=None, static=True)
    vjp: Any = eqx.field(default=None, static=True)


class NotFormed(eqx.Module):
    """Stands for `jac.J` or `jac.Jtheta` when the algorithm declares
    `dense_jacobians = False`: any use of it raises an `EtraceError` that says so."""

    name: str = eqx.field(static=True)
    algorithm: str = eqx.field(static=True)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise EtraceError(
            f"jac.{self.name} is not formed for {self.algorithm}: it declares "
            "`dense_jacobians = False`. Use the products `jac.jvp(v)` (J v) and "
            "`jac.vjp(u)` (u^T J and u^T Jtheta), or declare `dense_jacobians = True` "
            f"to receive jac.{self.name}."
        )

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._refuse()

    __jax_array__ = __array__ = __getitem__ = __iter__ = __len__ = _refuse
    __matmul__ = __rmatmul__ = __add__ = __radd__ = __sub__ = __rsub__ = _refuse
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __neg__ = _refuse


def as_dtype(a: Any, dtype: Any) -> Any:
    """`a` in `dtype`, by its real part where `a` is complex and `dtype` real: in
    JAX's convention the gradient of a real parameter through complex values, and
    the derivative of a real value by a real one, are the real parts of the
    complex products."""
    if jnp.iscomplexobj(a) and not jnp.issubdtype(dtype, jnp.complexfloating):
        a = jnp.real(a)
    return a.astype(dtype)


def _real_dtype(arrays: list[Any]) -> Any:
    """The real dtype of the arrays' precision (float32 for complex64)."""
    return jnp.finfo(jnp.result_type(*arrays)).dtype


def _ones_per_state(k: int, hs: list[Any]) -> list[Any]:
    """`K` stacked cotangents, the `i`-th ones on state `i` and zeros elsewhere
    (each in its state's dtype)."""
    eye = jnp.eye(k, dtype=_real_dtype(hs))
    return [
        jnp.broadcast_to(
            eye[:, i].reshape((k,) + (1,) * h.ndim).astype(h.dtype), (k,) + h.shape
        )
        for i, h in enumerate(hs)
    ]


def group_jacobians(
    compiled: Compiled, g: int, prev: list[Any], site_vals: list[Any], fixed: dict
) -> tuple[Any, list[Any]]:
    """`D` and each unit's `Df` for hidden group `g`, from one pullback of its
    update: the update is neuron-local, so one cotangent of ones per state gives
    both diagonals exactly."""
    program = compiled.program
    group = compiled.graph.groups[g]
    units = [u for u in compiled.graph.units if u.group is group]
    sinks = compiled.regions.sinks[g]
    group_tail = compiled.regions.group_tail[g]
    state_vars = compiled.state_vars

    def update(hs, ys):
        env = dict(fixed)
        for j, h in zip(group.leaves, hs):
            env[state_vars[j]] = h
        for u, y in zip(units, ys):
            env[u.site.out] = y
        _ir.evaluate(program, group_tail, env)
        return [s.val if isinstance(s, _ir.Lit) else env[s] for s in sinks]

    hs = [jnp.asarray(h) for h in prev]
    _, pullback = jax.vjp(update, hs, site_vals)
    k = group.k
    ones = _ones_per_state(k, hs)
    dhs, dys = jax.vmap(pullback)(ones)
    if jnp.issubdtype(group.dtype, jnp.complexfloating):
        dhs, dys = _complex_derivatives(pullback, ones, hs, site_vals, dhs, dys)
    D = jnp.stack([jnp.reshape(d, (k, -1)).T.astype(group.dtype) for d in dhs], axis=-1)
    Df = [
        jnp.moveaxis(jax.vmap(u.site.canonical_y)(dy).astype(u.dtype), 0, -1)
        for u, dy in zip(units, dys)
    ]
    return D, Df


def _complex_derivatives(pullback, ones, hs, site_vals, dhs, dys):
    """The derivatives of complex states with respect to real inputs (previous
    real states, real weight outputs).

    A pullback gives the cotangent `c` of a value `z` in JAX's convention, where a
    change `dz` changes the loss by `Re(c dz)`. For a complex state that depends
    holomorphically on a complex input (as `lam * h + y`) the cotangent of ones is
    the derivative itself. For a real input `y` it is only the derivative's real
    part; the cotangent of `1j` gives minus its imaginary part, so the derivative
    is `pull(1) - 1j pull(1j)`. (A real state's cotangent stays real: zero in the
    second pass.)"""
    real_h = [not jnp.iscomplexobj(h) for h in hs]
    real_y = [not jnp.iscomplexobj(y) for y in site_vals]
    if not any(real_h) and not any(real_y):
        return dhs, dys
    second = [1j * o if jnp.iscomplexobj(o) else jnp.zeros_like(o) for o in ones]
    dhs_i, dys_i = jax.vmap(pullback)(second)

    def combine(ds, ds_i, real):
        return [d - 1j * d_i if r else d for d, d_i, r in zip(ds, ds_i, real)]

    return combine(dhs, dhs_i, real_h), combine(dys, dys_i, real_y)


def hidden_leaves(compiled: Compiled) -> list[int]:
    """Every hidden state leaf, in group order."""
    return [j for g in compiled.graph.groups for j in g.leaves]


def real_parts(hs: list[Any]) -> list[Any]:
    """The hidden leaves as real arrays: a complex leaf becomes its real part and
    its imaginary part (see `Graph.hidden_size`)."""
    out = []
    for h in hs:
        out += [jnp.real(h), jnp.imag(h)] if jnp.iscomplexobj(h) else [h]
    return out


def _from_parts(parts: list[Any], like: list[Any]) -> list[Any]:
    out, i = [], 0
    for h in like:
        if jnp.iscomplexobj(h):
            out.append(jax.lax.complex(parts[i], parts[i + 1]))
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return out


def transition(
    compiled: Compiled, dyn_leaves, state_leaves, x_leaves, real: bool = True
):
    """`(theta, h^{t-1}) -> h^t` for the parameters that reach a hidden state,
    and the point to evaluate it at (both under `stop_gradient`). With `real`,
    complex hidden leaves enter and leave as their real and imaginary parts, so
    the Jacobians are real and exact for any update, holomorphic or not."""
    program = compiled.program
    hidden = hidden_leaves(compiled)
    state_vars = compiled.state_vars
    sinks = [program.outvars[compiled.step.n_y + j] for j in hidden]
    order = sorted(compiled.joint.upstream)
    params = compiled.joint.params

    def step(ps, hs):
        env: dict[int, Any] = dict(program.consts)
        env.update(zip(program.invars, list(dyn_leaves) + state_leaves + x_leaves))
        for i, p in zip(params, ps):
            env[program.invars[i]] = p
        for j, h in zip(hidden, hs):
            env[state_vars[j]] = h
        _ir.evaluate(program, order, env)
        return [s.val if isinstance(s, _ir.Lit) else env[s] for s in sinks]

    sg = jax.lax.stop_gradient
    ps0 = [sg(dyn_leaves[i]) for i in params]
    hs0 = [sg(jnp.asarray(state_leaves[j])) for j in hidden]
    if not real:
        return step, ps0, hs0

    def real_step(ps, parts):
        return real_parts(step(ps, _from_parts(parts, hs0)))

    return real_step, ps0, real_parts(hs0)


def _unit_cotangents(new_hidden: list[Any]) -> list[Any]:
    size = sum(h.size for h in new_hidden)
    eye = jnp.eye(size, dtype=_real_dtype(new_hidden))
    offsets = [0]
    for h in new_hidden:
        offsets.append(offsets[-1] + h.size)
    return [
        eye[:, a:b].reshape((size,) + h.shape).astype(h.dtype)
        for a, b, h in zip(offsets[:-1], offsets[1:], new_hidden)
    ]


def _rows(d_prev: list[Any], size: int) -> Any:
    return jnp.concatenate([jnp.reshape(d, (size, -1)) for d in d_prev], axis=1)


def full_jacobians(compiled: Compiled, dyn_leaves, state_leaves, x_leaves):
    """`J = dh^t/dh^{t-1}` `(H, H)` and, per parameter path, `dh^t/dtheta`: one
    pullback per hidden value (vmapped)."""
    step, ps0, hs0 = transition(compiled, dyn_leaves, state_leaves, x_leaves)
    new_hidden, pullback = jax.vjp(step, ps0, hs0)
    size = compiled.graph.hidden_size
    if not size:  # no parameter reaches a hidden state: nothing to carry
        return jnp.zeros((0, 0)), {path: None for path, _, _ in compiled.graph.params}
    d_params, d_prev = jax.vmap(pullback)(_unit_cotangents(new_hidden))
    Jtheta = {path: d for (path, _, _), d in zip(compiled.graph.params, d_params)}
    return _rows(d_prev, size), Jtheta


def transition_products(compiled: Compiled, dyn_leaves, state_leaves, x_leaves):
    """`v -> J v` and `u -> (u^T J, {path: u^T dh^t/dtheta})` for flat vectors of
    length `H`, without forming either Jacobian: one linearisation of the step, its
    pullback for `u^T`, and the pullback's transpose for `J v`."""
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
    step, ps0, hs0 = transition(compiled, dyn_leaves, state_leaves, x_leaves)
    new_hidden, pullback = jax.vjp(step, ps0, hs0)
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

    transposed = jax.linear_transpose(lambda u: pullback(u)[1], new_hidden)

    def jvp(v):
        (out,) = transposed(split(checked("jvp", v), hs0))
        return join(out)

    return jvp, vjp


def diagonal_blocks(compiled: Compiled, dyn_leaves, state_leaves, x_leaves):
    """Per group name, `H[n, k, k'] = d h_k^t[n] / d h_{k'}^{t-1}[n]` through every
    path of the step (recurrent weights included): the per-neuron diagonal blocks of
    the full hidden-to-hidden Jacobian."""
    step, ps0, hs0 = transition(
        compiled, dyn_leaves, state_leaves, x_leaves, real=False
    )
    new_hidden, pullback = jax.vjp(lambda hs: step(ps0, hs), hs0)
    size = sum(h.size for h in new_hidden)
    if not size:
        return {}
    (d_prev,) = jax.vmap(pullback)(_unit_cotangents(new_hidden))
    J = _rows(d_prev, size)
    out = {}
    start = 0
    for g in compiled.graph.groups:
        n, k = g.n, g.k
        block = J[start : start + n * k, start : start + n * k].reshape(k, n, k, n)
        out[g.name] = as_dtype(jnp.einsum("anbn->nab", block), g.dtype)
        start += n * k
    return out
