"""A three-factor rule: eligibility traces read out with a modulator."""

from __future__ import annotations

from typing import Any, ClassVar

from .diagonal.base import AbstractDiagonalAlgorithm


class ThreeFactor(AbstractDiagonalAlgorithm):
    r"""A three-factor learning rule: D-RTRL's eligibility traces (the first two
    factors, pre- and postsynaptic), read out with a third factor $m^t$ supplied at
    every step instead of the loss's gradient: a reward prediction error, a
    neuromodulator, a global or per-neuron teaching signal.

    $$\epsilon^t_{mik} = \sum_{k'} D^t_{n(m)kk'}\,\epsilon^{t-1}_{mik'}
        + D_f{}^t_{mk}\, x^t_i, \qquad
      \nabla W_{mi} = \sum_k m^t[n(m)]\,\epsilon^t_{mik}.$$

    The modulator is passed explicitly with each step, never captured when the
    model is compiled: `learner.step(model, trace_state, x, modulator=m)`, or
    `etrace.online_grad(..., modulators=ms)` for a sequence. `m` is a scalar (the
    same for every neuron of every hidden group), an array of a group's neuron
    shape, or a dict of those keyed by group name. The traced parameters'
    gradient is linear in `m` and zero where `m` is zero; the parameters without
    a trace (a readout) get their ordinary gradient from the loss. A step without
    a modulator is an `EtraceError`.

    With the modulator in place of $\partial L^t / \partial h^t$ it is not a
    gradient of the loss, and equals BPTT nowhere; it equals the equations above.
    Memory $O(|W| K)$ per example, as D-RTRL.

    Reference: Gerstner et al., "Eligibility traces and plasticity on behavioral
    time scales: experimental support of neoHebbian three-factor learning rules",
    Frontiers in Neural Circuits (2018); Frémaux & Gerstner, "Neuromodulated
    spike-timing-dependent plasticity, and theory of three-factor learning rules",
    Frontiers in Neural Circuits (2016).
    """

    learning_signal: ClassVar[str] = "modulator"

    def exact_regime(self, facts: Any) -> Any:
        return facts.restrict(
            facts.full(),
            facts.graph.groups,
            "ThreeFactor reads the traces out with the modulator, not the loss's "
            "gradient",
        )
