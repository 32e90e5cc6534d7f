"""SnAp-n: RTRL restricted to the n-step reachability pattern of the unit graph."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from .._errors import EtraceError
from .._graph import Graph
from .base import AbstractAlgorithm


@functools.lru_cache(maxsize=64)
def _masks(graph: Graph, n: int) -> dict[str, np.ndarray]:
    J, immediate = graph.jacobian_pattern()
    size = J.shape[0]
    reach = np.eye(size, dtype=bool)
    step = J | np.eye(size, dtype=bool)
    for _ in range(n - 1):
        reach = (step.astype(np.int64) @ reach.astype(np.int64)) > 0
    out = {}
    for path, imm in immediate.items():
        flat = imm.reshape(size, -1).astype(np.int64)
        out[path] = ((reach.astype(np.int64) @ flat) > 0).reshape(imm.shape)
    return out


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
    pattern is found once, structurally, from the compiled step. Memory is that of
    RTRL here (the mask is applied to dense storage); the point of this
    implementation is the approximation, not the storage.

    **Arguments:**

    - `n`: the number of steps, an int $\geq 1$.
    """

    n: int
    routing: ClassVar[str] = "joint"

    def __init__(self, n: Any = 1):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise EtraceError(f"`n` must be an int >= 1 (steps), got {n!r}.")
        self.n = n

    def init(self, graph: Graph):
        return {
            path: jnp.zeros((graph.hidden_size,) + shape, dtype)
            for path, shape, dtype in graph.params
        }

    def update(self, graph, traces, jac):
        masks = _masks(graph, self.n)
        return {
            path: jnp.where(
                masks[path], jnp.tensordot(jac.J, m, axes=1) + jac.Jtheta[path], 0
            )
            for path, m in traces.items()
        }

    def gradients(self, graph, traces, signal, jac):
        del graph, jac
        c = signal["hidden"]
        return {path: jnp.tensordot(c, m, axes=1) for path, m in traces.items()}
