"""Online training with postsynaptic estimates (and its factorised form)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from .._graph import Graph, Unit
from .._kernels import weighted_states
from .base import AbstractAlgorithm, AbstractUnitAlgorithm, overrides
from .diagonal.dense import diagonal_init
from .eprop import filtered_init, filtered_readout, filtered_update
from .helpers import KappaFilter


class OTPE(AbstractUnitAlgorithm):
    r"""OTPE (Summe et al., "Estimating post-synaptic effects for online training of
    feed-forward SNNs", 2023).

    OSTL's eligibility traces see a weight's effect on its own layer only. OTPE
    adds the *postsynaptic estimate*: a layer's output is integrated by the next
    layer's leaky membrane, so the weight's effect on it persists. For a hidden
    group that feeds a downstream hidden group,

    $$\epsilon^t = D^t \epsilon^{t-1} + D_f^t \otimes x^t, \qquad
      R^t = \lambda R^{t-1} + \epsilon^t, \qquad \nabla W = c^t \cdot R^t,$$

    with $\lambda$ the downstream leak; a group that feeds none (the last layer
    before a memoryless readout) keeps $R = \epsilon$, so OTPE equals OSTL on one
    hidden layer. ($\epsilon$ on the output state is the paper's $\partial s^t /
    \partial\theta$, the spike's sensitivity including the membrane's history.)
    In these terms OTPE's estimate is e-prop's $\kappa$ filter with symmetric
    feedback; the paper's averaged surrogate for the signal sent to lower layers
    is not used: lower layers receive the exact same-step signal.

    **F-OTPE** (`approx=True`) factorises $R$ into an input and an output factor,
    $O(I + M K)$ memory:

    $$z^t = \lambda z^{t-1} + x^t,\quad \hat z^t = \lambda \hat z^{t-1} + z^t,\quad
      S^t = \lambda S^{t-1} + D_f^t,\quad
      \nabla W_{mi} = \sum_k c^t_k \frac{S^t_{mk}}{\sum_{s \le t}\lambda^{t-s}}\,
      \hat z^t_i,$$

    where $\hat z$ (the second, postsynaptic filter) is used for groups that feed a
    downstream group and $z$ otherwise; the output factor is a normalised leaky
    average of $D_f$. It is exact where $D = \lambda$ and $D_f$ is constant over
    time (a detached-reset membrane read directly).

    **Arguments:**

    - `decay`: $\lambda \in [0, 1)$, the membrane leak (`exp(-1 / tau)`).
    - `approx`: `False` (default) for OTPE, `True` for F-OTPE.
    """

    filter: KappaFilter
    approx: bool

    def __init__(self, decay: Any, approx: bool = False):
        self.filter = KappaFilter(decay)
        self.approx = bool(approx)

    @property
    def decay(self) -> float:
        return self.filter.kappa

    def exact_regime(self, facts: Any) -> Any:
        regime = facts.restrict(
            facts.diagonal(),
            facts.downstream(),
            "the postsynaptic estimate is exact only if `decay` equals the leak of "
            "the downstream layer and that layer is a leaky integrator; not checked "
            "here",
        )
        if not self.approx:
            return regime
        return facts.restrict(
            regime,
            facts.with_memory(),
            "F-OTPE factorises the trace: exact only where D = decay and Df is "
            "constant over time",
        )

    def init(self, graph: Graph) -> dict[str, Any]:
        if not self.approx:
            return filtered_init(
                graph, self.filter, not overrides(self, OTPE, "update_unit")
            )
        out = {}
        for u in graph.units:
            s = u.site
            z = jnp.zeros((s.b, s.fx, s.c), s.dtype)
            S = jnp.zeros((s.b, s.fw, s.fx, u.k), u.dtype)
            post = bool(graph.downstream.get(u.group.name))
            out[u.name] = (z, z, S) if post else (z, S)
        return out

    def init_full(self, graph: Graph) -> dict[str, Any]:
        if self.approx:
            return self.init(graph)
        return filtered_init(graph, self.filter, drop_transient=False)

    def init_unit(self, unit: Unit) -> Any:
        return diagonal_init(unit)

    def update_unit(self, unit, trace, D, Df, x):
        if not self.approx:
            return filtered_update(self.filter, unit, trace, D, Df, x)
        lam = self.decay
        z, S = trace[0], trace[-1]
        z = lam * z + x
        S = lam * S + Df
        if len(trace) == 3:
            return z, lam * trace[1] + z, S
        return z, S

    def gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        return filtered_readout(trace, signal)

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        if self.approx or overrides(self, OTPE, "gradient_unit"):
            return None
        return filtered_readout(trace, signal, summed=True)

    def summed_gradients(self, graph, traces, signal, jac):
        if self.approx or overrides(self, OTPE, "gradients"):
            return AbstractAlgorithm.summed_gradients(self, graph, traces, signal, jac)
        return self.summed_unit_gradients(graph, traces, signal, jac)

    def gradients(self, graph, traces, signal, jac):
        if not self.approx:
            return super().gradients(graph, traces, signal, jac)
        lam = self.decay
        t = jnp.asarray(jac.t)
        out = {}
        for u in graph.units:
            trace = traces[u.name]
            z, S = trace[-2], trace[-1]
            # In the traces' dtype (a Python float to an integer power is float64
            # under `jax_enable_x64`).
            steps = (t + 1).astype(S.dtype)
            norm = (1 - jnp.asarray(lam, S.dtype) ** steps) / (1 - lam)
            sig = u.gather(signal[u.group.name])
            grad = jnp.einsum("bwf,bfc->bwc", weighted_states(sig, S), z)
            out[u.name] = grad / norm.astype(S.dtype)
        return out
