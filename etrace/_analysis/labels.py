"""Structural neuron-locality analysis of the recurrent update.

Every element of every hidden state leaf and of every site is a node. Labels (integer
node ids, `-1` for "none") are pushed forward through the equations of the tail; an
equation that combines elements joins their nodes. Afterwards each connected component
must hold elements of at most one neuron position: that is what makes the diagonal
Jacobians exact. Layout primitives are run on the label arrays themselves, so a split,
reshape or transpose moves labels exactly as it moves values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _ir


NONE = -1

ELEMENTWISE = frozenset(
    """add sub mul div rem pow integer_pow max min neg sign floor ceil round is_finite
    exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh
    acosh atanh atan2 sqrt rsqrt cbrt abs square erf erfc erf_inv lgamma digamma
    igamma nextafter eq ne lt le gt ge and or not xor select_n clamp conj real imag
    add_any shift_left shift_right_logical shift_right_arithmetic population_count
    """.split()
)
# Primitives that pass labels through unchanged (their params would corrupt labels).
IDENTITY = frozenset(
    "convert_element_type copy copy_p reduce_precision stop_gradient".split()
)
# Layout primitives applied to the label arrays themselves.
LAYOUT = frozenset(
    """reshape broadcast_in_dim transpose squeeze expand_dims slice rev concatenate pad
    split dynamic_slice dynamic_update_slice gather""".split()
)
# Layout primitives that move elements to other positions (named in errors).
REORDER = frozenset(
    """transpose rev concatenate slice pad split dynamic_slice dynamic_update_slice
    gather""".split()
)
REDUCE = frozenset(
    """reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor
    argmax argmin""".split()
)
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
CONTROL = frozenset({"cond", "while", "scan", "switch"})


def describe(eqn: _ir.Eqn) -> str:
    name = eqn.name
    if eqn.name in CALLS and "name" in eqn.params:
        name = f"{eqn.name}[{eqn.params['name']}]"
    where = f" (at {eqn.source})" if eqn.source.strip() else ""
    return f"`{name}`{where}"


def _call_body(eqn: _ir.Eqn) -> Any:
    for key in ("call_jaxpr", "fun_jaxpr", "jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


class Labeller:
    """Pushes node labels through equations and records which nodes they join."""

    def __init__(self, program: _ir.Program, seeds: dict[int, np.ndarray]):
        self.program = program
        self.labels: dict[int, np.ndarray] = dict(seeds)
        self.edges: list[tuple[np.ndarray, np.ndarray, int]] = []
        # For each variable, the last reordering equation its hidden labels went
        # through: the likely culprit when a state ends up at another position.
        self.moved: dict[int, int] = {}
        self.n_hidden = 0
        self._const_cache: dict[int, Any] = {}
        self._bodies: dict[int, _ir.Program] = {}

    def get(self, v: _ir.Operand) -> np.ndarray | None:
        if isinstance(v, _ir.Lit):
            return None
        return self.labels.get(v)

    def _full(self, v: _ir.Operand) -> np.ndarray:
        got = self.get(v)
        if got is not None:
            return got
        return np.full(self.program.aval(v).shape, NONE, np.int32)

    def _join(self, a: np.ndarray, b: np.ndarray, where: int) -> np.ndarray:
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            self.edges.append((a[both], b[both], where))
        return np.where(a >= 0, a, b)

    def _join_rows(self, rows: np.ndarray, where: int) -> np.ndarray:
        """Joins all labels within each row of a 2-D array; returns one per row."""
        out = np.full(rows.shape[0], NONE, np.int32)
        for j in range(rows.shape[1]):
            out = self._join(out, rows[:, j], where)
        return out

    def run(self, eqn_ids: Sequence[int], where: int | None = None) -> None:
        for i in eqn_ids:
            eqn = self.program.eqns[i]
            outs = self.apply(eqn, i if where is None else where)
            for o, lab in zip(eqn.outs, outs):
                if lab is not None:
                    self.labels[o] = lab

    def apply(self, eqn: _ir.Eqn, where: int) -> list[np.ndarray | None]:
        ins = [self.get(v) for v in eqn.ins]
        if all(x is None for x in ins):
            return [None] * len(eqn.outs)
        name = eqn.name
        prov = [
            self.moved[v] for v in eqn.ins if isinstance(v, int) and v in self.moved
        ]
        if prov:
            for o in eqn.outs:
                self.moved[o] = prov[0]
        if name in IDENTITY:
            return [ins[0]]
        if name in ELEMENTWISE:
            shape = self.program.aval(eqn.outs[0]).shape
            out = np.full(shape, NONE, np.int32)
            for lab in ins:
                if lab is not None:
                    out = self._join(out, np.broadcast_to(lab, shape), where)
            return [out]
        if name in LAYOUT:
            return self._layout(eqn, where)
        if name in REDUCE:
            return [self._reduce(eqn, ins[0], where)]
        if name in CUMULATIVE:
            return [self._cumulative(eqn, ins[0], where)]
        if name == "dot_general":
            return [self._dot(eqn, where)]
        if name in CALLS and _call_body(eqn) is not None:
            return self._call(eqn, where)
        # Anything else: conservatively assume every output element depends on every
        # input element. That is exact for one neuron and refused otherwise.
        flat = [x.ravel() for x in ins if x is not None]
        rep = self._join_rows(np.concatenate(flat)[None, :], where)[0]
        return [np.full(self.program.aval(o).shape, rep, np.int32) for o in eqn.outs]

    def _layout(self, eqn: _ir.Eqn, where: int) -> list[np.ndarray | None]:
        name = eqn.name
        args = []
        for k, v in enumerate(eqn.ins):
            carries = self.get(v) is not None
            data_operand = k == 0 or (
                name in ("concatenate",) or (name == "dynamic_update_slice" and k == 1)
            )
            if data_operand:
                args.append(jnp.asarray(self._full(v)))
            elif name == "pad" and k == 1:
                args.append(jnp.asarray(NONE, jnp.int32))
            else:
                if carries:
                    raise _NonStatic(eqn)
                val = _ir.literal_value(self.program, v, self._const_cache)
                if val is None:
                    raise _NonStatic(eqn)
                args.append(jnp.asarray(val))
        with jax.ensure_compile_time_eval():
            outs = _ir.bind(eqn, *args)
        outs: list[np.ndarray | None] = [np.asarray(o, np.int32) for o in outs]
        if name in REORDER and any(
            (x is not None and (x[(x >= 0)] < self.n_hidden).any())
            for x in (self.get(v) for v in eqn.ins)
        ):
            for o in eqn.outs:
                self.moved[o] = where
        return outs

    def _reduce(self, eqn: _ir.Eqn, lab: np.ndarray | None, where: int) -> np.ndarray:
        assert lab is not None
        axes = tuple(eqn.params["axes"])
        keep = tuple(i for i in range(lab.ndim) if i not in axes)
        moved = np.transpose(lab, keep + axes)
        out_shape = tuple(lab.shape[i] for i in keep)
        rows = moved.reshape(int(np.prod(out_shape, dtype=int)), -1)
        return self._join_rows(rows, where).reshape(out_shape)

    def _cumulative(
        self, eqn: _ir.Eqn, lab: np.ndarray | None, where: int
    ) -> np.ndarray:
        assert lab is not None
        axis = eqn.params["axis"]
        moved = np.moveaxis(lab, axis, -1)
        rows = moved.reshape(-1, lab.shape[axis])
        rep = self._join_rows(rows, where)
        out = np.broadcast_to(rep[:, None], rows.shape).reshape(moved.shape)
        return np.moveaxis(out, -1, axis)

    def _dot(self, eqn: _ir.Eqn, where: int) -> np.ndarray:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        reps = []
        for v, c, b in ((eqn.ins[0], lc, lb), (eqn.ins[1], rc, rb)):
            lab = self._full(v)
            free = tuple(i for i in range(lab.ndim) if i not in c and i not in b)
            moved = np.transpose(lab, tuple(b) + free + tuple(c))
            bs = [lab.shape[i] for i in b]
            fs = [lab.shape[i] for i in free]
            rows = moved.reshape(int(np.prod(bs + fs, dtype=int)), -1)
            reps.append(self._join_rows(rows, where).reshape(bs + fs))
        left, right = reps
        nb = len(lb)
        nl = left.ndim - nb
        nr = right.ndim - nb
        left = left.reshape(left.shape + (1,) * nr)
        right = right.reshape(right.shape[:nb] + (1,) * nl + right.shape[nb:])
        shape = self.program.aval(eqn.outs[0]).shape
        return self._join(
            np.broadcast_to(left, shape).copy(), np.broadcast_to(right, shape), where
        )

    def _call(self, eqn: _ir.Eqn, where: int) -> list[np.ndarray | None]:
        key = id(eqn)
        if key not in self._bodies:
            self._bodies[key] = _ir.from_closed_jaxpr(_call_body(eqn))
        body = self._bodies[key]
        inner = Labeller(body, {})
        inner.n_hidden = self.n_hidden
        for var, v in zip(body.invars, eqn.ins):
            lab = self.get(v)
            if lab is not None:
                inner.labels[var] = lab
        inner.run(range(len(body.eqns)), where=where)
        self.edges.extend(inner.edges)
        return [inner.get(v) for v in body.outvars]


class _NonStatic(Exception):
    """A layout primitive whose indices depend on the state."""

    def __init__(self, eqn: _ir.Eqn):
        super().__init__(eqn)
        self.eqn = eqn
