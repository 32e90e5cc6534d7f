"""Exponentially smoothed diagonal RTRL (pp_prop): traces of input plus output size."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Inexact

from .._errors import EtraceError
from .._graph import Graph, Unit
from .._kernels import fused, weighted_states
from .base import (
    AbstractAlgorithm,
    AbstractUnitAlgorithm,
    overrides,
    summed_outer_product,
)


class ES_D_RTRL(AbstractUnitAlgorithm):
    r"""ES-D-RTRL (pp_prop): D-RTRL's trace factorised into input and output traces.

    For a weight op $y = W x$ the full D-RTRL trace $\epsilon_{mi}$ is replaced by the
    outer product of an input trace and an output trace,

    $$\epsilon^t_x = a\,\epsilon^{t-1}_x + x^t, \qquad
      \epsilon^t_{f,mk} = a \sum_{k'} D^t_{n(m)kk'}\,\epsilon^{t-1}_{f,mk'}
        + (1 - a)\, D_f{}^t_{mk},$$

    and $\nabla W_{mi} = \sum_k c^t_k[n(m)]\,\epsilon^t_{f,mk}\,\epsilon^t_{x,i}$.
    Memory is $O(I + M K)$ per weight and example instead of $O(I M K)$.

    **Arguments:**

    - `decay`: the smoothing factor $a \in [0, 1)$; or
    - `rank`: an integer $r \geq 1$, meaning $a = (r - 1) / (r + 1)$ ($r = 1$ gives
        $a = 0$: the one-step gradient).
    - `bias_correction`: if `True`, divide the output trace by $1 - a^{t+1}$ (with $t$
        the trace state's step counter, 0 on the first step): its weights
        $(1 - a) a^{t-s}$ then sum to one from the first step on, as in Adam's
        warm-up correction. Off by default.

    The output trace depends on the unit only through `Df`, so units with the same
    `Df` (`Unit.same_df`: a bias added to a product, as in `eqx.nn.Linear`) keep
    one: the trace of a unit with `same_df` set is `(input_trace, None)`, and its
    gradient reads the output trace of the unit `same_df` names. (Subclasses that
    replace a unit method keep a full trace for every unit.)

    With $a = 0$ it is exact for memoryless layers. With memory it is an
    approximation even where D-RTRL is exact (the two factors each carry history);
    `etrace.testing.exact_regime` reports it so.

    Reference: Wang et al., "Model-agnostic linear-memory online learning in spiking
    neural networks", Nature Communications (2026), eqs. for ES-D-RTRL.
    """

    decay: float
    bias_correction: bool = False

    def __init__(
        self,
        decay: Any = None,
        *,
        rank: Any = None,
        bias_correction: bool = False,
    ):
        if (decay is None) == (rank is None):
            raise EtraceError(
                "Give exactly one of `decay` (a float in [0, 1)) and `rank` (an int "
                ">= 1), e.g. `etrace.ES_D_RTRL(decay=0.9)` or "
                "`etrace.ES_D_RTRL(rank=19)`."
            )
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise EtraceError(f"`rank` must be an int >= 1, got {rank!r}.")
            decay = (rank - 1) / (rank + 1)
        if not 0.0 <= float(decay) < 1.0:
            raise EtraceError(f"`decay` must lie in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self.bias_correction = bias_correction

    def init_unit(
        self, unit: Unit
    ) -> tuple[Inexact[Array, "b f c"], Inexact[Array, "b w f k"]]:
        s = unit.site
        return (
            jnp.zeros((s.b, s.fx, s.c), s.dtype),
            jnp.zeros((s.b, s.fw, s.fx, unit.k), unit.dtype),
        )

    def update_unit(self, unit, trace, D, Df, x):
        ex, ef = trace
        a = self.decay
        ex = a * ex + x
        # `D ef` as one broadcast product per column `j` of `D` that can be
        # non-zero: `D[..., :, j] * ef_j` gives every state's term at once, so the
        # new trace is one element-wise expression of the trace's own shape. (An
        # einsum contracting `K` compiles to one tiny matrix product per output on
        # CPU; a per-state result joined by a concatenate runs element by element,
        # 2 to 3 times slower for a LIF layer's two states.) A column of structural
        # zeros (a spike's) is left out; within a kept column, entries that
        # `coupling` marks zero are multiplied in, as the zeros they are.
        g = unit.group
        columns = [
            D[..., :, j] * ef[..., j : j + 1]
            for j in range(g.k)
            if any(g.couples(i, j) for i in range(g.k))
        ]
        decayed = sum(columns[1:], columns[0]) if columns else 0 * ef
        return ex, a * decayed + (1 - a) * Df

    def exact_regime(self, facts: Any) -> Any:
        # Exact where D-RTRL is and, in addition, nothing has memory.
        regime = facts.diagonal()
        remembering = [g.name for g in facts.with_memory()]
        if self.decay == 0.0 and not remembering:
            return regime
        if remembering:
            reason = (
                f"the hidden group(s) {remembering} have memory: the factorised "
                "input and output traces each carry history, so their product is "
                "not the D-RTRL trace"
            )
        else:
            reason = (
                f"decay {self.decay} > 0 on memoryless layers smooths the gradient "
                "over time"
            )
        return facts.inexact(regime, reason, facts.traced_paths())

    def summary_note(self, graph: Graph, path: str) -> str | None:
        shared = self._shared(graph)
        by_name = {u.name: u for u in graph.units}
        twins = [
            by_name[shared[u.name]].site.name
            for u in graph.units_of(path)
            if u.name in shared
        ]
        return f"shares the output trace of {', '.join(twins)}" if twins else None

    def _shared(self, graph: Graph) -> dict[str, str]:
        """Unit name -> the unit whose output trace it reads (see the class
        docstring); empty when a subclass replaces a method the sharing relies on."""
        if overrides(self, ES_D_RTRL, *_UNIT_METHODS):
            return {}
        return {u.name: u.same_df for u in graph.units if u.same_df is not None}

    def _full(self, graph: Graph, traces: dict[str, Any]) -> dict[str, Any]:
        """The traces with every shared output trace filled in."""
        shared = self._shared(graph)
        return {
            k: (t[0], traces[shared[k]][1]) if k in shared else t
            for k, t in traces.items()
        }

    def _dropped(self, graph: Graph, traces: dict[str, Any]) -> dict[str, Any]:
        """The traces with every shared output trace left out (`None`)."""
        shared = self._shared(graph)
        return {k: (t[0], None) if k in shared else t for k, t in traces.items()}

    def init(self, graph):
        return self._dropped(graph, super().init(graph))

    def update(self, graph, traces, jac):
        # The shared units' output traces are computed from the full traces and
        # dropped: nothing reads them, and XLA removes the computation.
        return self._dropped(
            graph, super().update(graph, self._full(graph, traces), jac)
        )

    def gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        ex, ef = trace
        return jnp.einsum("bwf,bfc->bwc", weighted_states(signal, ef), ex)

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        if overrides(self, ES_D_RTRL, "gradient_unit"):
            return None
        ex, ef = trace
        return summed_outer_product(unit, _weighted(signal, ef), ex)

    def _correction(self, t: Any, dtype: Any) -> Any:
        # The output trace is an exponential average started from zero: its weights
        # sum to 1 - a^(t+1), not 1. (The input trace is a discounted sum, not an
        # average, and needs no correction.) Computed in the traces' dtype.
        if not self.bias_correction or self.decay == 0.0:
            return None
        a = jnp.asarray(self.decay, dtype)
        return 1 / (1 - a ** (jnp.asarray(t) + 1).astype(dtype))

    def gradients(self, graph, traces, signal, jac):
        grads = super().gradients(graph, self._full(graph, traces), signal, jac)
        dtype = jnp.result_type(*signal.values())
        scale = self._correction(jac.t, dtype)
        if scale is None:
            return grads
        return {k: g * scale.astype(g.dtype) for k, g in grads.items()}

    def summed_gradients(self, graph, traces, signal, jac):
        if overrides(self, ES_D_RTRL, "gradients"):
            return AbstractAlgorithm.summed_gradients(self, graph, traces, signal, jac)
        scale = self._correction(jac.t, jnp.result_type(*signal.values()))
        if scale is not None:
            signal = {
                g: s * scale.astype(s.dtype).reshape((-1,) + (1,) * (s.ndim - 1))
                for g, s in signal.items()
            }
        full = self._full(graph, traces)
        shared = self._shared(graph)
        if not shared:
            return self.summed_unit_gradients(graph, full, signal, jac)
        # Units that share an output trace share its neuron map, hence the
        # signal-weighted output trace too: formed once (XLA cannot merge the two
        # copies, each `fused` with its own kept one).
        weighted: dict[str, Any] = {}
        out = {}
        for u in graph.units:
            key = shared.get(u.name) or u.name
            ex, ef = full[u.name]
            if key not in weighted:
                gathered = u.gather(signal[u.group.name], axis=1)
                weighted[key] = _weighted(gathered, ef)
            out[u.name] = summed_outer_product(u, weighted[key], ex)
        return out


def _weighted(signal: Array, ef: Array) -> Array:
    """`sum_k signal[..., k] ef[..., k]` of a batch of output traces, kept out of a
    kernel of its own (`fused`). Taken on flat rows: on the canonical layout, with
    its unit axes, XLA on CPU runs the product several times slower."""
    n = ef.shape[0]
    flat = [
        signal[..., k].reshape(n, -1) * ef[..., k].reshape(n, -1)
        for k in range(ef.shape[-1])
    ]
    return fused(sum(flat[1:], flat[0])).reshape(ef.shape[:-1])


_UNIT_METHODS = (
    "init",
    "init_unit",
    "update",
    "update_unit",
    "gradient_unit",
    "summed_gradient_unit",
    "gradients",
    "summed_gradients",
)


pp_prop = ES_D_RTRL
"""Another name for `etrace.ES_D_RTRL`: `etrace.pp_prop(decay=0.9)` is
`etrace.ES_D_RTRL(decay=0.9)`."""
