"""SnAp-n against RTRL on a ring, and SnAp-1 against D-RTRL where J is diagonal."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace
import etrace.testing as et
from etrace._algorithm.snap import _masks

from ..helpers import data, f64, leaf_errors, mse


N = 5
# h_i reads only h_{i-1}: the unit graph is a ring of diameter N - 1.
RING = np.roll(np.eye(N), 1, axis=0)


class Ring(eqx.Module):
    w: eqx.nn.Linear
    u: jax.Array
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = jnp.tanh(self.w(x) + (jnp.asarray(RING) * self.u) @ h)
        return self.readout(h), h


def _flat(tree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return np.concatenate([np.ravel(a) for a in leaves])


def _ring_errors(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    model = f64(
        Ring(
            eqx.nn.Linear(2, N, key=k[0]),
            jax.random.normal(k[1], (N, N)),
            eqx.nn.Linear(N, 2, key=k[2]),
        )
    )
    xs, ys = data(seed, 12, 2, 2)

    def grads(algorithm):
        learner, ts = etrace.compile(
            model, xs[0], state=jnp.zeros(N), algorithm=algorithm
        )
        return _flat(etrace.online_grad(learner, mse, model, ts, xs, ys)[0])

    exact = grads(etrace.RTRL())
    return [
        np.linalg.norm(grads(etrace.SnAp(n)) - exact) / np.linalg.norm(exact)
        for n in range(1, N + 1)
    ]


def test_error_to_rtrl_falls_with_n_and_vanishes_at_the_diameter():
    errors = np.array([_ring_errors(seed) for seed in range(4)])
    # n = 1 on a ring is an approximation; n - 1 = N - 1 (the diameter) is exact.
    assert (errors[:, 0] > 1e-3).all()
    assert (errors[:, -1] <= 1e-9).all()
    # The error over seeds falls with n. (For a single seed it need not: the masked
    # recursion can be further from RTRL with a wider mask; seed 53 goes from 0.381
    # at n = 1 to 0.399 at n = 2.)
    mean = errors.mean(axis=0)
    assert all(b < a for a, b in zip(mean, mean[1:])), mean


def test_exact_regime_of_snap_follows_the_diameter():
    model = f64(
        Ring(
            eqx.nn.Linear(2, N, key=jax.random.key(0)),
            jnp.ones((N, N)),
            eqx.nn.Linear(N, 2, key=jax.random.key(1)),
        )
    )
    learner, _ = etrace.compile(model, jnp.zeros(2), state=jnp.zeros(N))
    assert not et.exact_regime(etrace.SnAp(N - 1), learner)
    assert et.exact_regime(etrace.SnAp(N), learner)
    assert "SnAp(1) drops" in str(et.exact_regime(etrace.SnAp(1), learner))


@pytest.mark.parametrize("family, n", [("leaky", 1), ("lif", 1), ("alif", 2)])
def test_snap_equals_d_rtrl_where_the_jacobian_is_per_neuron(family, n):
    # J diagonal (one state per neuron): SnAp-1. Two states per neuron (ALIF): the
    # unit graph links them, so it takes SnAp-2 to cover each neuron's block.
    model, state = et.build(family, 3, 4, 2, 1)
    xs, ys = data(1, 6, 3, 2, scale=2.0)
    out = {}
    for name, algorithm in (("snap", etrace.SnAp(n)), ("d", etrace.D_RTRL())):
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        out[name] = etrace.online_grad(learner, mse, model, ts, xs, ys)[0]
    assert max(leaf_errors(out["snap"], out["d"]).values()) <= 1e-9


def test_snap_1_is_an_approximation_on_a_gru():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.SnAp(1))
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, require_live=False)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_n(n):
    with pytest.raises(etrace.EtraceError, match="`n` must be an int >= 1"):
        etrace.SnAp(n)


@pytest.mark.parametrize("seed", [0, 1])
def test_pattern_is_structural_not_sampled_on_spiking_networks(seed):
    """A readout weight's immediate Jacobian is the presynaptic spike: zero wherever a
    neuron happens not to fire. The pattern must still keep it (regression: a
    pattern sampled at random points dropped those columns and got the readout
    weight's gradient wrong)."""
    from .test_snn_algorithms import build, LEAK, sequence

    model, state = build(seed, recurrent=True, kappa=LEAK, n=4)
    xs, ys = sequence(seed, T=8)
    assert et.liveness(model, xs, state=state).live
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.SnAp(2))
    _, immediate = learner.graph.jacobian_pattern()
    # The leaky readout's 2 values depend on every element of `out.weight`.
    assert immediate["out.weight"][-2:].sum() == immediate["out.weight"][0].size
    assert et.exact_regime(etrace.SnAp(2), learner)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys)


