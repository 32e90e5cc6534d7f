"""D-RTRL's traces advanced `S` steps at a time (`online_grad(..., chunk=S)`).

Over a chunk that starts from `e0`, with `Phi(t, s) = D_t ... D_{s+1}`, the trace
is `e_t = Phi(t, -1) e0 + sum_{s<=t} Phi(t, s) Df_s x_s`, so the chunk's end is
`e = Phi(S-1, -1) e0 + sum_s g_s (x) x_s` with `g_s = Phi(S-1, s) Df_s`, and the
chunk's gradient `sum_t c_t . e_t` is `q . e0 + sum_s (m_s . Df_s) (x) x_s` with
the row vectors `m_s = sum_{t>=s} c_t Phi(t, s)` (`m_s = c_s + m_{s+1} D_{s+1}`)
and `q = m_0 D_0`. The same arithmetic reassociated: two passes over the trace
per chunk instead of per step, the rest matrix products over the chunk's steps.
`P_s = Phi(S-1, s)`, `m_s`, `Phi(S-1, -1)` and `q` are per neuron, computed once
per group and gathered to each unit's outputs.

`D` and `Df` are recorded entry by entry and state by state (`split_entries`):
with the few states on the minor axis, XLA on CPU stacks, transposes and joins
them many times slower than arrays with the neurons on it."""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ..._kernels import batch_sum, fused, outer_product_sum
from .dense import weighted, weighted_all
from .turned import is_turned, lift


def split_entries(D, group=None):
    """`D` `(..., K, K)` as rows of its entries `D[..., k, j]`, `None` where
    `group.coupling` makes one zero (every entry without a `group`)."""
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
    # A real state's signal turns complex through a complex group's `D`.
    dtype = jnp.result_type(*c, *jtu.tree_leaves(D))
    c = tuple(a.astype(dtype) for a in c)
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


def advanced(trace, P, Phi, Df, x, turned=False):
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
        g = weighted(P[k], Df)  # `P[k][k]` is there: never `None`
        # `sum_s g_s (x) x_s`, for each `f` apart (no sum over `f`), in the
        # trace's layout.
        if x.shape[-2] == 1:
            new = jnp.expand_dims(_over_steps(g, x, turned), -1 if turned else -2)
        else:
            new = jax.vmap(_over_steps, (3, 2), 2)(g[..., None], x[..., None, :])
            new = jnp.moveaxis(new, -1, -3) if turned else new
        for j, other in enumerate(trace):
            if other is not None and Phi[k][j] is not None:
                new = new + lift(Phi[k][j], turned) * other
        out.append(new)
    return tuple(out)


def read_out(trace, m, q, Df, x, turned=False, summed=False):
    """A chunk's gradient `q . e0 + sum_s (m_s . Df_s) (x) x_s`, canonical `(B,
    Fw, C)`: `m` and `q` from `chunk_signals` gathered to the unit's outputs, the
    rest as for `advanced`; formed in the trace's layout, `(B, C, Fw)` if
    `turned`, and swapped last. With `summed`, every argument has a leading batch
    axis, summed over (before the steps' axis for `m`, `Df` and `x`)."""
    a = fused(weighted_all(m, Df))
    if summed:  # the batch and the steps as one axis
        a, x = (jnp.reshape(v, (-1,) + v.shape[2:]) for v in (a, x))
    grad = _over_steps(a, x, turned)
    for j, eps in enumerate(trace):
        if eps is None or q[j] is None:
            continue
        term = lift(q[j], turned) * eps
        if summed:
            term = batch_sum(term)
        grad = grad + jnp.sum(term, axis=-1 if turned else -2)
    return jnp.swapaxes(grad, -1, -2) if turned else grad


# The family's chunk methods (`AbstractAlgorithm.chunk_record` and the rest),
# for one group's graph.


def record(graph, jac, full_diagonal: bool):
    """One step's `D` (or the full blocks `H`) entry by entry, without `D`'s
    structural zeros, and each unit's `Df` state by state and `x`."""
    (group,) = graph.groups
    D = jac.H[group.name] if full_diagonal else jac.D[group.name]
    pattern = None if full_diagonal else group

    def states(Df):
        return tuple(Df[..., k] for k in range(group.k))

    return {
        "D": split_entries(D, pattern),
        "Df": {u.name: states(jac.Df[u.name]) for u in graph.units},
        "x": {u.name: jac.x[u.name] for u in graph.units},
    }


def update(graph, traces, records):
    units = graph.units
    Ds = records["D"]
    rows = sorted(
        {k for u in units for k, eps in enumerate(traces[u.name]) if eps is not None}
    )
    entry = next(a for row in Ds for a in row if a is not None)
    steps = jnp.shape(records["x"][units[0].name])[0]
    P, Phi = chunk_products(Ds, rows, steps, entry.shape[1:], entry.dtype)
    return {
        u.name: advanced(
            traces[u.name],
            jtu.tree_map(lambda a: u.gather(a, 1), P),
            jtu.tree_map(u.gather, Phi),
            records["Df"][u.name],
            records["x"][u.name],
            is_turned(u, traces[u.name]),
        )
        for u in units
    }


def gradients(graph, traces, records, signals, summed: bool):
    def swapped(tree):  # the batch and the steps' axes swapped
        return jtu.tree_map(lambda a: jnp.swapaxes(a, 0, 1), tree)

    Ds = records["D"]
    # The scan over the steps takes them first; `Df` and `x` keep the batch
    # first, which the read-out's products merge with the steps.
    if summed:
        m, q = chunk_signals(*swapped((Ds, signals)))
        m = swapped(m)
    else:
        m, q = chunk_signals(Ds, signals)
    axis = 2 if summed else 1
    return {
        u.name: read_out(
            traces[u.name],
            jtu.tree_map(lambda a: u.gather(a, axis), m),
            jtu.tree_map(lambda a: u.gather(a, axis - 1), q),
            records["Df"][u.name],
            records["x"][u.name],
            is_turned(u, traces[u.name]),
            summed,
        )
        for u in graph.units
    }
