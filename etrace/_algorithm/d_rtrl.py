"""Diagonal real-time recurrent learning."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float

from .._errors import EtraceError
from .._graph import Unit
from .base import (
    AbstractUnitAlgorithm,
    batch_sum,
    fused,
    keeps_full_traces,
    outer_product_sum,
    overrides,
    weighted_states,
)


# A dense trace whose weight has at most this many inputs `C` (a GRU's input
# weight) is stored turned, `(B, C, Fw, Fx)`: XLA on CPU runs the update of a
# trace whose last axis is that short about 3 times slower than the same update
# with the long output axis last (`(64, 192, 10)`: 37 to 53 against 12 to 17 us
# per step in a loop of the update alone); at `C = 64` the two are even.
_TURNED_INPUTS = 16


def turned_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A turned trace's shape: `(B, Fw, Fx, C)` to `(B, C, Fw, Fx)`."""
    b, w, f, c = shape
    return (b, c, w, f)


def turns(unit: Unit) -> bool:
    """Whether a dense D-RTRL trace of `unit` is worth storing turned: few inputs
    against many outputs (the shapes then also tell the two layouts apart)."""
    _, w, f, c = unit.shape
    return 2 <= c <= _TURNED_INPUTS and w * f >= 4 * c


def is_turned(unit: Unit, trace) -> bool:
    """Whether `trace` (one unit's tuple, any leading axes) is stored turned."""
    shape = turned_shape(unit.shape)
    return shape != tuple(unit.shape) and any(
        eps is not None and tuple(eps.shape[-4:]) == shape for eps in trace
    )


def _stored_turned(unit: Unit, trace) -> bool:
    """`is_turned` for a trace of any structure: `False` unless it is a D-RTRL
    trace, a tuple of arrays (or shapes) and `None`s, stored turned."""
    if not isinstance(trace, tuple) or not all(
        eps is None or hasattr(eps, "shape") for eps in trace
    ):
        return False
    return is_turned(unit, trace)


def canonical(unit: Unit, trace):
    """`trace` in canonical layout `(..., B, Fw, Fx, C)`, whichever it is stored in."""
    if not is_turned(unit, trace):
        return trace
    return tuple(None if eps is None else jnp.moveaxis(eps, -3, -1) for eps in trace)


def diagonal_init(
    unit: Unit, untraced: tuple[int, ...] = (), turned: bool = False
) -> tuple[Float[Array, "b w f c"] | None, ...]:
    """A zero D-RTRL trace for one unit: one `(B, Fw, Fx, C)` array per state `k`
    (`(B, C, Fw, Fx)` if `turned`), `None` for the states in `untraced`."""
    shape = turned_shape(unit.shape) if turned else unit.shape
    return tuple(
        None if k in untraced else jnp.zeros(shape, unit.site.dtype)
        for k in range(unit.k)
    )


def _recur(trace, D, drive, group=None, turned=False, every=False, base=None):
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
    of `D` are skipped; `every` and `base` are `_recur`'s."""
    if turned:
        xt = jnp.swapaxes(x, -1, -2)[:, :, None]  # (B, C, 1, Fx)
        drive = lambda k: Df[:, None, ..., k] * xt  # noqa: E731
        return _recur(trace, D, drive, group, True, every, base)
    drive = lambda k: Df[..., k : k + 1] * x[:, None]  # noqa: E731
    return _recur(trace, D, drive, group, False, every, base)


def diagonal_readout(trace, signal, turned=False):
    """`grad[m, i] = sum_k c_k[n(m)] eps[k][m, i]` in canonical layout (from turned
    traces if `turned`)."""
    spec = "bwf,bcwf->bwc" if turned else "bwf,bwfc->bwc"
    terms = [jnp.einsum(spec, signal[..., k], eps) for k, eps in enumerate(trace)]
    return functools.reduce(operator.add, terms)


def _weighted_all(weights, arrays) -> Array:
    """`sum_k weights[k] * arrays[k]` as additions, every weight given (`K >= 1`)."""
    return functools.reduce(operator.add, [w * a for w, a in zip(weights, arrays)])


def _weighted(weights, arrays):
    """`_weighted_all` leaving out the `None` weights (structural zeros); `None`
    when every weight is."""
    kept = [(w, a) for w, a in zip(weights, arrays) if w is not None]
    return _weighted_all(*zip(*kept)) if kept else None


