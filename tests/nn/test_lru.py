"""`etrace.nn.LRU`: the equations, the initialisation, and online learning on it."""

import math
import re

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import etrace
import etrace.nn as enn
import etrace.testing as et

from ..helpers import mse, sweep


class OneLayer(eqx.Module):
    lru: enn.LRU
    h: eqx.nn.StateIndex

    def __init__(self, n_in, n, *, key):
        self.lru = enn.LRU(n_in, n, r_min=0.5, r_max=0.95, key=key)
        self.h = eqx.nn.StateIndex(self.lru.initial_hidden())

    def __call__(self, x, state):
        h = self.lru(x, state.get(self.h))
        return self.lru.output(x, h), state.set(self.h, h)


class TwoLayers(eqx.Module):
    """Two LRU layers; the upper one reads the lower one's output of this step."""

    bottom: enn.LRU
    top: enn.LRU
    h1: eqx.nn.StateIndex
    h2: eqx.nn.StateIndex

    def __init__(self, n_in, n, *, key):
        k1, k2 = jr.split(key)
        self.bottom = enn.LRU(n_in, n, r_min=0.5, r_max=0.95, key=k1)
        self.top = enn.LRU(n_in, n + 1, r_min=0.5, r_max=0.95, key=k2)
        self.h1 = eqx.nn.StateIndex(self.bottom.initial_hidden())
        self.h2 = eqx.nn.StateIndex(self.top.initial_hidden())

    def __call__(self, x, state):
        h1 = self.bottom(x, state.get(self.h1))
        u = self.bottom.output(x, h1)
        h2 = self.top(u, state.get(self.h2))
        return self.top.output(u, h2), state.set(self.h1, h1).set(self.h2, h2)


def _data(seed, length, n):
    kx, ky = jr.split(jr.key(seed + 1))
    return jr.normal(kx, (length, n)), jr.normal(ky, (length, n))


def _check_one_layer_exact_and_stack_top_only(seed, n_in, n, length):
    xs, targets = _data(seed, length, n_in)
    model, state = eqx.nn.make_with_state(OneLayer)(n_in, n, key=jr.key(seed))
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    assert et.exact_regime(etrace.D_RTRL(), learner)
    rows = et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)
    # Every parameter is reached: the comparison is not vacuous.
    assert all(row[3] > 1e-8 for row in rows.values()), rows

    model, state = eqx.nn.make_with_state(TwoLayers)(n_in, n, key=jr.key(seed))
    # The lower layer's read-out reaches a hidden state only through the upper
    # layer's input weight: it is learned one-step, with a warning.
    with pytest.warns(etrace.EtraceWarning, match="bottom.c_re"):
        learner, trace_state = etrace.compile(model, xs[0], state=state)
    assert not et.exact_regime(etrace.D_RTRL(), learner)
    et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets, params="top")
    # Negative control: the lower layer's traces leave out the path through the
    # upper layer's state.
    et.assert_differs_from_bptt(
        learner,
        mse,
        model,
        trace_state,
        xs,
        targets,
        params=["bottom.nu", "bottom.theta", "bottom.b_re", "bottom.b_im"],
        rtol=1e-4,
    )


(
    test_one_lru_layer_is_exact_and_a_stack_only_on_top,
    test_one_lru_layer_is_exact_and_a_stack_only_on_top_sweep,
) = sweep(
    2,
    30,
    seed=st.integers(0, 10_000),
    n_in=st.integers(1, 3),
    n=st.integers(1, 4),
    length=st.integers(3, 8),
)(_check_one_layer_exact_and_stack_top_only)


def test_rtrl_is_exact_on_a_stack_of_lru_layers():
    xs, targets = _data(0, 6, 2)
    model, state = eqx.nn.make_with_state(TwoLayers)(2, 3, key=jr.key(0))
    with pytest.warns(etrace.EtraceWarning):
        etrace.compile(model, xs[0], state=state)  # D-RTRL warns; RTRL does not
    learner, trace_state = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.RTRL()
    )
    et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)


