"""Keeping another algorithm's traces in a narrower floating-point dtype."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._errors import EtraceError
from .._graph import Graph
from .base import AbstractAlgorithm
from .wrapped import AbstractWrappedAlgorithm


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


class ReducedPrecision(AbstractWrappedAlgorithm):
    r"""Stores the traces of `inner` in a narrower floating-point dtype.

    The traces live in the `TraceState` as `dtype` (by default `bfloat16`, half
    the bytes of `float32`); every step widens them to the dtype `inner` keeps
    them in, runs `inner`'s update and read-out there, and narrows the new traces
    again. The arithmetic is unchanged, only the stored values are rounded, so
    memory and the traffic of the update (what bounds D-RTRL's step) shrink by the
    ratio of the dtypes' sizes at the price of a relative rounding error of about
    $2^{-8}$ per step for `bfloat16` (which, like `float32`, has 8 exponent bits:
    no overflow where `float32` has none). Integer leaves (a step counter, a
    random key) and traces already as narrow are kept as they are.
    `etrace.testing.exact_regime` gives `inner`'s verdict, which then holds to
    the rounding of `dtype`.

    **Arguments:**

    - `inner`: the algorithm whose traces are stored narrower, e.g.
        `etrace.D_RTRL()`.
    - `dtype`: a floating-point dtype, default `jnp.bfloat16`; `jnp.float16` has
        a 5-bit exponent and can overflow.

    **Raises:**

    `EtraceError` if `inner` is not an `etrace.AbstractAlgorithm` or `dtype` is
    not a floating-point dtype.

    !!! Example

        ```python
        algorithm = etrace.ReducedPrecision(etrace.D_RTRL())
        learner, trace_state = etrace.compile(model, x0, algorithm=algorithm)
        ```
    """

    inner: AbstractAlgorithm
    dtype: Any = eqx.field(static=True)

    def __init__(self, inner: Any, dtype: Any = jnp.bfloat16):
        if not isinstance(inner, AbstractAlgorithm):
            raise EtraceError(
                "`ReducedPrecision(inner, dtype)` wraps an algorithm: `inner` must "
                f"be an `etrace.AbstractAlgorithm` such as `etrace.D_RTRL()`, got "
                f"{inner!r}."
            )
        try:
            resolved = jnp.dtype(dtype)
        except TypeError:
            resolved = None
        if resolved is None or not _is_float(resolved):
            raise EtraceError(
                "`ReducedPrecision(..., dtype=...)` must be a floating-point dtype "
                f"such as `jnp.bfloat16` or `jnp.float16`, got {dtype!r}."
            )
        self.inner = inner
        self.dtype = resolved

    def _narrow(self, traces: Any) -> Any:
        def cast(a):
            if _is_float(a.dtype) and a.dtype.itemsize > self.dtype.itemsize:
                return a.astype(self.dtype)
            return a

        return jtu.tree_map(cast, traces)

    def _widen(self, graph: Graph, traces: Any) -> Any:
        # The dtypes `inner` keeps its traces in, from shapes only; with every
        # trace kept when an outer wrapper's `init` asked for them all.
        wide = jax.eval_shape(lambda: self.inner.init(graph))
        if jtu.tree_structure(wide) != jtu.tree_structure(traces):
            wide = jax.eval_shape(lambda: self.inner.init_full(graph))
        return jtu.tree_map(lambda a, s: a.astype(s.dtype), traces, wide)

    def init(self, graph: Graph) -> Any:
        return self._narrow(self.inner.init(graph))

    def init_full(self, graph: Graph) -> Any:
        return self._narrow(self.inner.init_full(graph))

    def update(self, graph: Graph, traces: Any, jac: Any) -> Any:
        return self._narrow(self.inner.update(graph, self._widen(graph, traces), jac))

    def gradients(self, graph: Graph, traces: Any, signal: Any, jac: Any) -> Any:
        return self.inner.gradients(graph, self._widen(graph, traces), signal, jac)

    def summed_gradients(self, graph: Graph, traces: Any, signal: Any, jac: Any):
        wide = self._widen(graph, traces)
        return self.inner.summed_gradients(graph, wide, signal, jac)

    # Only the stored dtype changes: the inner algorithm's read-out, from the
    # previous traces where it reads them so.
    def reads_previous(self, graph: Graph) -> bool:
        return self.inner.reads_previous(graph)

    def summary_note(self, graph: Graph, path: str) -> str | None:
        return self.inner.summary_note(graph, path)

    def exact_regime(self, facts: Any) -> Any:
        # The same arithmetic: exact where `inner` is, to the rounding of `dtype`.
        return self.inner.exact_regime(facts)

    def gradients_from_previous(self, graph, traces, signal, jac, *, summed=False):
        wide = self._widen(graph, traces)
        return self.inner.gradients_from_previous(
            graph, wide, signal, jac, summed=summed
        )
