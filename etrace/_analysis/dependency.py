"""Structural dependency patterns of one step, for sparse whole-state algorithms.

`SnAp` keeps the sensitivities that the structure of the step can make non-zero.
Evaluating Jacobians at sample points would miss entries that are zero there by
accident of the values: the derivative of a readout with respect to its weight is
the presynaptic spike, zero for a neuron that happened not to fire. This module
instead propagates, element by element, *which* previous hidden values and parameter
elements each value of the step depends on. Each variable carries a sparse boolean
matrix `(elements, sources)`; each primitive maps its inputs' rows to its outputs'
rows exactly for element-wise, layout, reduction and product primitives, to the
whole row for cumulative ones, and conservatively (every output element depends on
every input element) otherwise, so the pattern is always a superset of the true
one. It is a domain of `etrace._interpret`, whose table of primitives it shares with
the neuron-label domain.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse

from .. import _interpret, _ir


def _rows(dep: Any, index: np.ndarray) -> Any:
    """Rows `index` of `dep` (`-1` gives an empty row)."""
    index = np.asarray(index).ravel()
    padded = sparse.vstack([dep, sparse.csr_matrix((1, dep.shape[1]), dtype=bool)])
    return padded.tocsr()[np.where(index < 0, dep.shape[0], index)]


def _union(parts: list[Any], n: int, s: int) -> Any:
    out = sparse.csr_matrix((n, s), dtype=bool)
    for p in parts:
        out = out + p
    return out.astype(bool).tocsr()


class _Dependencies(_interpret.AbstractInterpreter):
    """The dependency-pattern domain: per variable, its dependency rows, a boolean
    matrix `(elements, sources)`. A structural zero (`_interpret.Zeros`: `mask * W`
    is zero where the constant `mask` is) depends on nothing."""

    def __init__(self, program: _ir.Program, n_sources: int):
        super().__init__(program)
        self.s = n_sources
        self.zeros = _interpret.Zeros(program)

    def size(self, v: _ir.Operand) -> int:
        return int(np.prod(self.shape(v), dtype=int))

    def store(self, eqn: _ir.Eqn, outs: list[Any]) -> None:
        # Every equation's zeros, in order: each then reads its operands' zeros
        # from the cache instead of walking back through the update.
        for o, d in zip(eqn.outs, outs):
            nz = self.zeros.get(o)
            if d is None:
                continue
            if not nz.all():
                d = _rows(d, np.where(nz.ravel(), np.arange(nz.size), -1))
            self.env[o] = d

    def other(self, eqn: _ir.Eqn) -> list[Any]:
        """Every output element depends on every input element."""
        rows = [d for d in map(self.get, eqn.ins) if d is not None]
        one = _union([sparse.csr_matrix(d.sum(axis=0) > 0) for d in rows], 1, self.s)
        return [
            _rows(one, np.zeros(self.size(o), np.int64)).astype(bool) for o in eqn.outs
        ]

    def elementwise(self, eqn: _ir.Eqn) -> list[Any]:
        out_shape = self.shape(eqn.outs[0])
        parts = []
        for v in eqn.ins:
            d = self.get(v)
            if d is None:
                continue
            shape = self.shape(v)
            index = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
            if len(shape) < len(out_shape):
                index = index.reshape((1,) * (len(out_shape) - len(shape)) + shape)
            parts.append(_rows(d, np.broadcast_to(index, out_shape)))
        return [_union(parts, int(np.prod(out_shape, dtype=int)), self.s)]

    def layout(self, eqn: _ir.Eqn) -> list[Any]:
        args, stacked, offset = [], [], 0
        for v, role in zip(eqn.ins, _interpret.operand_roles(eqn)):
            d = self.get(v)
            if role is _interpret.Role.DATA:
                size = self.size(v)
                args.append(
                    jnp.asarray(offset + np.arange(size).reshape(self.shape(v)))
                )
                stacked.append(
                    d
                    if d is not None
                    else sparse.csr_matrix((size, self.s), dtype=bool)
                )
                offset += size
            elif role is _interpret.Role.FILL:
                args.append(jnp.asarray(-1, args[0].dtype))
            else:
                val = None if d is not None else self.static(v)
                if val is None:
                    return self.other(eqn)
                args.append(jnp.asarray(val))
        try:
            with jax.ensure_compile_time_eval():
                outs = _ir.bind(eqn, *args)
        except Exception:  # e.g. a fill value the integer labels cannot hold
            return self.other(eqn)
        dep = sparse.vstack(stacked).tocsr()
        return [_rows(dep, np.asarray(o)) for o in outs]

    def _along(self, eqn: _ir.Eqn, groups: np.ndarray) -> Any:
        """Output element `r` depends on the input elements `groups[r]`."""
        dep = self.get(eqn.ins[0])
        n_out = groups.shape[0]
        member = sparse.csr_matrix(
            (
                np.ones(groups.size, bool),
                (np.repeat(np.arange(n_out), groups.shape[1]), groups.ravel()),
            ),
            shape=(n_out, dep.shape[0]),
        )
        return (member @ dep).astype(bool).tocsr()

    def reduction(self, eqn: _ir.Eqn) -> list[Any]:
        shape = self.shape(eqn.ins[0])
        axes = tuple(eqn.params["axes"])
        keep = tuple(i for i in range(len(shape)) if i not in axes)
        index = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
        n_out = int(np.prod([shape[i] for i in keep], dtype=int))
        return [self._along(eqn, np.transpose(index, keep + axes).reshape(n_out, -1))]

    def cumulative(self, eqn: _ir.Eqn) -> list[Any]:
        """Each output element depends on its whole row along the axis (a superset
        of the prefix it combines), as the label domain joins it."""
        shape = self.shape(eqn.ins[0])
        axis = eqn.params["axis"]
        index = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
        index = np.moveaxis(index, axis, -1)
        rows = np.broadcast_to(index[..., None, :], index.shape + (shape[axis],))
        return [self._along(eqn, np.moveaxis(rows, -2, axis).reshape(index.size, -1))]

    def contraction(self, eqn: _ir.Eqn) -> list[Any]:
        """`out[b, i, j]` depends on `lhs[b, i, c]` where `rhs[b, c, j]` can be
        non-zero, and on `rhs[b, c, j]` where `lhs[b, i, c]` can."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        out_shape = self.shape(eqn.outs[0])
        n_out = int(np.prod(out_shape, dtype=int))
        index = []
        for v, c, b in zip(eqn.ins, (lc, rc), (lb, rb)):
            shape = self.shape(v)
            free = tuple(i for i in range(len(shape)) if i not in c and i not in b)
            flat = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
            moved = np.transpose(flat, tuple(b) + free + tuple(c))
            kept = moved.shape[: len(b) + len(free)]
            index.append(moved.reshape(kept + (-1,)))  # (batch, free, contracted)
        nb = len(lb)
        left, right = index
        nl, nr = left.ndim - nb - 1, right.ndim - nb - 1
        # Both as (batch, left free, right free, contracted).
        left = left.reshape(left.shape[:-1] + (1,) * nr + left.shape[-1:])
        right = right.reshape(right.shape[:nb] + (1,) * nl + right.shape[nb:])
        full = out_shape + (left.shape[-1],)
        left, right = np.broadcast_to(left, full), np.broadcast_to(right, full)
        rows = np.broadcast_to(np.arange(n_out).reshape(out_shape + (1,)), full)
        nz = [self.zeros.get(v).ravel() for v in eqn.ins]
        parts = []
        for d, mine, other, other_nz in (
            (self.get(eqn.ins[0]), left, right, nz[1]),
            (self.get(eqn.ins[1]), right, left, nz[0]),
        ):
            if d is None:
                continue
            use = other_nz[other]
            member = sparse.csr_matrix(
                (np.ones(int(use.sum()), bool), (rows[use], mine[use])),
                shape=(n_out, d.shape[0]),
            )
            parts.append((member @ d).astype(bool).tocsr())
        return [_union(parts, n_out, self.s)]

    def call(self, eqn: _ir.Eqn) -> list[Any]:
        body = _interpret.body_program(eqn)
        return self.inline(eqn, _Dependencies(body, self.s))


