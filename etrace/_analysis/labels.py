"""The neuron-label domain: structural neuron-locality of the recurrent update.

Every element of every hidden state leaf and of every site is a node. Labels (integer
node ids, `-1` for "none") are pushed forward through the equations of the tail; an
equation that combines elements joins their nodes. Afterwards each connected component
must hold elements of at most one neuron position: that is what makes the diagonal
Jacobians exact. Layout primitives are run on the label arrays themselves, so a split,
reshape or transpose moves labels exactly as it moves values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _interpret, _ir


NONE = -1


def describe(eqn: _ir.Eqn) -> str:
    name = eqn.name
    if eqn.name in _interpret.CALLS and "name" in eqn.params:
        name = f"{eqn.name}[{eqn.params['name']}]"
    where = f" (at {eqn.source})" if eqn.source.strip() else ""
    return f"`{name}`{where}"


class NonStatic(Exception):
    """A layout primitive whose indices depend on the state."""

    def __init__(self, eqn: _ir.Eqn):
        super().__init__(eqn)
        self.eqn = eqn


class Labels(_interpret.AbstractInterpreter):
    """Pushes node labels through equations and records which nodes they join.

    **Arguments:**

    - `program`: the program.
    - `seeds`: the labels of the variables where the walk starts.
    - `n_hidden`: the nodes below it are hidden-state elements (whose moves to
        another position `moved` records).
    - `edges`, `where`: used for a call's body, which records its joins in the
        caller's `edges`, at the caller's equation.

    **Raises:**

    `NonStatic` from `run`, for a layout primitive whose indices are not known at
    compile time.
    """

    def __init__(
        self,
        program: _ir.Program,
        seeds: dict[int, np.ndarray],
        n_hidden: int = 0,
        edges: list[tuple[np.ndarray, np.ndarray, int]] | None = None,
        where: int | None = None,
    ):
        super().__init__(program)
        self.env.update(seeds)
        self.n_hidden = n_hidden
        # Per join: the nodes joined (two arrays) and the equation that joined them.
        self.edges = [] if edges is None else edges
        # For each variable, the last reordering equation its hidden labels went
        # through: the likely culprit when a state ends up at another position.
        self.moved: dict[int, int] = {}
        self._where = where

    @property
    def where(self) -> int:
        return self.at if self._where is None else self._where

    def _full(self, v: _ir.Operand) -> np.ndarray:
        got = self.get(v)
        if got is not None:
            return got
        return np.full(self.shape(v), NONE, np.int32)

    def _join(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        both = (a >= 0) & (b >= 0) & (a != b)
        if both.any():
            self.edges.append((a[both], b[both], self.where))
        return np.where(a >= 0, a, b)

    def _join_rows(self, rows: np.ndarray) -> np.ndarray:
        """Joins all labels within each row of a 2-D array; returns one per row."""
        out = np.full(rows.shape[0], NONE, np.int32)
        for j in range(rows.shape[1]):
            out = self._join(out, rows[:, j])
        return out

    def apply(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        moved = self.moved
        prov = [moved[v] for v in eqn.ins if isinstance(v, int) and v in moved]
        if prov:
            for o in eqn.outs:
                self.moved[o] = prov[0]
        return super().apply(eqn)

    def identity(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        return [self.get(eqn.ins[0])]

    def elementwise(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        shape = self.shape(eqn.outs[0])
        out = np.full(shape, NONE, np.int32)
        for v in eqn.ins:
            lab = self.get(v)
            if lab is not None:
                out = self._join(out, np.broadcast_to(lab, shape))
        return [out]

    def other(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        """Every output element depends on every input element: exact for one
        neuron, refused otherwise."""
        flat = [x.ravel() for x in map(self.get, eqn.ins) if x is not None]
        rep = self._join_rows(np.concatenate(flat)[None, :])[0]
        return [np.full(self.shape(o), rep, np.int32) for o in eqn.outs]

    def layout(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        args = []
        for v, role in zip(eqn.ins, _interpret.operand_roles(eqn)):
            if role is _interpret.Role.DATA:
                args.append(jnp.asarray(self._full(v)))
            elif role is _interpret.Role.FILL:
                args.append(jnp.asarray(NONE, jnp.int32))
            else:
                val = None if self.get(v) is not None else self.static(v)
                if val is None:
                    raise NonStatic(eqn)
                args.append(jnp.asarray(val))
        with jax.ensure_compile_time_eval():
            outs = _ir.bind(eqn, *args)
        if eqn.name in _interpret.MOVES and any(
            (x is not None and (x[(x >= 0)] < self.n_hidden).any())
            for x in map(self.get, eqn.ins)
        ):
            for o in eqn.outs:
                self.moved[o] = self.where
        return [np.asarray(o, np.int32) for o in outs]

    def reduction(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        lab = self._full(eqn.ins[0])
        axes = tuple(eqn.params["axes"])
        keep = tuple(i for i in range(lab.ndim) if i not in axes)
        moved = np.transpose(lab, keep + axes)
        out_shape = tuple(lab.shape[i] for i in keep)
        rows = moved.reshape(int(np.prod(out_shape, dtype=int)), -1)
        return [self._join_rows(rows).reshape(out_shape)]

    def cumulative(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        """Joins each row along the axis (a superset of the prefix each output
        element combines)."""
        lab = self._full(eqn.ins[0])
        axis = eqn.params["axis"]
        moved = np.moveaxis(lab, axis, -1)
        rows = moved.reshape(-1, lab.shape[axis])
        rep = self._join_rows(rows)
        out = np.broadcast_to(rep[:, None], rows.shape).reshape(moved.shape)
        return [np.moveaxis(out, -1, axis)]

    def contraction(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        reps = []
        for v, c, b in ((eqn.ins[0], lc, lb), (eqn.ins[1], rc, rb)):
            lab = self._full(v)
            free = tuple(i for i in range(lab.ndim) if i not in c and i not in b)
            moved = np.transpose(lab, tuple(b) + free + tuple(c))
            bs = [lab.shape[i] for i in b]
            fs = [lab.shape[i] for i in free]
            rows = moved.reshape(int(np.prod(bs + fs, dtype=int)), -1)
            reps.append(self._join_rows(rows).reshape(bs + fs))
        left, right = reps
        nb = len(lb)
        nl = left.ndim - nb
        nr = right.ndim - nb
        left = left.reshape(left.shape + (1,) * nr)
        right = right.reshape(right.shape[:nb] + (1,) * nl + right.shape[nb:])
        shape = self.shape(eqn.outs[0])
        left = np.broadcast_to(left, shape).copy()
        return [self._join(left, np.broadcast_to(right, shape))]

    def call(self, eqn: _ir.Eqn) -> list[np.ndarray | None]:
        body = _interpret.body_program(eqn)
        inner = Labels(body, {}, self.n_hidden, self.edges, self.where)
        return self.inline(eqn, inner)
