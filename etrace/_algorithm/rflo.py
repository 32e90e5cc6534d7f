"""Random-feedback local online learning."""

from __future__ import annotations

from typing import Any

from jaxtyping import Array

from .._errors import EtraceError
from .._graph import Unit
from .base import AbstractUnitAlgorithm, overrides
from .diagonal.dense import (
    diagonal_init,
    diagonal_readout,
    summed_diagonal_readout,
)
from .eprop import feedback_of
from .helpers import FixedRandomFeedback


class RFLO(AbstractUnitAlgorithm):
    r"""RFLO (Murray, "Local online learning in recurrent networks with random
    feedback", eLife 2019, eqs. 12-15).

    For a rate network $h^t = (1 - \tfrac{1}{\tau}) h^{t-1} + \tfrac{1}{\tau}
    \phi(W r^{t-1} + W_\text{in} x^t)$ the eligibility of weight $W_{ab}$ keeps only
    the neuron's leak, $p^t_{ab} = (1 - \tfrac{1}{\tau})\, p^{t-1}_{ab} +
    \tfrac{1}{\tau} \phi'(u^t_a)\, r^{t-1}_b$, and the update is
    $\Delta W_{ab} \propto (B \varepsilon^t)_a\, p^t_{ab}$: a fixed random
    projection $B$ of the output error $\varepsilon^t$ in place of the transposed
    readout. In etrace's terms, for every weight operation $y = W x$ and state
    $k$ of the neurons it feeds,

    $$\epsilon^t_{mik} = \lambda\, \epsilon^{t-1}_{mik} + D_f{}^t_{mk}\, x^t_i,
      \qquad \lambda = 1 - \tfrac{1}{\tau},$$

    D-RTRL's trace with the diagonal Jacobian $D$ replaced by the leak alone
    ($D_f$ carries $\tfrac{1}{\tau}\phi'(u)$), read out with the learning signal
    of `feedback` on each group's output states: a fixed random projection of
    $\partial L^t / \partial y^t$ (`"random"`, the paper's rule), or the true
    gradient (`"symmetric"`). Memory $O(|W| K)$ per example.

    On the paper's network the leak is all of $D$, so the trace is D-RTRL's and
    RFLO is random e-prop (`etrace.EProp(feedback=...)` with the same feedback);
    where $D$ has more (a spiking neuron's reset, a gate), RFLO keeps the leak
    only.

    **Arguments:**

    - `tau`: the neurons' time constant in steps, $\tau \geq 1$ (the leak is
        $1 - 1/\tau$).
    - `feedback`: `"random"` (default), `"symmetric"`, or an
        `etrace.FixedRandomFeedback(seed, scale)`.
    """

    tau: float
    feedback: FixedRandomFeedback | None

    def __init__(self, tau: Any, feedback: Any = "random"):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 1:
            raise EtraceError(
                f"`tau` must be a number of steps >= 1 (the leak is 1 - 1/tau), got "
                f"{tau!r}."
            )
        self.tau = float(tau)
        self.feedback = feedback_of(feedback)

    @property
    def leak(self) -> float:
        return 1.0 - 1.0 / self.tau

    @property
    def learning_signal(self) -> str:  # pyright: ignore[reportIncompatibleVariableOverride]
        return "gradient" if self.feedback is None else "error_feedback"

    def project(self, index: int, vector: Array, n: int) -> Array:
        if self.feedback is None:
            return super().project(index, vector, n)
        return self.feedback.project(index, vector, n)

    def init_unit(self, unit: Unit) -> Any:
        return diagonal_init(unit)

    def update_unit(self, unit, trace, D, Df, x):
        del unit, D
        return tuple(
            self.leak * eps + Df[..., k : k + 1] * x[:, None]
            for k, eps in enumerate(trace)
        )

    def gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        return diagonal_readout(trace, signal)

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        if overrides(self, RFLO, "gradient_unit"):
            return None
        return summed_diagonal_readout(trace, signal)

    def exact_regime(self, facts: Any) -> Any:
        regime = facts.restrict(
            facts.diagonal(),
            facts.with_memory(),
            f"RFLO's trace keeps the leak {self.leak:g} only: exact where the "
            "neurons' diagonal Jacobian is that leak, which is not checked here",
        )
        if self.feedback is not None:
            regime = facts.restrict(
                regime,
                facts.receiving_signal(),
                "random feedback replaces the readout's transpose: the learning "
                "signal is not the gradient",
            )
        return regime
