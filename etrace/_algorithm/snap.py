"""SnAp-n: RTRL restricted to the n-step reachability pattern of the unit graph."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from scipy import sparse as sp

from .._errors import EtraceError
from .._graph import Graph
from .._kernels import batch_sum
from .base import AbstractAlgorithm


@functools.lru_cache(maxsize=64)
def _sparse_masks(graph: Graph, n: int) -> dict[str, sp.csc_matrix]:
    """Per parameter path, the pattern `P_n` as a boolean `(H, size)` CSC matrix."""
    J, immediate = graph.jacobian_pattern(sparse=True)
    size = J.shape[0]
    step = (J + sp.identity(size, dtype="bool", format="csr")).astype(bool)
    reach = sp.identity(size, dtype="bool", format="csr")
    for _ in range(n - 1):
        wider = (step @ reach).astype(bool)
        if (wider != reach).nnz == 0:  # nothing new is reachable: a fixed point
            break
        reach = wider
    return {
        path: sp.csc_matrix((reach @ imm).astype(bool))
        for path, imm in immediate.items()
    }


@functools.lru_cache(maxsize=64)
def _masks(graph: Graph, n: int) -> dict[str, np.ndarray]:
    """Per parameter path, the pattern `P_n` as a dense boolean `(H, *shape)`."""
    shapes = {path: shape for path, shape, _ in graph.params}
    return {
        path: m.toarray().reshape((graph.hidden_size,) + shapes[path])
        for path, m in _sparse_masks(graph, n).items()
    }


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """Index arrays of one parameter's sensitivities stored at the pattern's entries.

    Entries `p` are in column-major order (by parameter element, then hidden value);
    every column of the pattern has at most `width` entries, and index `nnz` points at
    a zero appended to the stored values (the padding of shorter columns).
    """

    rows: np.ndarray  # (nnz,) hidden value of each entry
    same_column: np.ndarray  # (nnz, width) the entries of the same column
    j_index: np.ndarray  # (nnz, width) flat index into J of (row, row of that entry)
    # (size, width) the entries of each column; None where each column has one
    by_column: np.ndarray | None
    colour_index: np.ndarray  # (nnz,) flat index into the coloured pullbacks (C, size)
    immediate: np.ndarray  # (nnz,) whether the entry is in the immediate pattern


@dataclasses.dataclass(frozen=True)
class _Plan:
    sparse: dict[str, _Sparse]  # the paths stored sparsely
    colours: np.ndarray  # (C, H) 0/1 cotangents: rows of each colour


def _colouring(immediate: dict[str, Any], size: int) -> np.ndarray:
    """A greedy colouring of the hidden values such that no two values of one colour
    depend immediately on the same parameter element, as `(C, H)` indicators: one
    pullback per colour then gives every immediate derivative, unmixed."""
    if not immediate:
        return np.zeros((0, size), bool)
    flat = sp.hstack(list(immediate.values()), format="csr").astype(np.float32)
    conflict = (flat @ flat.T).tocsr()
    colour = np.full(size, -1)
    for k in range(size):
        taken = colour[conflict.indices[conflict.indptr[k] : conflict.indptr[k + 1]]]
        free = np.setdiff1d(np.arange(size + 1), taken)
        colour[k] = free[0]
    out = np.zeros((colour.max() + 1, size), bool)
    out[colour, np.arange(size)] = True
    return out


def _sparse_layout(mask: Any, immediate: Any, colour: np.ndarray) -> _Sparse:
    size_h, size = mask.shape
    # `immediate` is inside `mask`: their sum has the mask's entries, 2 where both.
    both = sp.csc_matrix(mask.astype(np.int8) + immediate.astype(np.int8))
    both.sort_indices()
    rows = both.indices.astype(np.int32)
    nnz = rows.size
    counts = np.diff(both.indptr)
    width = max(int(counts.max(initial=0)), 1)
    cols = np.repeat(np.arange(size), counts)
    start = both.indptr[:-1]
    offsets = np.arange(width)
    # Entries of each column, padded with `nnz`.
    by_column = np.where(
        offsets < counts[:, None], start[:, None] + offsets, nnz
    ).astype(np.int32)
    same_column = by_column[cols]
    partner = np.where(same_column < nnz, rows[np.minimum(same_column, nnz - 1)], 0)
    j_index = (rows[:, None].astype(np.int64) * size_h + partner).astype(np.int32)
    return _Sparse(
        rows=rows,
        same_column=same_column,
        j_index=j_index,
        by_column=None if nnz == size and width == 1 else by_column,
        colour_index=(colour[rows].astype(np.int64) * size + cols).astype(np.int32),
        immediate=both.data == 2,
    )


@functools.lru_cache(maxsize=64)
def _plan(graph: Graph, n: int, storage: bool | None) -> _Plan:
    size = graph.hidden_size
    _, immediate = graph.jacobian_pattern(sparse=True)
    colour = _colouring(immediate, size)
    colour_of = colour.argmax(axis=0) if colour.size else np.zeros(size, int)
    dense_size = {path: size * math.prod(shape) for path, shape, _ in graph.params}
    chosen = {}
    for path, mask in _sparse_masks(graph, n).items():
        width = int(np.diff(mask.indptr).max(initial=0))
        # Auto: sparse when its update (`width` products per entry) does at most as
        # many multiplies as the dense storage has numbers, `1 / H` of the dense
        # update's.
        if storage is None and mask.nnz * max(width, 1) > dense_size[path]:
            continue
        if storage is False:
            continue
        chosen[path] = _sparse_layout(mask, immediate[path], colour_of)
    return _Plan(chosen, colour)


def _by_column(layout: _Sparse, weighted: Any, shape: tuple[int, ...]) -> Any:
    """The sums of `weighted` (one number per entry) over each column, in `shape`."""
    if layout.by_column is not None:
        padded = jnp.concatenate([weighted, jnp.zeros((1,), weighted.dtype)])
        weighted = jnp.sum(padded[layout.by_column], axis=1)
    return jnp.reshape(weighted, shape)


class SnAp(AbstractAlgorithm):
    r"""SnAp-n (Menick et al., "Practical real time recurrent learning with a sparse
    approximation", ICLR 2021).

    RTRL's sensitivity $M = \partial h / \partial \theta$ kept only on the entries
    that can be non-zero within $n$ steps: hidden value $k$ and parameter $\theta_j$
    are linked if $k$ is reachable in at most $n - 1$ steps of the unit graph (the
    structural pattern of $J = \partial h^t / \partial h^{t-1}$) from a hidden value
    that $\theta_j$ affects immediately.

    $$M^t = P_n \odot (J^t M^{t-1} + I^t), \qquad \nabla_\theta L^t = (c^t)^\top M^t.$$

    `SnAp(1)` keeps the immediate pattern only (D-RTRL where $J$ is diagonal);
    `SnAp(n)` equals RTRL once $n - 1$ reaches the diameter of the unit graph. The
    pattern is found once, structurally, from the compiled step.

    A parameter's sensitivities are stored at the pattern's entries only (`nnz`
    numbers, `|theta|` for `SnAp(1)` on a GRU) where that pays: the update then
    reads the entries of $J$ it needs ($H$ pullbacks of the step) and the immediate
    derivatives from one pullback per colour of a colouring of the hidden values
    (one for a GRU), never the dense $I$. A dense pattern is stored densely, as in
    `RTRL`.

    **Arguments:**

    - `n`: the number of steps, an int $\geq 1$.
    - `sparse`: `None` (default) stores a parameter's sensitivities sparsely when
        the sparse update needs at most as many multiplies as the dense storage has
        numbers (every column of the pattern at most `H * size / nnz` entries long);
        `True` always, `False` never (RTRL's storage, with the mask applied).
    """

    n: int
    sparse: bool | None = None
    routing: ClassVar[str] = "joint"
    dense_jacobians: ClassVar[bool] = False

    def __init__(self, n: Any = 1, sparse: Any = None):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EtraceError(f"`n` must be an int >= 1 (steps), got {n!r}.")
        if not (sparse is None or isinstance(sparse, bool)):
            raise EtraceError(
                f"`sparse` must be None (decide per parameter), True or False, got "
                f"{sparse!r}."
            )
        self.n = n
        self.sparse = sparse

    def exact_regime(self, facts: Any) -> Any:
        # RTRL once the mask covers everything the unit graph reaches.
        graph = facts.graph
        full = _masks(graph, graph.hidden_size + 1)
        mine = _masks(graph, self.n)
        cut = [p for p in full if (full[p] != mine[p]).any()]
        if not cut:
            return facts.full()
        reason = (
            f"SnAp({self.n}) drops sensitivities that the unit graph reaches in more "
            f"than {self.n - 1} step(s), for {cut}"
        )
        return facts.inexact(facts.full(), reason, cut)

    def init(self, graph: Graph):
        plan = _plan(graph, self.n, self.sparse)
        return {
            path: jnp.zeros(
                (plan.sparse[path].rows.size,)
                if path in plan.sparse
                else (graph.hidden_size,) + shape,
                dtype,
            )
            for path, shape, dtype in graph.params
        }

    def update(self, graph, traces, jac):
        plan = _plan(graph, self.n, self.sparse)
        if not traces:
            return traces
        dtype = next(iter(traces.values())).dtype
        eye = jnp.eye(graph.hidden_size, dtype=dtype)
        # Row k of J is e_k^T J; the parameters' parts are used only for the paths
        # stored densely (XLA drops the others).
        J, Jtheta = jax.vmap(jac.vjp)(eye)
        coloured = {}
        if plan.sparse:
            _, coloured = jax.vmap(jac.vjp)(jnp.asarray(plan.colours, dtype))
        out = {}
        masks = None
        for path, m in traces.items():
            layout = plan.sparse.get(path)
            if layout is None:
                masks = _masks(graph, self.n) if masks is None else masks
                out[path] = jnp.where(
                    masks[path], jnp.tensordot(J, m, axes=1) + Jtheta[path], 0
                )
                continue
            immediate = jnp.where(
                layout.immediate,
                jnp.reshape(coloured[path], (-1,))[layout.colour_index],
                0,
            )
            j_entries = jnp.reshape(J, (-1,))[layout.j_index]
            if layout.same_column.shape[1] == 1:  # one entry per column
                out[path] = j_entries[:, 0] * m + immediate
            else:
                padded = jnp.concatenate([m, jnp.zeros((1,), m.dtype)])
                propagated = jnp.sum(j_entries * padded[layout.same_column], axis=1)
                out[path] = propagated + immediate
        return out

    def gradients(self, graph, traces, signal, jac):
        # A batch of one.
        return self.summed_gradients(
            graph,
            {path: m[None] for path, m in traces.items()},
            {"hidden": signal["hidden"][None]},
            jac,
        )

    def summed_gradients(self, graph, traces, signal, jac):
        # Summed over the batch before the sparse entries are gathered per column.
        del jac
        plan = _plan(graph, self.n, self.sparse)
        c = signal["hidden"]
        shapes = {path: shape for path, shape, _ in graph.params}
        out = {}
        for path, m in traces.items():
            layout = plan.sparse.get(path)
            if layout is None:
                out[path] = jnp.tensordot(c, m, axes=2)
                continue
            summed = batch_sum(c[:, layout.rows] * m)
            out[path] = _by_column(layout, summed, shapes[path])
        return out
