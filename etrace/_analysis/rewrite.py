"""Rewrites of a traced step that put weights where the compiler can trace them.

Both rewrites compute the same values as the model (up to rounding) and only move
where a parameter enters:

* `broadcast_shared`: a parameter-only operand broadcast *inside* an element-wise
  equation (a scalar decay times the state, a per-channel bias added to every
  position) gets an explicit `broadcast_in_dim`, so the element-wise site is the
  broadcast value, one element per neuron. Its trace is kept per neuron; autodiff
  sums the gradient back over the positions that share the parameter.
* `reassociate`: `A @ (B @ x)` with parameter-only `A` and `B` (a low-rank factor
  pair, a shared down-projection) becomes `(A @ B) @ x`, so that both factors are
  read out of one exact trace of the product instead of `B` being learned one-step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from .. import _ir
from .._interpret import ELEMENTWISE


def _spliced(
    program: _ir.Program, fn: Callable[..., Any], operands: list[_ir.Operand]
) -> tuple[list[_ir.Eqn], int]:
    """The equations of `fn` applied to `operands`, with fresh variable ids in
    `program`; returns them and the id of the result."""
    avals = [program.aval(a) for a in operands]
    closed = jax.make_jaxpr(fn)(
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals)
    )
    builder = _ir._Builder()
    builder.count = max(program.avals, default=0)
    env: dict[Any, _ir.Operand] = dict(zip(closed.jaxpr.invars, operands))
    for var, val in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = builder.const(val, var.aval)
    builder.walk(closed.jaxpr, env)
    program.avals.update(builder.avals)
    program.consts.update(builder.consts)
    (out,) = closed.jaxpr.outvars
    result = env[out]
    assert isinstance(result, int)
    return builder.eqns, result


def _rebuilt(program: _ir.Program, eqns: list[_ir.Eqn]) -> _ir.Program:
    producer = {o: i for i, e in enumerate(eqns) for o in e.outs}
    return _ir.Program(
        program.invars,
        program.outvars,
        program.consts,
        eqns,
        program.avals,
        producer,
    )


def broadcast_shared(
    program: _ir.Program, param_only: Callable[[Any], bool], dynamic: Callable
) -> _ir.Program:
    eqns: list[_ir.Eqn] = []
    changed = False
    for e in program.eqns:
        if e.name not in ELEMENTWISE or not any(dynamic(a) for a in e.ins):
            eqns.append(e)
            continue
        shape = tuple(program.aval(e.outs[0]).shape)
        ins = list(e.ins)
        for k, a in enumerate(ins):
            a_shape = tuple(program.aval(a).shape)
            if not param_only(a) or a_shape == shape:
                continue
            if len(a_shape) not in (0, len(shape)):
                continue
            dims = tuple(range(len(a_shape)))
            new, out = _spliced(
                program,
                lambda v, dims=dims: lax.broadcast_in_dim(v, shape, dims),
                [a],
            )
            eqns.extend(new)
            ins[k] = out
            changed = True
        eqns.append(_ir.Eqn(e.prim, tuple(ins), e.outs, e.params, e.source))
    return _rebuilt(program, eqns) if changed else program


def _consumers(program: _ir.Program) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for i, e in enumerate(program.eqns):
        for a in e.ins:
            if isinstance(a, int):
                users.setdefault(a, []).append(i)
    return users


def _product_weight(e: _ir.Eqn, param_only, dynamic) -> int | None:
    """The weight position of a plain (batch-free) product `W . x`, else `None`."""
    if e.name != "dot_general":
        return None
    (_, _), (lb, rb) = e.params["dimension_numbers"]
    if lb or rb:
        return None
    for w in (0, 1):
        if param_only(e.ins[w]) and dynamic(e.ins[1 - w]):
            return w
    return None


def _composed(program: _ir.Program, outer: _ir.Eqn, wo: int, inner: _ir.Eqn, wi: int):
    """`(A . B) . x` for `outer = A . z` and `inner = z = B . x`, or `None` when
    the outer product contracts more of `z` than `B`'s own dimensions."""
    (ilc, irc), _ = inner.params["dimension_numbers"]
    b_con, x_con = (ilc, irc) if wi == 0 else (irc, ilc)
    b_rank = len(program.aval(inner.ins[wi]).shape)
    x_rank = len(program.aval(inner.ins[1 - wi]).shape)
    b_free = [d for d in range(b_rank) if d not in b_con]
    x_free = [d for d in range(x_rank) if d not in x_con]
    # z's dimensions that come from B's free dimensions, and which ones.
    start = 0 if wi == 0 else len(x_free)
    from_b = {start + k: d for k, d in enumerate(b_free)}
    (olc, orc), _ = outer.params["dimension_numbers"]
    a_con, z_con = (olc, orc) if wo == 0 else (orc, olc)
    if set(z_con) != set(from_b):
        return None
    a_rank = len(program.aval(outer.ins[wo]).shape)
    a_free = [d for d in range(a_rank) if d not in a_con]
    b_paired = tuple(from_b[z] for z in z_con)
    w_dims = (((tuple(a_con)), b_paired), ((), ()))
    b_rest = [d for d in range(b_rank) if d not in b_paired]
    w_con = tuple(len(a_free) + b_rest.index(d) for d in b_con)
    precision = outer.params.get("precision")
    preferred = outer.params.get("preferred_element_type")
    if wo == 0:
        y_dims = ((w_con, tuple(x_con)), ((), ()))
    else:
        y_dims = ((tuple(x_con), w_con), ((), ()))

    def weight(a, b):
        return lax.dot_general(a, b, w_dims, precision=precision)

    def product(w, x):
        if wo == 0:
            return lax.dot_general(
                w, x, y_dims, precision=precision, preferred_element_type=preferred
            )
        return lax.dot_general(
            x, w, y_dims, precision=precision, preferred_element_type=preferred
        )

    w_eqns, w_var = _spliced(program, weight, [outer.ins[wo], inner.ins[wi]])
    y_eqns, y_var = _spliced(program, product, [w_var, inner.ins[1 - wi]])
    last = y_eqns[-1]
    got, want = program.aval(y_var), program.aval(outer.outs[0])
    if y_var not in last.outs or (got.shape, got.dtype) != (want.shape, want.dtype):
        return None
    # The product writes the outer equation's own output variable.
    last = _ir.Eqn(last.prim, last.ins, outer.outs, last.params, outer.source)
    return w_eqns + y_eqns[:-1] + [last]


