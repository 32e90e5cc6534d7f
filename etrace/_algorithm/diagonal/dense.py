"""D-RTRL's trace, one `(B, Fw, Fx, C)` array per state (or turned), its
recurrence and its read-outs."""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
from jaxtyping import Array, Inexact

from ..._graph import Unit
from ..._kernels import batch_sum, outer_product_sum, weighted_states
from .turned import lift, turned_shape


def transient_states(group) -> tuple[int, ...]:
    """The states of `group` whose previous value no state's update reads (an
    all-zero column of `D`): a spike."""
    if group.coupling is None:
        return ()
    return tuple(j for j in range(group.k) if not any(row[j] for row in group.coupling))


def diagonal_init(
    unit: Unit, untraced: tuple[int, ...] = (), turned: bool = False
) -> tuple[Inexact[Array, "b w f c"] | None, ...]:
    """A zero D-RTRL trace for one unit: one `(B, Fw, Fx, C)` array per state `k`
    (`(B, C, Fw, Fx)` if `turned`), `None` for the states in `untraced`."""
    shape = turned_shape(unit.shape) if turned else unit.shape
    return tuple(
        None if k in untraced else jnp.zeros(shape, unit.dtype) for k in range(unit.k)
    )


def recur(trace, D, drive, group=None, turned=False, every=False, base=None):
    """`new[k] = sum_j D[..., k, j] * trace[j] + drive(k)`, one element-wise
    expression per state that XLA fuses into a single pass over the trace. (A
    contraction over `K` inside an einsum, with `K` the minor axis, compiles to
    many tiny matrix products instead.) Terms that `group.coupling` says are
    structurally zero are left out: XLA cannot drop `0 * eps` itself (it is not
    zero for an infinite `eps`), and the previous trace of a state that no
    state's update reads (a spike) is then not read at all. A transient state's
    trace that is not kept (`None`) stays `None`, or with `every` is computed from
    the kept ones (which are all its update reads). With `base` (one array per
    state), `new[k]` is `base[k] + drive(k)` plus the terms of `D`."""
    out = []
    for k in range(len(trace)):
        if trace[k] is None and not every:  # a transient state's trace, not kept
            out.append(None)
            continue
        new = drive(k) if base is None else base[k] + drive(k)
        for j, eps in enumerate(trace):
            if eps is None or (group is not None and not group.couples(k, j)):
                continue
            d = D[..., k, j]
            if turned:  # `(B, Fw, Fx)` against `(B, C, Fw, Fx)`
                d = jnp.expand_dims(d, 1)
            elif eps.ndim > d.ndim:
                # A slice keeps a unit axis in place of `C` (a reshape that adds
                # it can get an odd layout from XLA, and a slower update).
                d = D[..., k, j : j + 1]
            new = new + d * eps
        out.append(new)
    return tuple(out)


def diagonal_update(trace, D, Df, x, group=None, turned=False, every=False, base=None):
    """`eps = D eps + Df (x) x` in canonical layout: `trace` is one `(B, Fw, Fx, C)`
    array per state (`(B, C, Fw, Fx)` if `turned`), `D` is `(B, Fw, Fx, K, K)`, `Df`
    is `(B, Fw, Fx, K)` and `x` is `(B, Fx, C)`. With the `group`, structural zeros
    of `D` are skipped; `every` and `base` are `recur`'s."""
    if turned:
        xt = jnp.swapaxes(x, -1, -2)[:, :, None]  # (B, C, 1, Fx)
        drive = lambda k: Df[:, None, ..., k] * xt  # noqa: E731
        return recur(trace, D, drive, group, True, every, base)
    drive = lambda k: Df[..., k : k + 1] * x[:, None]  # noqa: E731
    return recur(trace, D, drive, group, False, every, base)


def diagonal_readout(trace, signal, turned=False):
    """`grad[m, i] = sum_k c_k[n(m)] eps[k][m, i]` in canonical layout (from turned
    traces if `turned`)."""
    spec = "bwf,bcwf->bwc" if turned else "bwf,bwfc->bwc"
    terms = [jnp.einsum(spec, signal[..., k], eps) for k, eps in enumerate(trace)]
    return functools.reduce(operator.add, terms)


def weighted_all(weights, arrays) -> Array:
    """`sum_k weights[k] * arrays[k]` as additions, every weight given (`K >= 1`)."""
    return functools.reduce(operator.add, [w * a for w, a in zip(weights, arrays)])


def weighted(weights, arrays):
    """`weighted_all` leaving out the `None` weights (structural zeros); `None`
    when every weight is."""
    kept = [(w, a) for w, a in zip(weights, arrays) if w is not None]
    return weighted_all(*zip(*kept)) if kept else None


def summed_diagonal_readout(trace, signal, turned=False):
    """`diagonal_readout` summed over a batch (a leading axis on every argument)."""
    if turned:
        weights = [jnp.expand_dims(signal[..., k], 2) for k in range(len(trace))]
        return jnp.swapaxes(
            jnp.sum(batch_sum(weighted_all(weights, trace)), -1), -1, -2
        )
    total = weighted_all([signal[..., k, None] for k in range(len(trace))], trace)
    return jnp.sum(batch_sum(total), axis=2)


def previous_factors(D, signal, Df, group=None):
    """For the read-out from the previous traces: per state `j`,
    `s_j = sum_k c_k D[k, j]` (`None` where `group.coupling` makes it zero), and
    `sum_k c_k Df_k`, all shaped like `Df[..., 0]`."""
    k = signal.shape[-1]
    s = []
    for j in range(k):
        terms = [
            signal[..., i] * D[..., i, j]
            for i in range(k)
            if group is None or group.couples(i, j)
        ]
        s.append(sum(terms[1:], terms[0]) if terms else None)
    return s, weighted_states(signal, Df)


def previous_readout(previous, s, cdf, x, summed=False, turned=False):
    """`diagonal_readout` of the traces after the update, from the traces before
    it: `sum_j s_j eps_j^{t-1} + (sum_k c_k Df_k) (x) x`. Summed over a leading
    batch axis with `summed`; from turned traces if `turned`."""

    def over_fx(total):  # the sum over `Fx`, to `(..., B, Fw, C)`
        if turned:
            return jnp.swapaxes(jnp.sum(total, -1), -1, -2)
        return jnp.sum(total, axis=-2)

    total = weighted([None if sj is None else lift(sj, turned) for sj in s], previous)
    if summed:
        grad = outer_product_sum(cdf, x)
        if total is not None:
            grad = grad + over_fx(batch_sum(total))
        return grad
    grad = jnp.einsum("bwf,bfc->bwc", cdf, x)
    if total is not None:
        grad = grad + over_fx(total)
    return grad
