"""Online spatio-temporal learning with target projection."""

from __future__ import annotations

from typing import Any, ClassVar

from jaxtyping import Array

from .._errors import EtraceError
from .diagonal.base import AbstractDiagonalAlgorithm
from .helpers import FixedRandomFeedback


class OSTTP(AbstractDiagonalAlgorithm):
    r"""OSTTP (Ortner et al., "Online spatio-temporal learning with target
    projection", AICAS 2023): OSTL's eligibility traces with the learning signal
    of direct random target projection (Frenkel et al. 2021).

    Every hidden group whose output a weight reads receives, on its output
    state, $B_g\, y^{*t}$: a fixed random projection of this step's (flattened)
    **target**, not of the error. Nothing is back-propagated through the weights
    that read hidden values (the readout's transpose never appears in the
    gradient computation), so hidden layers learn forward-only; the readout itself
    gets its ordinary gradient. Targets reach the algorithm through the step:
    `learner.step(model, trace_state, x, target)`; use one-hot targets for classes.
    The signal is linear in the target and does not see the loss, so the loss's
    weighting is applied to it: `etrace.online_grad` passes each step's target
    multiplied by that step's `mask` weight (and by `1/B` for a batch's mean loss),
    and a hand-written loop should do the same. The sign of the projection is
    immaterial (it is absorbed in $B$).

    **Arguments:**

    - `feedback`: an `etrace.FixedRandomFeedback` (default: seed 0, scale 1).
    - `recurrent`: `False` (default) for OSTL's feed-forward trace (D-RTRL),
        `True` to recur with the full diagonal blocks $H$ (`OSTLRecurrent`).
    """

    feedback: FixedRandomFeedback
    recurrent: bool
    learning_signal: ClassVar[str] = "target_feedback"

    def __init__(self, feedback: Any = None, *, recurrent: bool = False):
        if feedback is None:
            feedback = FixedRandomFeedback()
        if not isinstance(feedback, FixedRandomFeedback):
            raise EtraceError(
                "`feedback` must be an `etrace.FixedRandomFeedback(seed, scale)`, "
                f"got {feedback!r}."
            )
        self.feedback = feedback
        self.recurrent = bool(recurrent)

    @property
    def full_diagonal(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.recurrent

    def project(self, index: int, vector: Array, n: int) -> Array:
        return self.feedback.project(index, vector, n)

    def exact_regime(self, facts: Any) -> Any:
        regime = facts.diagonal(full_diagonal=self.recurrent)
        return facts.restrict(
            regime,
            facts.receiving_signal(),
            "OSTTP's learning signal is a random projection of the target, not the "
            "gradient",
        )
