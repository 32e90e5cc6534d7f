"""Changing an algorithm's behaviour by wrapping it, in the way of diffrax's
`HalfSolver`: the wrapper holds the inner algorithm and overrides one method."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, PyTree

from .._graph import Graph
from .base import AbstractAlgorithm, full_traces, overrides


class AbstractWrappedAlgorithm(AbstractAlgorithm):
    """An algorithm that delegates to `inner` everything it does not override.

    Subclass it and override `update` (e.g. to clip the traces after the inner
    update) or `gradients` (e.g. to clip the read-out). `init` keeps the inner
    algorithm's trace structure, so a wrapped learner's `TraceState` has the same
    shapes as the inner one's; a wrapper that overrides `update`, `gradients` or
    `summed_gradients` reads out from the updated traces, and its `init` has the
    inner algorithm keep every trace that needs (`D_RTRL`'s trace of a spike,
    which it otherwise does not keep). Capabilities that an algorithm declares as class
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
        if self._reads_updated():
            # Read out from the updated traces (see `gradients_from_previous`):
            # the inner algorithm keeps every trace that read-out needs.
            with full_traces():
                return self.inner.init(graph)
        return self.inner.init(graph)

    def _reads_updated(self) -> bool:
        return overrides(
            self, AbstractWrappedAlgorithm, "update", "gradients", "summed_gradients"
        )

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
        if self._reads_updated():
            return None
        return self.inner.gradients_from_previous(
            graph, traces, signal, jac, summed=summed
        )