def test_lru_by_hand():
    lru = enn.LRU(3, 4, key=jr.key(0))
    x = jnp.arange(3.0) - 1
    h = jnp.linspace(-1, 1, 4) * (1 - 0.5j)
    lam = np.exp(-np.exp(np.asarray(lru.nu)) + 1j * np.exp(np.asarray(lru.theta)))
    b = np.asarray(lru.b_re) + 1j * np.asarray(lru.b_im)
    gamma = np.exp(np.asarray(lru.gamma_log))
    want = lam * np.asarray(h) + gamma * (b @ np.asarray(x))
    new = lru(x, h)
    assert new.dtype == jnp.complex128 and new.shape == (4,)
    np.testing.assert_allclose(new, want, rtol=1e-13)
    c = np.asarray(lru.c_re) + 1j * np.asarray(lru.c_im)
    y = np.real(c @ want) + np.asarray(lru.d) * np.asarray(x)
    np.testing.assert_allclose(lru.output(x, new), y, rtol=1e-12)
    assert lru.output(x, new).dtype == jnp.float64
    np.testing.assert_allclose(lru.eigenvalues(), lam, rtol=1e-14)


def test_lru_ring_initialisation():
    n = 2000
    lru = enn.LRU(8, n, r_min=0.6, r_max=0.9, max_phase=math.pi / 4, key=jr.key(1))
    lam = np.asarray(lru.eigenvalues())
    r, phase = np.abs(lam), np.angle(lam)
    assert 0.6 <= r.min() < 0.61 and 0.89 < r.max() <= 0.9
    # Uniform on the ring in area: |lambda|^2 is uniform.
    assert abs(np.mean(r**2) - (0.36 + 0.81) / 2) < 0.01
    assert 0 < phase.min() < 0.01 and math.pi / 4 - 0.01 < phase.max() <= math.pi / 4
    np.testing.assert_allclose(
        np.exp(np.asarray(lru.gamma_log)), np.sqrt(1 - r**2), rtol=1e-12
    )
    assert abs(np.std(np.asarray(lru.b_re)) - 1 / 4) < 0.01  # 1/sqrt(2 * 8)
    assert abs(np.std(np.asarray(lru.c_im)) - 1 / math.sqrt(n)) < 0.002
    lru32 = enn.LRU(2, 3, dtype=jnp.float32, key=jr.key(0))
    assert lru32.nu.dtype == jnp.float32
    assert lru32.initial_hidden().dtype == jnp.complex64
    assert lru32(jnp.ones(2, jnp.float32), lru32.initial_hidden()).dtype == (
        jnp.complex64
    )


def test_lru_summary_roles():
    model, state = eqx.nn.make_with_state(OneLayer)(2, 3, key=jr.key(0))
    learner, _ = etrace.compile(model, jnp.zeros(2), state=state)
    text = learner.summary()
    assert re.search(r"h: N=3 neurons, K=1", text)
    for path, role in [
        ("lru.nu", "elementwise"),
        ("lru.theta", "elementwise"),
        ("lru.gamma_log", "matrix"),
        ("lru.b_re", "matrix"),
        ("lru.b_im", "matrix"),
        ("lru.c_re", "one-step"),
        ("lru.d", "one-step"),
    ]:
        assert re.search(rf"{re.escape(path)}\s+\([^)]*\)\s+{role}", text), path
    # Complex traces: B_re and B_im (and gamma) share the trace of one product.
    traces = learner.init().traces
    assert all(jnp.iscomplexobj(t) for t in jax.tree.leaves(traces))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: enn.LRU(0, 3, key=jr.key(0)), r"`input_size` must be an int"),
        (lambda: enn.LRU(2, 3, r_min=0.9, r_max=0.5, key=jr.key(0)), r"`r_min`"),
        (lambda: enn.LRU(2, 3, r_max=1.0, key=jr.key(0)), r"0 < r_min <= r_max < 1"),
        (lambda: enn.LRU(2, 3, r_min=0.0, key=jr.key(0)), r"got r_min=0.0"),
        (lambda: enn.LRU(2, 3, max_phase=7.0, key=jr.key(0)), r"`max_phase`"),
        (lambda: enn.LRU(2, 3, max_phase=0.0, key=jr.key(0)), r"\(0, 2 pi\]"),
    ],
)
def test_lru_bad_arguments(make, match):
    with pytest.raises(etrace.EtraceError, match=match):
        make()