def _snap_run(model, state, xs, ys, algorithm):
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    return grads, ts.traces


def _ring_model(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    return f64(
        Ring(
            eqx.nn.Linear(2, N, key=k[0]),
            jax.random.normal(k[1], (N, N)),
            eqx.nn.Linear(N, 2, key=k[2]),
        )
    )


@pytest.mark.parametrize(
    "family, n, exact",
    [
        ("gru", 1, False),
        ("lstm", 1, False),
        ("alif", 1, False),
        ("stack", 1, True),  # no recurrence: J is diagonal, each layer's own block
        ("ring", 2, False),
    ],
)
def test_sparse_storage_equals_the_masked_dense_storage(family, n, exact):
    # The same approximation stored two ways; columns one long (GRU), several long
    # (ALIF's two states, the ring's two steps) and empty (the ring's mask).
    if family == "ring":
        model, state = _ring_model(0), jnp.zeros(N)
    else:
        model, state = et.build(family, 3, 4, 2, 0)
    xs, ys = data(0, 7, 3 if family != "ring" else 2, 2, scale=2.0)
    if family == "alif":
        rates = et.liveness(model, xs, state=state).rates
        assert rates and all(0 < r < 1 for r in rates.values())
    sparse, sparse_traces = _snap_run(model, state, xs, ys, etrace.SnAp(n, sparse=True))
    dense, dense_traces = _snap_run(model, state, xs, ys, etrace.SnAp(n, sparse=False))
    assert max(leaf_errors(sparse, dense).values()) <= 1e-9
    # Stored at the pattern's entries only: fewer numbers, the same ones.
    learner, _ = etrace.compile(model, xs[0], state=state, algorithm=etrace.SnAp(n))
    masks = _masks(learner.graph, n)
    for path, m in sparse_traces.items():
        want = np.asarray(dense_traces[path])
        assert m.shape[-1] == masks[path].sum() < masks[path].size
        # The pattern's entries in column-major order.
        by_column = want.reshape(want.shape[0], -1).T
        pattern = masks[path].reshape(masks[path].shape[0], -1).T
        np.testing.assert_allclose(m, by_column[pattern], rtol=1e-9, atol=1e-12)
    # Negative controls: the traces are not zero, and where the approximation is
    # not exact it differs from RTRL (where it is, it equals RTRL).
    assert all(np.abs(m).max() > 1e-6 for m in sparse_traces.values())
    rtrl, _ = _snap_run(model, state, xs, ys, etrace.RTRL())
    error = max(leaf_errors(sparse, rtrl).values())
    assert bool(et.exact_regime(etrace.SnAp(n), learner)) == exact
    assert error <= 1e-9 if exact else error > 1e-6


def test_auto_storage_is_sparse_for_a_narrow_pattern_and_dense_for_a_wide_one():
    model, state = et.build("gru", 3, 4, 2, 0)
    xs, _ = data(0, 2, 3, 2)
    sizes = {}
    for n in (1, 2):
        learner, _ = etrace.compile(model, xs[0], state=state, algorithm=etrace.SnAp(n))
        traces = jax.eval_shape(learner.init).traces
        sizes[n] = {p: t.shape for p, t in traces.items()}
    # SnAp(1) on a GRU: one number per parameter element; SnAp(2) is RTRL's pattern.
    assert sizes[1]["cell.weight_hh"] == (3 * 4 * 4,)
    assert sizes[2]["cell.weight_hh"] == (4, 3 * 4, 4)


@pytest.mark.parametrize("sparse", ["yes", 1, 0.0])
def test_bad_sparse(sparse):
    with pytest.raises(etrace.EtraceError, match="`sparse` must be None"):
        etrace.SnAp(1, sparse=sparse)
