"""Online training through time: a presynaptic trace per weight input."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Inexact

from .._errors import EtraceError
from .._graph import Unit
from .._kernels import weighted_states
from .base import AbstractUnitAlgorithm, overrides, summed_outer_product
from .helpers import PresynapticTrace


class OTTT(AbstractUnitAlgorithm):
    r"""OTTT (Xiao et al., "Online training through time for spiking neural
    networks", NeurIPS 2022).

    Keeps only a presynaptic trace per weight op input, $O(I)$ memory, and combines
    it with this step's learning signal and the immediate output derivative:

    $$\hat a^t = \lambda \hat a^{t-1} + x^t \;\text{(mode "A")}, \qquad
      \hat a^t = x^t \;\text{(mode "O")}, \qquad
      \nabla W_{mi} = \Big(\sum_k c^t_k[n(m)]\,D_f{}^t_{mk}\Big)\,\hat a^t_i.$$

    Mode "A" equals BPTT on one feed-forward LIF layer whose reset is detached
    from the gradient and whose leak equals $\lambda$ (then the neuron's diagonal
    Jacobian is $\lambda$ and the presynaptic trace is the exact eligibility); with
    more layers, or a reset in the gradient, it is an approximation. Mode "O"
    keeps no history (the instantaneous gradient). (In the paper both variants use
    the trace and differ in when weights are updated; in etrace that schedule is
    the user's optimiser loop, and mode "O" is the no-trace variant.)

    **Arguments:**

    - `decay`: $\lambda \in [0, 1)$, the neurons' membrane leak (e.g.
        `exp(-1 / tau)`); required for mode "A".
    - `mode`: `"A"` (default) or `"O"`.
    """

    trace: PresynapticTrace | None
    mode: str

    def __init__(self, decay: Any = None, *, mode: str = "A"):
        if mode not in ("A", "O"):
            raise EtraceError(f'`mode` must be "A" or "O", got {mode!r}.')
        if mode == "A" and decay is None:
            raise EtraceError(
                "OTTT mode 'A' needs `decay`, the membrane leak of the neurons (e.g. "
                "`etrace.OTTT(decay=math.exp(-1 / tau))`)."
            )
        self.mode = mode
        self.trace = None if mode == "O" else PresynapticTrace(decay)

    def exact_regime(self, facts: Any) -> Any:
        return facts.restrict(
            facts.diagonal(),
            facts.with_memory(),
            "OTTT's presynaptic trace is the eligibility only where the neurons' "
            "diagonal Jacobian is the constant `decay` (a LIF layer with detached "
            "reset and that leak); that is not checked here",
        )

    def init_unit(self, unit: Unit) -> Inexact[Array, "b f c"]:
        s = unit.site
        return jnp.zeros((s.b, s.fx, s.c), s.dtype)

    def update_unit(self, unit, trace, D, Df, x):
        del unit, D, Df
        return x if self.trace is None else self.trace(trace, x)

    def gradient_unit(self, unit, trace, signal, Df, x):
        del unit, x
        return jnp.einsum("bwf,bfc->bwc", weighted_states(signal, Df), trace)

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        if overrides(self, OTTT, "gradient_unit"):
            return None
        return summed_outer_product(unit, weighted_states(signal, Df), trace)
