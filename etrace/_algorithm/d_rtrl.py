"""Diagonal real-time recurrent learning."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._graph import Unit
from .base import AbstractUnitAlgorithm


def diagonal_init(unit: Unit) -> Float[Array, "b w f c k"]:
    """A zero D-RTRL trace `(B, Fw, Fx, C, K)` for one unit."""
    return jnp.zeros(unit.shape + (unit.k,), unit.site.dtype)


def diagonal_update(trace, D, Df, x):
    """`eps = D eps + Df (x) x` in canonical layout."""
    decayed = jnp.einsum("bwfkj,bwfcj->bwfck", D, trace)
    return decayed + jnp.einsum("bwfk,bfc->bwfck", Df, x)


def diagonal_readout(trace, signal):
    """`grad[m, i] = sum_k c_k[n(m)] eps[i, m, k]` in canonical layout."""
    return jnp.einsum("bwfk,bwfck->bwc", signal, trace)


class AbstractDiagonalAlgorithm(AbstractUnitAlgorithm):
    """An algorithm whose per-unit trace is D-RTRL's (`D_RTRL`, the OSTL variants,
    `OSTTP`): they differ in the Jacobian the trace recurs with or in the learning
    signal, not in the trace."""

    def init_unit(self, unit: Unit) -> Float[Array, "b w f c k"]:
        return diagonal_init(unit)

    def update_unit(self, unit, trace, D, Df, x):
        del unit
        return diagonal_update(trace, D, Df, x)

    def gradient_unit(self, unit, trace, signal, Df, x):
        del unit, Df, x
        return diagonal_readout(trace, signal)


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
    (2023); the trace in this form is the D-RTRL of braintrace/brainstate.
    """
