"""Changing an algorithm's behaviour by wrapping it, in the way of diffrax's
`HalfSolver`: the wrapper holds the inner algorithm and overrides one method."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array, PyTree

from .._graph import Graph, Unit
from .base import AbstractAlgorithm, overrides


class AbstractWrappedAlgorithm(AbstractAlgorithm):
    """An algorithm that delegates to `inner` everything it does not override.

    Subclass it and override `update` (e.g. to clip the traces after the inner
    update) or `gradients` (e.g. to clip the read-out). `init` keeps the inner
    algorithm's trace structure, so a wrapped learner's `TraceState` has the same
    shapes as the inner one's; a wrapper that overrides `update`, `gradients` or
    `summed_gradients` reads out from the updated traces, and its `init` is the
    inner algorithm's `init_full`, which keeps every trace that needs (`D_RTRL`'s
    trace of a spike, which it otherwise does not keep). The capabilities
    (`routing`, `full_diagonal`, `learning_signal`, ...) are the inner
    algorithm's; its exactness rule is not (see `exact_regime`).

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

    # The capabilities are the inner algorithm's.
    @property
    def routing(self) -> str:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.routing

    @property
    def dense_jacobians(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.dense_jacobians

    @property
    def full_diagonal(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.full_diagonal

    @property
    def learning_signal(self) -> str:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.learning_signal

    @property
    def site_jacobians(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.site_jacobians

    def _reads_updated(self) -> bool:
        return overrides(
            self, AbstractWrappedAlgorithm, "update", "gradients", "summed_gradients"
        )

    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        if self._reads_updated():
            return self.inner.init_full(graph)
        return self.inner.init(graph)

    def init_full(self, graph: Graph) -> dict[str, PyTree[Array]]:
        return self.inner.init_full(graph)

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

    def reads_previous(self, graph: Graph) -> bool:
        # A wrapper that changes the update or the read-out is read out from its
        # own updated traces.
        return not self._reads_updated() and self.inner.reads_previous(graph)

    def gradients_from_previous(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
        *,
        summed: bool = False,
    ) -> dict[str, Array]:
        return self.inner.gradients_from_previous(
            graph, traces, signal, jac, summed=summed
        )

    def transposed_gradients(self, graph: Graph, traces: Any) -> frozenset[str]:
        return self.inner.transposed_gradients(graph, traces)

    def project(self, index: int, vector: Array, n: int) -> Array:
        return self.inner.project(index, vector, n)

    def trace_of(self, graph: Graph, traces: dict[str, Any], path: str):
        return self.inner.trace_of(graph, traces, path)

    def view(self, unit: Unit, trace: Any) -> Any:
        return self.inner.view(unit, trace)

    def stored_traces(self, graph: Graph, traces: dict[str, Any], path: str):
        return self.inner.stored_traces(graph, traces, path)

    def summary_note(self, graph: Graph, path: str) -> str | None:
        return None if self._reads_updated() else self.inner.summary_note(graph, path)

    def exact_regime(self, facts: Any) -> Any:
        """No rule (`None`): a wrapper is written to change what `inner` computes
        (its update, read-out or learning signal), so `inner`'s rule does not
        carry over. A wrapper that keeps `inner`'s gradient declares so with
        `return self.inner.exact_regime(facts)`."""
        del facts
        return None
