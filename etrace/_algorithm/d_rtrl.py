"""Diagonal real-time recurrent learning."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._errors import EtraceError
from .._graph import Unit
from .base import AbstractUnitAlgorithm


def diagonal_init(unit: Unit) -> tuple[Float[Array, "b w f c"], ...]:
    """A zero D-RTRL trace for one unit: one `(B, Fw, Fx, C)` array per state `k`."""
    return tuple(jnp.zeros(unit.shape, unit.site.dtype) for _ in range(unit.k))


def _recur(trace, D, drive):
    """`new[k] = sum_j D[..., k, j] * trace[j] + drive(k)`, one element-wise
    expression per state that XLA fuses into a single pass over the trace. (A
    contraction over `K` inside an einsum, with `K` the minor axis, compiles to
    many tiny matrix products instead.)"""
    out = []
    for k in range(len(trace)):
        new = drive(k)
        for j, eps in enumerate(trace):
            d = D[..., k, j]
            new = new + jnp.reshape(d, d.shape + (1,) * (eps.ndim - d.ndim)) * eps
        out.append(new)
    return tuple(out)


def diagonal_update(trace, D, Df, x):
    """`eps = D eps + Df (x) x` in canonical layout: `trace` is one `(B, Fw, Fx, C)`
    array per state, `D` is `(B, Fw, Fx, K, K)`, `Df` is `(B, Fw, Fx, K)` and `x` is
    `(B, Fx, C)`."""
    return _recur(trace, D, lambda k: Df[..., k, None] * x[:, None])


def diagonal_readout(trace, signal):
    """`grad[m, i] = sum_k c_k[n(m)] eps[k][m, i]` in canonical layout."""
    return sum(
        jnp.einsum("bwf,bwfc->bwc", signal[..., k], eps) for k, eps in enumerate(trace)
    )


def nonzeros(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical `(b, w, c)` coordinates of a masked weight's possible
    non-zeros, in `np.nonzero(unit.site.pattern)` order."""
    assert unit.site.pattern is not None
    b, w, c = np.nonzero(unit.site.pattern)
    return b, w, c


def sparse_init(unit: Unit) -> tuple[Float[Array, "nnz f"], ...]:
    """A zero D-RTRL trace kept at a masked weight's non-zeros: one `(nnz, Fx)`
    array per state."""
    nnz = len(nonzeros(unit)[0])
    return tuple(jnp.zeros((nnz, unit.site.fx), unit.site.dtype) for _ in range(unit.k))


def _rows(a, index):
    """`a[index]` on the flattened leading axis, for static sorted indices."""
    return a.at[index].get(indices_are_sorted=True, mode="promise_in_bounds")


def sparse_update(unit: Unit, trace, D, Df, x):
    """`diagonal_update` at the non-zeros only."""
    s = unit.site
    b, w, c = nonzeros(unit)
    bw = b * s.fw + w
    D = _rows(D.reshape((s.b * s.fw,) + D.shape[2:]), bw)
    Df = _rows(Df.reshape((s.b * s.fw,) + Df.shape[2:]), bw)
    x = _rows(jnp.swapaxes(x, 1, 2).reshape(s.b * s.c, s.fx), b * s.c + c)
    return _recur(trace, D, lambda k: Df[..., k] * x)


def sparse_readout(unit: Unit, trace, signal):
    """`diagonal_readout` at the non-zeros, scattered to canonical `(B, Fw, C)`."""
    s = unit.site
    b, w, c = nonzeros(unit)
    signal = _rows(signal.reshape((s.b * s.fw,) + signal.shape[2:]), b * s.fw + w)
    grad = sum(jnp.sum(signal[..., k] * eps, axis=1) for k, eps in enumerate(trace))
    # Scatter as a gather (faster on CPU): every canonical entry reads its non-zero,
    # or the appended zero.
    where = np.full(s.b * s.fw * s.c, len(b))
    where[(b * s.fw + w) * s.c + c] = np.arange(len(b))
    padded = jnp.concatenate([grad, jnp.zeros(1, grad.dtype)])
    return padded[where].reshape(s.b, s.fw, s.c)


class AbstractDiagonalAlgorithm(AbstractUnitAlgorithm):
    """An algorithm whose per-unit trace is D-RTRL's (`D_RTRL`, the OSTL variants,
    `OSTTP`): they differ in the Jacobian the trace recurs with or in the learning
    signal, not in the trace."""

    def stores_sparse(self, unit: Unit) -> bool:
        """Whether `unit`'s trace is kept at its weight's non-zeros only: for a
        weight with structural zeros (a constant mask), unless disabled."""
        return unit.site.pattern is not None and getattr(self, "sparse", True)

    def init_unit(self, unit: Unit) -> tuple[Float[Array, "*trace"], ...]:
        if self.stores_sparse(unit):
            return sparse_init(unit)
        return diagonal_init(unit)

    def update_unit(self, unit, trace, D, Df, x):
        if self.stores_sparse(unit):
            return sparse_update(unit, trace, D, Df, x)
        return diagonal_update(trace, D, Df, x)

    def gradient_unit(self, unit, trace, signal, Df, x):
        del Df, x
        if self.stores_sparse(unit):
            return sparse_readout(unit, trace, signal)
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
    (2023).

    A weight with structural zeros (`(mask * W) @ x` with a constant mask, or a
    mask kept as a boolean/integer array of the model) keeps its trace at the
    mask's non-zeros only, `K` arrays `(nnz, Fx)` in `np.nonzero(unit.site.pattern)`
    order, instead of `K` arrays `(B, Fw, Fx, C)`; the gradient is zero off the mask.

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
