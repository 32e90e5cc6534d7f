"""D-RTRL's trace of a weight with structural zeros (a constant mask), kept at
the mask's non-zeros only: one `(nnz, Fx)` array per state."""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact

from ..._graph import Unit
from ..._kernels import batch_sum
from .dense import recur, weighted, weighted_all


def nonzeros(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical `(b, w, c)` coordinates of a masked weight's possible
    non-zeros, in `np.nonzero(unit.site.pattern)` order."""
    pattern = unit.site.pattern
    if pattern is None:
        raise ValueError(f"`{unit.site.name}` has no mask")
    b, w, c = np.nonzero(pattern)
    return b, w, c


def sparse_init(
    unit: Unit, untraced: tuple[int, ...] = ()
) -> tuple[Inexact[Array, "nnz f"] | None, ...]:
    """A zero trace kept at a masked weight's non-zeros: one `(nnz, Fx)` array per
    state, `None` for the states in `untraced`."""
    nnz = len(nonzeros(unit)[0])
    return tuple(
        None if k in untraced else jnp.zeros((nnz, unit.site.fx), unit.dtype)
        for k in range(unit.k)
    )


def _rows(a, index, axis=0):
    """`a[index]` along `axis` (the flattened rows), for static sorted indices."""
    where = (slice(None),) * axis + (index,)
    return a.at[where].get(indices_are_sorted=True, mode="promise_in_bounds")


def sparse_update(unit: Unit, trace, D, Df, x, group=None):
    """`dense.diagonal_update` at the non-zeros only."""
    s = unit.site
    b, w, c = nonzeros(unit)
    bw = b * s.fw + w
    D = _rows(D.reshape((s.b * s.fw,) + D.shape[2:]), bw)
    Df = _rows(Df.reshape((s.b * s.fw,) + Df.shape[2:]), bw)
    x = _rows(jnp.swapaxes(x, 1, 2).reshape(s.b * s.c, s.fx), b * s.c + c)
    return recur(trace, D, lambda k: Df[..., k] * x, group)


def _scatter(unit: Unit, grad):
    """Values at the non-zeros `(..., nnz)` into canonical `(..., B, Fw, C)`, as a
    gather (faster on CPU than a scatter): every canonical entry reads its
    non-zero, or an appended zero."""
    s = unit.site
    b, w, c = nonzeros(unit)
    where = np.full(s.b * s.fw * s.c, len(b))
    where[(b * s.fw + w) * s.c + c] = np.arange(len(b))
    lead = grad.shape[:-1]
    padded = jnp.concatenate([grad, jnp.zeros(lead + (1,), grad.dtype)], axis=-1)
    return padded[..., where].reshape(lead + (s.b, s.fw, s.c))


def _sparse_signal(unit: Unit, signal):
    """The signal `(..., B, Fw, Fx, K)` at each non-zero: `(..., nnz, Fx, K)`."""
    s = unit.site
    b, w, _ = nonzeros(unit)
    lead = signal.shape[:-4]
    flat = signal.reshape(lead + (s.b * s.fw,) + signal.shape[-2:])
    return _rows(flat, b * s.fw + w, len(lead))


def sparse_readout(unit: Unit, trace, signal):
    """`dense.diagonal_readout` at the non-zeros, scattered to `(B, Fw, C)`."""
    signal = _sparse_signal(unit, signal)
    terms = [jnp.sum(signal[..., k] * eps, axis=1) for k, eps in enumerate(trace)]
    return _scatter(unit, functools.reduce(operator.add, terms))


def summed_sparse_readout(unit: Unit, trace, signal):
    """`sparse_readout` summed over a batch (a leading axis on every argument):
    summed at the non-zeros, then scattered once."""
    signal = _sparse_signal(unit, signal)
    total = weighted_all([signal[..., k] for k in range(len(trace))], trace)
    return _scatter(unit, jnp.sum(batch_sum(total), axis=1))


def sparse_previous_readout(unit: Unit, previous, s, cdf, x, summed=False):
    """`dense.previous_readout` for traces kept at the non-zeros."""
    site = unit.site
    b, w, c = nonzeros(unit)
    lead = cdf.shape[:-3]

    def rows(a):  # (..., B, Fw, Fx) -> (..., nnz, Fx)
        flat = a.reshape(lead + (site.b * site.fw, site.fx))
        return _rows(flat, b * site.fw + w, len(lead))

    xt = jnp.swapaxes(x, -1, -2).reshape(lead + (site.b * site.c, site.fx))
    total = rows(cdf) * _rows(xt, b * site.c + c, len(lead))
    recurrent = weighted([None if sj is None else rows(sj) for sj in s], previous)
    if recurrent is not None:
        total = total + recurrent
    if summed:
        total = batch_sum(total)
    return _scatter(unit, jnp.sum(total, axis=-1))