def dependency_pattern(step, program, joint, groups) -> tuple[Any, dict[str, Any]]:
    """`(J, {path: dh/dtheta})` structural non-zero patterns, as SciPy boolean CSR
    matrices of shapes `(H, H)` and `(H, theta.size)` (hidden values in group order,
    parameter elements in C order)."""
    state_vars = step.state_vars
    layout = step.layout
    hidden = [j for g in groups for j in g.leaves]
    sizes = [int(np.prod(step.state_avals[j].shape, dtype=int)) for j in hidden]
    n_hidden = sum(sizes)
    params = joint.params
    p_sizes = [int(np.prod(layout.avals[i].shape, dtype=int)) for i in params]
    n_sources = n_hidden + sum(p_sizes)
    prop = _Dependencies(program, n_sources)
    offset = 0
    for j, size in zip(hidden, sizes):
        prop.env[state_vars[j]] = sparse.csr_matrix(
            (np.ones(size, bool), (np.arange(size), offset + np.arange(size))),
            shape=(size, n_sources),
        )
        offset += size
    for i, size in zip(params, p_sizes):
        prop.env[program.invars[i]] = sparse.csr_matrix(
            (np.ones(size, bool), (np.arange(size), offset + np.arange(size))),
            shape=(size, n_sources),
        )
        offset += size
    prop.run(sorted(joint.upstream))
    out_state = program.outvars[step.n_y :]
    rows = []
    for j, size in zip(hidden, sizes):
        d = prop.get(out_state[j])
        rows.append(
            d if d is not None else sparse.csr_matrix((size, n_sources), dtype=bool)
        )
    full = sparse.csc_matrix(
        sparse.vstack(rows, format="csc").astype(bool)
        if rows
        else sparse.csc_matrix((0, n_sources), dtype=bool)
    )
    parts = _parts(step, hidden, sizes)
    J = sparse.csr_matrix(parts @ full[:, :n_hidden].astype(np.int32) @ parts.T)
    J = J.astype(bool)
    immediate = {}
    start = n_hidden
    for i, size in zip(params, p_sizes):
        block = parts @ full[:, start : start + size].astype(np.int32)
        immediate[layout.paths[i]] = sparse.csr_matrix(block).astype(bool)
        start += size
    return J, immediate


def _parts(step, hidden: list[int], sizes: list[int]) -> Any:
    """`(H_real, H)`: which hidden value each real hidden value is a part of (a
    complex value has two, its real part in the leaf's first half of rows and its
    imaginary part in the second; see `Graph.hidden_size`)."""
    cols = []
    offset = 0
    for j, size in zip(hidden, sizes):
        values = offset + np.arange(size)
        complex_leaf = np.issubdtype(step.state_avals[j].dtype, np.complexfloating)
        for _ in range(2 if complex_leaf else 1):
            cols.append(values)
        offset += size
    cols_all = np.concatenate(cols) if cols else np.zeros(0, int)
    rows = np.arange(cols_all.size)
    return sparse.csr_matrix(
        (np.ones(cols_all.size, np.int32), (rows, cols_all)),
        shape=(cols_all.size, offset),
    )