def _feeds_state(program: _ir.Program, n_state: int) -> set[int]:
    """The equations the new state depends on."""
    stack = [v for v in program.outvars[len(program.outvars) - n_state :]]
    seen: set[int] = set()
    eqns: set[int] = set()
    while stack:
        v = stack.pop()
        if not isinstance(v, int) or v in seen:
            continue
        seen.add(v)
        p = program.producer.get(v)
        if p is not None and p not in eqns:
            eqns.add(p)
            stack.extend(program.eqns[p].ins)
    return eqns


def reassociate(
    program: _ir.Program,
    param_only: Callable[[Any], bool],
    dynamic: Callable,
    n_state: int,
) -> _ir.Program:
    """Only products that the new state depends on are re-associated: in a readout
    the product of the factors would cost more and gain nothing."""
    users = _consumers(program)
    upstream = _feeds_state(program, n_state)
    outputs = {v for v in program.outvars if isinstance(v, int)}
    replace: dict[int, list[_ir.Eqn]] = {}
    drop: set[int] = set()
    for j, inner in enumerate(program.eqns):
        wi = _product_weight(inner, param_only, dynamic)
        if wi is None or j in replace:
            continue
        (z,) = inner.outs
        readers = users.get(z, [])
        if not readers or z in outputs:
            continue
        plans = {}
        for i in readers:
            outer = program.eqns[i]
            wo = _product_weight(outer, param_only, dynamic)
            if wo is None or outer.ins[1 - wo] != z or i in replace:
                break
            if i not in upstream:
                break
            got = _composed(program, outer, wo, inner, wi)
            if got is None:
                break
            plans[i] = got
        else:
            replace.update(plans)
            drop.add(j)
    if not replace:
        return program
    eqns: list[_ir.Eqn] = []
    for i, e in enumerate(program.eqns):
        if i in drop:
            continue
        eqns.extend(replace.get(i, [e]))
    return _rebuilt(program, eqns)
