"""Exact real-time recurrent learning."""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp

from .._graph import Graph
from .base import AbstractAlgorithm


class RTRL(AbstractAlgorithm):
    r"""Real-time recurrent learning (Williams & Zipser, 1989): exact and dense.

    Keeps, for every parameter $\theta$ that reaches a hidden state, the full
    sensitivity $M = \partial h^t / \partial \theta$ of the whole hidden vector $h$
    (all hidden groups, all layers):

    $$M^t = J^t M^{t-1} + I^t, \qquad
      \nabla_\theta L^t = (c^t)^\top M^t,$$

    with $J^t = \partial h^t / \partial h^{t-1}$ the full hidden-to-hidden Jacobian
    (through recurrent weights and across layers) and $I^t$ the immediate Jacobian.
    Equal to BPTT for every model; memory $O(H |\theta|)$ and time
    $O(H^2 |\theta|)$ per step, so meant for small models and as a second oracle.
    """

    routing: ClassVar[str] = "joint"

    def exact_regime(self, facts: Any) -> Any:
        # Exact unless a value is read from inside an update (one-step).
        return facts.full()

    def init(self, graph: Graph):
        return {
            path: jnp.zeros((graph.hidden_size,) + shape, dtype)
            for path, shape, dtype in graph.params
        }

    def update(self, graph, traces, jac):
        del graph
        return {
            path: jnp.tensordot(jac.J, m, axes=1) + jac.Jtheta[path]
            for path, m in traces.items()
        }

    def gradients(self, graph, traces, signal, jac):
        del graph, jac
        c = signal["hidden"]
        return {path: jnp.tensordot(c, m, axes=1) for path, m in traces.items()}

    def summed_gradients(self, graph, traces, signal, jac):
        # One contraction over the batch and the hidden values.
        del graph, jac
        c = signal["hidden"]
        return {path: jnp.tensordot(c, m, axes=2) for path, m in traces.items()}
