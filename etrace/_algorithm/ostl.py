"""Online spatio-temporal learning, with and without the recurrent block H."""

from __future__ import annotations

from typing import Any, ClassVar

from .diagonal.base import AbstractDiagonalAlgorithm


class OSTLFeedforward(AbstractDiagonalAlgorithm):
    r"""OSTL without $H$ (Bohnstingl et al., "Online spatio-temporal learning in
    deep neural networks", IEEE TNNLS 2022), for networks whose neurons have no
    recurrent weights.

    Keeps, per weight, the *temporal* eligibility trace of the paper with the
    neuron's own dynamics (leak, reset, adaptation: everything in the diagonal
    Jacobian $D$) and no hidden-to-hidden weights,
    $\epsilon^t = D^t \epsilon^{t-1} + D_f^t \otimes x^t$, and combines it with the
    *spatial* learning signal $c^t$ back-propagated through this step's layers:
    $\nabla W = c^t \cdot \epsilon^t$. This is D-RTRL (the leak is kept, as in the
    paper); implementations that drop the leak from the trace compute OTTT_O
    instead. Exact for one feed-forward spiking layer. Memory $O(|W| K)$.
    """

    def exact_regime(self, facts: Any) -> Any:
        return facts.diagonal()


class OSTLRecurrent(AbstractDiagonalAlgorithm):
    r"""OSTL with $H$ (Bohnstingl et al. 2022), for recurrent layers.

    As `OSTLFeedforward`, but the trace's recurrence uses the per-neuron diagonal
    block of the *full* hidden-to-hidden Jacobian, recurrent weights included:
    $H^t[n] = \partial h^t[n] / \partial h^{t-1}[n]$ through every path of the step
    (the paper's $H^t$, restricted, as there, to each neuron's own block):
    $\epsilon^t = H^t \epsilon^{t-1} + D_f^t \otimes x^t$. This is SnAp-1's pattern
    with $O(|W| K)$ storage. Equal to RTRL on a recurrent layer whose Jacobian is
    its diagonal blocks (a single neuron with any number of states, or diagonal
    recurrent weights); an approximation otherwise.

    $H$ costs one pullback per hidden value and step (like RTRL's Jacobian, but
    without the parameter Jacobian), which is what the recurrent weights' own
    diagonal requires.
    """

    full_diagonal: ClassVar[bool] = True

    def exact_regime(self, facts: Any) -> Any:
        # A one-neuron group's block is its whole Jacobian, recurrent weights too.
        return facts.diagonal(full_diagonal=True)
