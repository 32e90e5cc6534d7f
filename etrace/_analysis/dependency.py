"""Structural dependency patterns of one step, for sparse whole-state algorithms.

`SnAp` keeps the sensitivities that the structure of the step can make non-zero.
Evaluating Jacobians at sample points would miss entries that are zero there by
accident of the values: the derivative of a readout with respect to its weight is
the presynaptic spike, zero for a neuron that happened not to fire. This module
instead propagates, element by element, *which* previous hidden values and parameter
elements each value of the step depends on. Each variable carries a sparse boolean
matrix `(elements, sources)`; each primitive maps its inputs' rows to its outputs'
rows exactly for element-wise, layout, reduction and product primitives, and
conservatively (every output element depends on every input element) otherwise, so
the pattern is always a superset of the true one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse

from .. import _ir
from . import labels as _labels


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


class _Propagator:
    """Carries, per variable, its dependency rows and where it can be non-zero
    (`nz`, from constants: `mask * W` is zero, and depends on nothing, where the
    constant `mask` is)."""

    def __init__(self, program: _ir.Program, n_sources: int):
        self.program = program
        self.s = n_sources
        self.dep: dict[int, Any] = {}
        self.nz: dict[int, np.ndarray] = {}
        self.const_cache: dict[int, Any] = {}

    def nonzero(self, v: _ir.Operand) -> np.ndarray:
        shape = tuple(self.program.aval(v).shape)
        if isinstance(v, int) and v in self.nz:
            return self.nz[v]
        if not isinstance(v, _ir.Lit) and v in self.dep:
            return np.ones(shape, bool)
        value = _ir.literal_value(self.program, v, self.const_cache)
        if value is None:
            return np.ones(shape, bool)
        return np.broadcast_to(np.asarray(value) != 0, shape)

    def size(self, v: _ir.Operand) -> int:
        return int(np.prod(self.program.aval(v).shape, dtype=int))

    def get(self, v: _ir.Operand) -> Any | None:
        return None if isinstance(v, _ir.Lit) else self.dep.get(v)

    def run(self, eqn_ids) -> None:
        for i in eqn_ids:
            eqn = self.program.eqns[i]
            outs = self.apply(eqn)
            nz = self._nonzero(eqn) if len(eqn.outs) == 1 else None
            nz = None if nz is None else np.asarray(nz)
            for o, d in zip(eqn.outs, outs):
                if nz is not None and not nz.all():
                    self.nz[o] = nz
                    if d is not None:  # a structural zero depends on nothing
                        d = _rows(d, np.where(nz.ravel(), np.arange(nz.size), -1))
                if d is not None:
                    self.dep[o] = d

    def _nonzero(self, eqn: _ir.Eqn) -> Any:
        """Where the output can be non-zero, if some of it cannot."""
        name = eqn.name
        shape = tuple(self.program.aval(eqn.outs[0]).shape)
        if not jnp.issubdtype(self.program.aval(eqn.outs[0]).dtype, jnp.number):
            return None
        elementwise = name in _labels.ELEMENTWISE or name in _labels.IDENTITY
        if not elementwise:
            ins = []
        elif name == "select_n":
            ins = [np.broadcast_to(self.nonzero(v), shape) for v in eqn.ins[1:]]
            ins = [ins[0]] + ins
        else:
            ins = [np.broadcast_to(self.nonzero(v), shape) for v in eqn.ins]
        if name == "mul":
            return ins[0] & ins[1]
        if name in ("neg", "convert_element_type", "copy", "copy_p") or (
            name in _labels.IDENTITY
        ):
            return ins[0]
        if name in ("add", "sub", "add_any", "max", "min"):
            return np.logical_or.reduce(ins)
        if name == "select_n":
            pred = _ir.literal_value(self.program, eqn.ins[0], self.const_cache)
            if pred is None:
                return np.logical_or.reduce(ins[1:])
            which = np.broadcast_to(np.asarray(pred).astype(int), shape)
            return np.choose(which, ins[1:])
        if name in _labels.LAYOUT and name not in ("dynamic_slice", "gather"):
            args = []
            for k, v in enumerate(eqn.ins):
                data = k == 0 or name == "concatenate"
                if data:
                    args.append(jnp.asarray(self.nonzero(v)))
                elif name == "pad" and k == 1:
                    args.append(jnp.asarray(False))
                else:
                    val = _ir.literal_value(self.program, v, self.const_cache)
                    if val is None:
                        return None
                    args.append(jnp.asarray(val))
            try:
                with jax.ensure_compile_time_eval():
                    (out,) = _ir.bind(eqn, *args)
            except Exception:  # a primitive that refuses booleans
                return None
            return np.asarray(out)
        if name == "dot_general":
            with jax.ensure_compile_time_eval():
                args = [jnp.asarray(self.nonzero(v), jnp.float32) for v in eqn.ins]
                (out,) = _ir.bind(eqn, *args)
            return np.asarray(out) > 0
        return None

    def _everything(self, eqn: _ir.Eqn, ins: list[Any]) -> list[Any]:
        rows = [d for d in ins if d is not None]
        one = _union([sparse.csr_matrix(d.sum(axis=0) > 0) for d in rows], 1, self.s)
        return [
            _rows(one, np.zeros(self.size(o), np.int64)).astype(bool) for o in eqn.outs
        ]

    def apply(self, eqn: _ir.Eqn) -> list[Any]:
        ins = [self.get(v) for v in eqn.ins]
        if all(d is None for d in ins):
            return [None] * len(eqn.outs)
        name = eqn.name
        out_shape = tuple(self.program.aval(eqn.outs[0]).shape)
        n_out = int(np.prod(out_shape, dtype=int))
        if name in _labels.ELEMENTWISE or name in _labels.IDENTITY:
            parts = []
            for v, d in zip(eqn.ins, ins):
                if d is None:
                    continue
                shape = tuple(self.program.aval(v).shape)
                index = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
                if len(shape) < len(out_shape):
                    index = index.reshape((1,) * (len(out_shape) - len(shape)) + shape)
                parts.append(_rows(d, np.broadcast_to(index, out_shape)))
            return [_union(parts, n_out, self.s)]
        if name in _labels.LAYOUT:
            return self._layout(eqn, ins)
        if name in _labels.REDUCE:
            return [self._reduce(eqn, ins[0])]
        if name == "dot_general":
            return [self._dot(eqn, ins)]
        if name in _labels.CALLS and _labels._call_body(eqn) is not None:
            return self._call(eqn, ins)
        return self._everything(eqn, ins)

    def _layout(self, eqn: _ir.Eqn, ins: list[Any]) -> list[Any]:
        name = eqn.name
        args, stacked, offset = [], [], 0
        for k, v in enumerate(eqn.ins):
            data = (
                k == 0
                or name == "concatenate"
                or (name == "dynamic_update_slice" and k == 1)
            )
            if data:
                size = self.size(v)
                shape = self.program.aval(v).shape
                args.append(jnp.asarray(offset + np.arange(size).reshape(shape)))
                d = ins[k]
                stacked.append(
                    d
                    if d is not None
                    else sparse.csr_matrix((size, self.s), dtype=bool)
                )
                offset += size
            elif name == "pad" and k == 1:
                args.append(jnp.asarray(-1, jnp.int64 if offset > 2**31 else jnp.int32))
            else:
                if ins[k] is not None:
                    return self._everything(eqn, ins)
                val = _ir.literal_value(self.program, v, self.const_cache)
                if val is None:
                    return self._everything(eqn, ins)
                args.append(jnp.asarray(val))
        try:
            with jax.ensure_compile_time_eval():
                outs = _ir.bind(eqn, *args)
        except Exception:  # e.g. a fill value the integer labels cannot hold
            return self._everything(eqn, ins)
        dep = sparse.vstack(stacked).tocsr()
        return [_rows(dep, np.asarray(o)) for o in outs]

    def _reduce(self, eqn: _ir.Eqn, dep: Any) -> Any:
        shape = tuple(self.program.aval(eqn.ins[0]).shape)
        axes = tuple(eqn.params["axes"])
        keep = tuple(i for i in range(len(shape)) if i not in axes)
        index = np.arange(int(np.prod(shape, dtype=int))).reshape(shape)
        moved = np.transpose(index, keep + axes)
        n_out = int(np.prod([shape[i] for i in keep], dtype=int))
        groups = moved.reshape(n_out, -1)
        member = sparse.csr_matrix(
            (
                np.ones(groups.size, bool),
                (np.repeat(np.arange(n_out), groups.shape[1]), groups.ravel()),
            ),
            shape=(n_out, dep.shape[0]),
        )
        return (member @ dep).astype(bool).tocsr()

    def _dot(self, eqn: _ir.Eqn, ins: list[Any]) -> Any:
        """`out[b, i, j]` depends on `lhs[b, i, c]` where `rhs[b, c, j]` can be
        non-zero, and on `rhs[b, c, j]` where `lhs[b, i, c]` can."""
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        out_shape = tuple(self.program.aval(eqn.outs[0]).shape)
        n_out = int(np.prod(out_shape, dtype=int))
        shapes = [tuple(self.program.aval(v).shape) for v in eqn.ins]
        index = []
        for shape, c, b in zip(shapes, (lc, rc), (lb, rb)):
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
        nz = [self.nonzero(v).ravel() for v in eqn.ins]
        parts = []
        for d, mine, other, other_nz in (
            (ins[0], left, right, nz[1]),
            (ins[1], right, left, nz[0]),
        ):
            if d is None:
                continue
            use = other_nz[other]
            member = sparse.csr_matrix(
                (np.ones(int(use.sum()), bool), (rows[use], mine[use])),
                shape=(n_out, d.shape[0]),
            )
            parts.append((member @ d).astype(bool).tocsr())
        return _union(parts, n_out, self.s)

    def _call(self, eqn: _ir.Eqn, ins: list[Any]) -> list[Any]:
        body = _ir.from_closed_jaxpr(_labels._call_body(eqn))
        inner = _Propagator(body, self.s)
        for var, d in zip(body.invars, ins):
            if d is not None:
                inner.dep[var] = d
        inner.run(range(len(body.eqns)))
        return [inner.get(v) for v in body.outvars]


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
    prop = _Propagator(program, n_sources)
    offset = 0
    for j, size in zip(hidden, sizes):
        prop.dep[state_vars[j]] = sparse.csr_matrix(
            (np.ones(size, bool), (np.arange(size), offset + np.arange(size))),
            shape=(size, n_sources),
        )
        offset += size
    for i, size in zip(params, p_sizes):
        prop.dep[program.invars[i]] = sparse.csr_matrix(
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
    J = sparse.csr_matrix(full[:, :n_hidden])
    immediate = {}
    start = n_hidden
    for i, size in zip(params, p_sizes):
        immediate[layout.paths[i]] = sparse.csr_matrix(full[:, start : start + size])
        start += size
    return J, immediate
