"""Changing an algorithm's behaviour by wrapping it, in the way of diffrax's
`HalfSolver`: the wrapper holds the inner algorithm and overrides one method."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, PyTree

from .._graph import Graph
from .base import AbstractAlgorithm, overrides


class AbstractWrappedAlgorithm(AbstractAlgorithm):
    """An algorithm that delegates to `inner` everything it does not override.

    Subclass it and override `update` (e.g. to clip the traces after the inner
    update) or `gradients` (e.g. to clip the read-out). `init` keeps the inner
    algorithm's trace structure, so a wrapped learner's `TraceState` has the same
    shapes as the inner one's. Capabilities that an algorithm declares as class
    variables (`routing`, `full_diagonal`, feedback) are looked up through `inner`.

    **Attributes:**

    - `inner`: the wrapped algorithm. Subclasses declare it as a field,
        `inner: etrace.AbstractAlgorithm`, next to their own hyper-parameters.

    !!! Example

        ```python
        class ClipTraces(etrace.AbstractWrappedAlgorithm):
            inner: etrace.AbstractAlgorithm
            bound: float

            def update(self, graph, traces, jac):
                new = self.inner.update(graph, traces, jac)
                return jax.tree.map(lambda t: jnp.clip(t, -self.bound, self.bound), new)

        clipped = ClipTraces(etrace.D_RTRL(), 1.0)
        learner, ts = etrace.compile(model, x0, algorithm=clipped)
        ```
    """

    inner: AbstractAlgorithm

    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        return self.inner.init(graph)

    def update(
        self, graph: Graph, traces: dict[str, PyTree[Array]], jac: Any
    ) -> dict[str, PyTree[Array]]:
        return self.inner.update(graph, traces, jac)

    def gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        return self.inner.gradients(graph, traces, signal, jac)

    def summed_gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        if overrides(self, AbstractWrappedAlgorithm, "gradients"):
            return super().summed_gradients(graph, traces, signal, jac)
        return self.inner.summed_gradients(graph, traces, signal, jac)

    def gradients_from_previous(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
        *,
        summed: bool = False,
    ) -> dict[str, Array] | None:
        # A wrapper that changes the update or the read-out is read out from its
        # own updated traces.
        if overrides(
            self, AbstractWrappedAlgorithm, "update", "gradients", "summed_gradients"
        ):
            return None
        return self.inner.gradients_from_previous(
            graph, traces, signal, jac, summed=summed
        )
