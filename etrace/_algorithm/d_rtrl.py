"""Diagonal real-time recurrent learning."""

from __future__ import annotations

from typing import Any

import equinox as eqx

from .._errors import EtraceError
from .diagonal.base import AbstractDiagonalAlgorithm


class D_RTRL(AbstractDiagonalAlgorithm):
    r"""Diagonal RTRL: a full eligibility trace per weight, diagonal in the neurons.

    For a weight op $y = W x$ feeding a hidden group with $K$ states per neuron, the
    trace of weight $W_{mi}$ (output $m$ of neuron $n(m)$) follows

    $$\epsilon^t_{mik} = \sum_{k'} D^t_{n(m)kk'}\,\epsilon^{t-1}_{mik'}
        + D_f{}^t_{mk}\, x^t_i$$

    and the gradient is $\nabla W_{mi} = \sum_k c^t_{k}[n(m)]\,\epsilon^t_{mik}$ with
    $c^t = \partial L^t / \partial h^t$. Element-wise parameters are the case $x = 1$.
    Memory is $O(|W| K)$ per example.

    Exact (equal to BPTT) when every recurrence is element-wise: one temporal layer,
    no hidden-to-hidden weight, a readout without state of its own. With recurrent
    weights it drops the paths through them (the diagonal approximation).

    Reference: Murray, "Local online learning in recurrent networks with random
    feedback" (2019); Zucchet et al., "Online learning of long-range dependencies"
    (2023).

    A weight with structural zeros (`(mask * W) @ x` with a constant mask, or a
    mask kept as a boolean/integer array of the model) keeps its trace at the
    mask's non-zeros only, `K` arrays `(nnz, Fx)` in `np.nonzero(unit.site.pattern)`
    order, instead of `K` arrays `(B, Fw, Fx, C)`; the gradient is zero off the mask.
    A dense weight with few inputs (`2 <= C <= 16`, at least `4 C` outputs: a GRU's
    input weight) keeps its trace turned, `K` arrays `(B, C, Fw, Fx)`, whose update
    XLA on CPU runs faster; `learner.trace_of` shows it canonical.

    **Arguments:**

    - `sparse`: `False` to keep dense traces for masked weights too.
    """

    # Validated in `__check_init__` with an `EtraceError`, hence `Any`.
    sparse: Any = eqx.field(default=True, static=True)

    def __check_init__(self):
        if not isinstance(self.sparse, bool):
            raise EtraceError(
                f"`D_RTRL(sparse=...)` must be True or False, got {self.sparse!r}."
            )

    def exact_regime(self, facts: Any) -> Any:
        # Exact where every recurrence is element-wise.
        return facts.diagonal()