def summed_diagonal_readout(trace, signal, turned=False):
    """`diagonal_readout` summed over a batch (a leading axis on every argument)."""
    if turned:
        weights = [jnp.expand_dims(signal[..., k], 2) for k in range(len(trace))]
        return jnp.swapaxes(
            jnp.sum(batch_sum(_weighted_all(weights, trace)), -1), -1, -2
        )
    total = _weighted_all([signal[..., k, None] for k in range(len(trace))], trace)
    return jnp.sum(batch_sum(total), axis=2)


def nonzeros(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The canonical `(b, w, c)` coordinates of a masked weight's possible
    non-zeros, in `np.nonzero(unit.site.pattern)` order."""
    assert unit.site.pattern is not None
    b, w, c = np.nonzero(unit.site.pattern)
    return b, w, c


def sparse_init(
    unit: Unit, untraced: tuple[int, ...] = ()
) -> tuple[Float[Array, "nnz f"] | None, ...]:
    """A zero D-RTRL trace kept at a masked weight's non-zeros: one `(nnz, Fx)`
    array per state, `None` for the states in `untraced`."""
    nnz = len(nonzeros(unit)[0])
    return tuple(
        None if k in untraced else jnp.zeros((nnz, unit.site.fx), unit.site.dtype)
        for k in range(unit.k)
    )


def _rows(a, index, axis=0):
    """`a[index]` along `axis` (the flattened rows), for static sorted indices."""
    where = (slice(None),) * axis + (index,)
    return a.at[where].get(indices_are_sorted=True, mode="promise_in_bounds")


def sparse_update(unit: Unit, trace, D, Df, x, group=None):
    """`diagonal_update` at the non-zeros only."""
    s = unit.site
    b, w, c = nonzeros(unit)
    bw = b * s.fw + w
    D = _rows(D.reshape((s.b * s.fw,) + D.shape[2:]), bw)
    Df = _rows(Df.reshape((s.b * s.fw,) + Df.shape[2:]), bw)
    x = _rows(jnp.swapaxes(x, 1, 2).reshape(s.b * s.c, s.fx), b * s.c + c)
    return _recur(trace, D, lambda k: Df[..., k] * x, group)


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
    """`diagonal_readout` at the non-zeros, scattered to canonical `(B, Fw, C)`."""
    signal = _sparse_signal(unit, signal)
    terms = [jnp.sum(signal[..., k] * eps, axis=1) for k, eps in enumerate(trace)]
    return _scatter(unit, functools.reduce(operator.add, terms))


def summed_sparse_readout(unit: Unit, trace, signal):
    """`sparse_readout` summed over a batch (a leading axis on every argument):
    summed at the non-zeros, then scattered once."""
    signal = _sparse_signal(unit, signal)
    total = _weighted_all([signal[..., k] for k in range(len(trace))], trace)
    return _scatter(unit, jnp.sum(batch_sum(total), axis=1))


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


def _lift(a, turned):
    """A per-output factor `(..., B, Fw, Fx)` against the traces (with a unit `C`
    axis where the trace has it)."""
    return jnp.expand_dims(a, -3) if turned else a[..., None]


def previous_readout(previous, s, cdf, x, summed=False, turned=False):
    """`diagonal_readout` of the traces after the update, from the traces before
    it: `sum_j s_j eps_j^{t-1} + (sum_k c_k Df_k) (x) x`. Summed over a leading
    batch axis with `summed`; from turned traces if `turned`."""

    def over_fx(total):  # the sum over `Fx`, to `(..., B, Fw, C)`
        if turned:
            return jnp.swapaxes(jnp.sum(total, -1), -1, -2)
        return jnp.sum(total, axis=-2)

    total = _weighted([None if sj is None else _lift(sj, turned) for sj in s], previous)
    if summed:
        grad = outer_product_sum(cdf, x)
        if total is not None:
            grad = grad + over_fx(batch_sum(total))
        return grad
    grad = jnp.einsum("bwf,bfc->bwc", cdf, x)
    if total is not None:
        grad = grad + over_fx(total)
    return grad


def sparse_previous_readout(unit: Unit, previous, s, cdf, x, summed=False):
    """`previous_readout` for traces kept at a masked weight's non-zeros."""
    site = unit.site
    b, w, c = nonzeros(unit)
    lead = cdf.shape[:-3]

    def rows(a):  # (..., B, Fw, Fx) -> (..., nnz, Fx)
        flat = a.reshape(lead + (site.b * site.fw, site.fx))
        return _rows(flat, b * site.fw + w, len(lead))

    xt = jnp.swapaxes(x, -1, -2).reshape(lead + (site.b * site.c, site.fx))
    total = rows(cdf) * _rows(xt, b * site.c + c, len(lead))
    recurrent = _weighted([None if sj is None else rows(sj) for sj in s], previous)
    if recurrent is not None:
        total = total + recurrent
    if summed:
        total = batch_sum(total)
    return _scatter(unit, jnp.sum(total, axis=-1))


def transient_states(group) -> tuple[int, ...]:
    """The states of `group` whose previous value no state's update reads (an
    all-zero column of `D`): a spike."""
    if group.coupling is None:
        return ()
    return tuple(j for j in range(group.k) if not any(row[j] for row in group.coupling))


def _check_readable(unit: Unit, trace, group) -> None:
    """Every trace the update reads is there (`None` only where no state's update
    reads it): traces from another algorithm's `init` may lack one."""
    names = unit.group.leaf_names
    for k, eps in enumerate(trace):
        for j, other in enumerate(trace):
            if eps is None or other is not None:
                continue
            if group is None or group.couples(k, j):
                raise EtraceError(
                    f"The update of `{unit.site.name}`'s trace for {names[k]} reads "
                    f"the trace of {names[j]}, which is `None`: these traces come "
                    "from another algorithm's `init` (D-RTRL keeps none for a state "
                    "that no update reads). Start from this learner's "
                    "`learner.init()`."
                )


def _check_kept(unit: Unit, trace) -> None:
    """The read-out from the updated traces needs every state's trace."""
    missing = [k for k, eps in enumerate(trace) if eps is None]
    if missing:
        names = ", ".join(unit.group.leaf_names[k] for k in missing)
        raise EtraceError(
            f"The read-out of `{unit.site.name}` from the updated traces needs the "
            f"trace of {names}, which D-RTRL does not keep (no update reads that "
            "state's previous value, and its own read-out uses the traces before "
            "the update). A wrapper that reads out from the updated traces should "
            "subclass `etrace.AbstractWrappedAlgorithm`, whose `init` keeps them."
        )


# The methods whose shipped versions `gradients_from_previous` reproduces.
_DIAGONAL_METHODS = (
    "update",
    "update_unit",
    "gradients",
    "gradient_unit",
    "summed_gradients",
    "summed_gradient_unit",
)


class AbstractDiagonalAlgorithm(AbstractUnitAlgorithm):
    """An algorithm whose per-unit trace is D-RTRL's (`D_RTRL`, the OSTL variants,
    `OSTTP`): they differ in the Jacobian the trace recurs with or in the learning
    signal, not in the trace."""

    def stores_sparse(self, unit: Unit) -> bool:
        """Whether `unit`'s trace is kept at its weight's non-zeros only: for a
        weight with structural zeros (a constant mask), unless disabled."""
        return unit.site.pattern is not None and getattr(self, "sparse", True)

    def untraced(self, unit: Unit) -> tuple[int, ...]:
        """The states of `unit`'s group whose trace is not kept: those no state's
        update reads (a spike), when the gradient is read from the traces before
        the update (`gradients_from_previous`), which never reads them. Empty for
        the full diagonal blocks, for a subclass that replaces a method of the
        recurrence or the read-out, and under a wrapper that reads out from the
        updated traces."""
        if (
            keeps_full_traces()
            or overrides(
                self, AbstractDiagonalAlgorithm, "init_unit", "gradients_from_previous"
            )
            or not self._reads_previous(unit.group)
        ):
            return ()
        return transient_states(unit.group)

    def _reads_previous(self, group) -> bool:
        """Whether the gradient of `group`'s units is read from the traces before
        the update (see `gradients_from_previous`)."""
        # Unchanged shipped methods only: a subclass that changes the recurrence
        # or the read-out is read out from its own traces after its own update.
        # Only worth it for a group with a state whose previous value nothing
        # reads (a spike): its trace is then never read. Otherwise the read-out
        # of the updated traces is cheaper, because XLA can update them in place
        # only when nothing reads the previous traces afterwards.
        return (
            not getattr(self, "full_diagonal", False)
            and not overrides(self, AbstractDiagonalAlgorithm, *_DIAGONAL_METHODS)
            and bool(transient_states(group))
        )

    def init_unit(self, unit: Unit) -> tuple[Float[Array, "*trace"] | None, ...]:
        untraced = self.untraced(unit)
        if self.stores_sparse(unit):
            return sparse_init(unit, untraced)
        return diagonal_init(unit, untraced, self._turns(unit))

    def _turns(self, unit: Unit) -> bool:
        """Whether `init_unit` stores `unit`'s dense trace turned (`turns`): only
        for the shipped recurrence and read-out, which read either layout, and not
        for a wrapper that reads out from the updated traces itself."""
        return (
            turns(unit)
            and not keeps_full_traces()
            and not overrides(
                self, AbstractDiagonalAlgorithm, "init_unit", *_DIAGONAL_METHODS
            )
        )

    def transposed_gradients(self, graph, traces) -> frozenset[str]:
        """The units whose summed gradient the read-out forms transposed: those
        whose dense trace `traces` stores turned (`turns`), read out as
        `(B, C, Fw)` and swapped to the canonical `(B, Fw, C)` last. A layout hint
        for `etrace.online_grad`, which then keeps those running sums transposed
        (see `AbstractAlgorithm`); `traces` may be shapes (`jax.eval_shape`)."""
        return frozenset(
            u.name
            for u in graph.units
            if not self.stores_sparse(u) and _stored_turned(u, traces.get(u.name))
        )

    def update(self, graph, traces, jac):
        if getattr(self, "full_diagonal", False):
            jac = dataclasses.replace(jac, D=jac.H)
        return super().update(graph, traces, jac)

    def update_unit(self, unit, trace, D, Df, x):
        # `D` is the group's diagonal Jacobian, whose structural zeros the group
        # records, unless the recurrence uses the full diagonal blocks `H`.
        group = None if getattr(self, "full_diagonal", False) else unit.group
        _check_readable(unit, trace, group)
        if self.stores_sparse(unit):
            return sparse_update(unit, trace, D, Df, x, group)
        return diagonal_update(trace, D, Df, x, group, is_turned(unit, trace))

    def gradient_unit(self, unit, trace, signal, Df, x):
        del Df, x
        _check_kept(unit, trace)
        if self.stores_sparse(unit):
            return sparse_readout(unit, trace, signal)
        return diagonal_readout(trace, signal, is_turned(unit, trace))

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        del Df, x
        if overrides(self, AbstractDiagonalAlgorithm, "gradient_unit"):
            return None
        _check_kept(unit, trace)
        if self.stores_sparse(unit):
            return summed_sparse_readout(unit, trace, signal)
        return summed_diagonal_readout(trace, signal, is_turned(unit, trace))

    def gradients_from_previous(self, graph, traces, signal, jac, *, summed=False):
        if not any(self._reads_previous(g) for g in graph.groups):
            return None
        axis = 1 if summed else 0
        out = {}
        for u in graph.units:
            D = u.gather(jac.D[u.group.name], axis=axis)
            c = u.gather(signal[u.group.name], axis=axis)
            s, cdf = previous_factors(D, c, jac.Df[u.name], u.group)
            x = jac.x[u.name]
            if self.stores_sparse(u):
                grad = sparse_previous_readout(u, traces[u.name], s, cdf, x, summed)
            else:
                trace = traces[u.name]
                turned = is_turned(u, trace)
                grad = previous_readout(trace, s, cdf, x, summed, turned)
            out[u.name] = grad
        return out


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


# Chunks: `etrace.online_grad(..., chunk=S)` advances a D-RTRL trace over `S`
# steps at once. Over a chunk that starts from `e0`, with `Phi(t, s) = D_t ...
# D_{s+1}`, the trace is `e_t = Phi(t, -1) e0 + sum_{s<=t} Phi(t, s) Df_s x_s`,
# so the chunk's end is `e = Phi(S-1, -1) e0 + sum_s g_s (x) x_s` with
# `g_s = Phi(S-1, s) Df_s`, and the chunk's gradient `sum_t c_t . e_t` is
# `q . e0 + sum_s (m_s . Df_s) (x) x_s` with the row vectors
# `m_s = sum_{t>=s} c_t Phi(t, s)` (`m_s = c_s + m_{s+1} D_{s+1}`) and
# `q = m_0 D_0`. The same arithmetic reassociated: two passes over the trace per
# chunk instead of per step, the rest matrix products over the chunk's steps.
# `P_s = Phi(S-1, s)`, `m_s`, `Phi(S-1, -1)` and `q` are per neuron, computed
# once per group and gathered to each unit's outputs.


def chunkable(algorithm) -> bool:
    """Whether `online_grad(..., chunk=S)` can advance `algorithm`'s traces: an
    `AbstractDiagonalAlgorithm` with the shipped traces, recurrence and read-out."""
    return isinstance(algorithm, AbstractDiagonalAlgorithm) and not overrides(
        algorithm, AbstractDiagonalAlgorithm, "init_unit", *_DIAGONAL_METHODS
    )


def split_entries(D, group=None):
    """`D` `(..., K, K)` as rows of its entries `D[..., k, j]`, `None` where
    `group.coupling` makes one zero (every entry without a `group`). A chunk
    records `D` and `Df` so: with the few states on the minor axis, XLA on CPU
    stacks, transposes and joins them many times slower than arrays with the
    neurons on it."""
    k = D.shape[-1]
    return tuple(
        tuple(
            D[..., i, j] if group is None or group.couples(i, j) else None
            for j in range(k)
        )
        for i in range(k)
    )


def _total(terms):
    """The sum of `terms`, `None` (zero) for none."""
    return functools.reduce(operator.add, terms) if terms else None


def _row_times(m, D):
    """The row vector `m` (one entry per state, `None` for zero) times the matrix
    of entries `D` (`split_entries`), entry by entry."""
    return tuple(
        _total(
            [
                m[i] * D[i][j]
                for i in range(len(m))
                if m[i] is not None and D[i][j] is not None
            ]
        )
        for j in range(len(D))
    )


def _reach(D) -> np.ndarray:
    """Where a product of one or more of the chunk's `D` can be non-zero, from
    the pattern of the entries (`split_entries`)."""
    z = np.array([[a is not None for a in row] for row in D], dtype=int)
    reach = z > 0
    while True:
        more = reach | ((reach.astype(int) @ z) > 0)
        if (more == reach).all():
            return reach
        reach = more


def chunk_products(D, rows, steps, shape, dtype):
    """Rows `rows` of `P_s = D_{S-1} ... D_{s+1}` (the identity for the last step)
    for each of a chunk's `steps`, and of `Phi = P_0 D_0`: `D` the chunk's entries
    (`split_entries`, each `(S,) + shape`). Returns dictionaries from each row
    `k` to its entries, `(S,) + shape` for `P` and `shape` for `Phi` (`None`
    where they are zero at every step)."""
    k = len(D)
    keep = _reach(D) | np.eye(k, dtype=bool)
    one, zero = jnp.ones(shape, dtype), jnp.zeros(shape, dtype)
    last = {
        r: tuple((one if r == j else zero) if keep[r, j] else None for j in range(k))
        for r in rows
    }

    def step(P, Dn):  # `P_s = P_{s+1} D_{s+1}`, on the entries `keep` allows
        P = {
            r: tuple(
                (zero if a is None else a) if keep[r, j] else None
                for j, a in enumerate(_row_times(P[r], Dn))
            )
            for r in rows
        }
        return P, P

    D_next = jtu.tree_map(lambda a: a[1:], D)
    _, earlier = jax.lax.scan(step, last, D_next, steps - 1, reverse=True)
    P = jtu.tree_map(lambda e, a: jnp.concatenate([e, a[None]]), earlier, last)
    D0 = jtu.tree_map(lambda a: a[0], D)
    Phi = {r: _row_times(jtu.tree_map(lambda a: a[0], P[r]), D0) for r in rows}
    return P, Phi


def chunk_signals(D, c):
    """The row vectors `m_s = c_s + m_{s+1} D_{s+1}` (`m_{S-1} = c_{S-1}`) for
    each step of a chunk, and `q = m_0 D_0`: `D` the chunk's entries
    (`split_entries`), `c` its learning signals, one `(S, ...)` array per state.
    Returns `m` (one array per state) and `q` (`None` where zero)."""
    D_next = jtu.tree_map(lambda a: a[1:], D)
    c_earlier = tuple(a[:-1] for a in c)
    last = tuple(a[-1] for a in c)

    def step(m, inputs):
        Dn, cs = inputs
        m = tuple(
            cs[j] if t is None else cs[j] + t for j, t in enumerate(_row_times(m, Dn))
        )
        return m, m

    _, earlier = jax.lax.scan(
        step, last, (D_next, c_earlier), c[0].shape[0] - 1, reverse=True
    )
    m = tuple(jnp.concatenate([e, a[None]]) for e, a in zip(earlier, last))
    return m, _row_times(tuple(a[0] for a in m), jtu.tree_map(lambda a: a[0], D))


def _over_steps(a, x, turned=False):
    """`sum_n a[n, b, w, f] x[n, b, f, c]` as `(B, Fw, C)` (`(B, C, Fw)` if
    `turned`): `outer_product_sum`, or for one input (`C = 1`, an element-wise
    parameter) `x^T a` or a sum, which XLA on CPU runs faster than the product it
    makes of it."""
    n, b, w, f = a.shape
    if x.shape[-1] != 1:
        return outer_product_sum(a, x, turned)
    if b == 1 and f == 1:
        out = (x.reshape(1, n) @ a.reshape(n, w)).reshape(1, w, 1)
    else:
        out = jnp.sum(batch_sum(a * jnp.swapaxes(x, -1, -2)), axis=-1)[..., None]
    return jnp.swapaxes(out, -1, -2) if turned else out


def chunk_update(trace, P, Phi, Df, x, turned=False):
    """The trace after a chunk of `S` steps from the trace `e0` before it, `Phi e0
    + sum_s (P_s Df_s) (x) x_s`: `P` and `Phi` the rows of `chunk_products`
    gathered to the unit's outputs (`(S, B, Fw, Fx)` and `(B, Fw, Fx)` entries),
    `Df` one `(S, B, Fw, Fx)` array per state, `x` `(S, B, Fx, C)`; `trace` one
    array per state (canonical, or turned if `turned`, and so returned; `None`
    for a state whose previous value no update reads)."""
    out = []
    for k, eps in enumerate(trace):
        if eps is None:
            out.append(None)
            continue
        g = _weighted(P[k], Df)  # `P[k][k]` is there: never `None`
        # `sum_s g_s (x) x_s`, for each `f` apart (no sum over `f`), in the
        # trace's layout.
        if x.shape[-2] == 1:
            new = jnp.expand_dims(_over_steps(g, x, turned), -1 if turned else -2)
        else:
            new = jax.vmap(_over_steps, (3, 2), 2)(g[..., None], x[..., None, :])
            new = jnp.moveaxis(new, -1, -3) if turned else new
        for j, other in enumerate(trace):
            if other is not None and Phi[k][j] is not None:
                new = new + _lift(Phi[k][j], turned) * other
        out.append(new)
    return tuple(out)


def chunk_readout(trace, m, q, Df, x, turned=False, summed=False):
    """A chunk's gradient `q . e0 + sum_s (m_s . Df_s) (x) x_s`, canonical `(B,
    Fw, C)`: `m` and `q` from `chunk_signals` gathered to the unit's outputs, the
    rest as for `chunk_update`; formed in the trace's layout, `(B, C, Fw)` if
    `turned`, and swapped last. With `summed`, every argument has a leading batch
    axis, summed over (before the steps' axis for `m`, `Df` and `x`)."""
    a = fused(_weighted_all(m, Df))
    if summed:  # the batch and the steps as one axis
        a, x = (jnp.reshape(v, (-1,) + v.shape[2:]) for v in (a, x))
    grad = _over_steps(a, x, turned)
    for j, eps in enumerate(trace):
        if eps is None or q[j] is None:
            continue
        term = _lift(q[j], turned) * eps
        if summed:
            term = batch_sum(term)
        grad = grad + jnp.sum(term, axis=-1 if turned else -2)
    return jnp.swapaxes(grad, -1, -2) if turned else grad
