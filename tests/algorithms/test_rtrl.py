"""Exact RTRL: equal to BPTT on every model, a second oracle."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import assume

import etrace
import etrace.testing as et

from ..helpers import data, f64, LIF, mse, spike, sweep


class TwoLayerTanh(eqx.Module):
    """Two stacked tanh RNN layers, each with its own recurrent weight."""

    w1: eqx.nn.Linear
    u1: eqx.nn.Linear
    w2: eqx.nn.Linear
    u2: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k = jr.split(key, 5)
        self.w1 = eqx.nn.Linear(n_in, hidden, key=k[0])
        self.u1 = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k[1])
        self.w2 = eqx.nn.Linear(hidden, hidden, key=k[2])
        self.u2 = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k[3])
        self.readout = eqx.nn.Linear(hidden, n_out, key=k[4])

    def __call__(self, x, state):
        h1, h2 = state
        h1 = jnp.tanh(self.w1(x) + 1.5 * self.u1(h1))
        h2 = jnp.tanh(self.w2(h1) + 1.5 * self.u2(h2))
        return self.readout(h2), (h1, h2)


class RecurrentLIF(eqx.Module):
    """LIF neurons driven by the input and by their own previous spikes."""

    lif: LIF
    rec: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k = jr.split(key, 3)
        self.lif = LIF(n_in, hidden, k[0])
        self.rec = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k[1])
        self.readout = eqx.nn.Linear(hidden, n_out, key=k[2])

    def __call__(self, x, v):
        z = self.lif.fire(v)
        v = jax.nn.sigmoid(self.lif.tau) * v + self.lif.linear(x) + self.rec(z)
        v = v - z * self.lif.thr
        return self.readout(self.lif.fire(v)), v

    def spikes(self, v):
        return self.lif.fire(v)


def _model(family, n_in, hidden, seed):
    if family in ("two_layer_tanh", "recurrent_lif"):
        cls = TwoLayerTanh if family == "two_layer_tanh" else RecurrentLIF
        model = f64(cls(n_in, hidden, 2, jr.key(seed)))
        if family == "two_layer_tanh":
            return model, (jnp.zeros(hidden), jnp.zeros(hidden))
        return model, jnp.zeros(hidden)
    return et.build(family, n_in, hidden, 2, seed)


FAMILIES = ["two_layer_tanh", "gru", "lstm", "recurrent_lif", "stack", "alif"]


def _check_rtrl_equals_bptt(family, n_in, hidden, seed, length):
    model, state = _model(family, n_in, hidden, seed)
    xs, ys = data(seed, length, n_in, 2, scale=2.0)
    assume(
        family in ("two_layer_tanh", "gru", "lstm")
        or et.liveness(model, xs, state=state).live
    )
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.RTRL())
    assert et.exact_regime(etrace.RTRL(), learner)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, require_live=False)


# Every family in the default run, one drawn example each; wider in the slow one.
_fast, _slow = sweep(
    1,
    8,
    n_in=st.integers(1, 3),
    hidden=st.integers(1, 4),
    seed=st.integers(0, 10_000),
    length=st.integers(2, 6),
)(_check_rtrl_equals_bptt)
test_rtrl_equals_bptt = pytest.mark.parametrize("family", FAMILIES)(_fast)
test_rtrl_equals_bptt_sweep = pytest.mark.parametrize("family", FAMILIES)(_slow)


class NoHistory(etrace.RTRL):
    """RTRL with the hidden-to-hidden Jacobian dropped: M = I only."""

    def update(self, graph, traces, jac):
        del graph
        return {p: jac.Jtheta[p] + 0 * m for p, m in traces.items()}


@pytest.mark.parametrize("family", ["two_layer_tanh", "gru"])
def test_rtrl_history_matters(family):
    model, state = _model(family, 2, 3, 1)
    xs, ys = data(1, 6, 2, 2, scale=2.0)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=NoHistory())
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, require_live=False)
    et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params="readout", require_live=False
    )


def test_rtrl_is_exact_for_an_encoder_that_d_rtrl_learns_one_step():
    from ..test_api import Encoded

    model = f64(Encoded(jr.key(3)))
    xs, ys = data(3, 6, 3, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=jnp.zeros(5), algorithm=etrace.RTRL()
    )
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, require_live=False)


class SharedProjection(eqx.Module):
    """The output reads `w @ h1`, which also feeds the second layer: a value
    computed with a parameter from a new hidden state, upstream of another."""

    c1: eqx.nn.Linear
    c2: eqx.nn.Linear
    w: jax.Array

    def __init__(self, key):
        k = jr.split(key, 3)
        self.c1 = eqx.nn.Linear(2, 3, key=k[0])
        self.c2 = eqx.nn.Linear(2, 3, key=k[1])
        self.w = jr.normal(k[2], (2, 3))

    def __call__(self, x, state):
        h1, h2 = state
        h1 = 0.8 * h1 + jnp.tanh(self.c1(x))
        u = self.w @ h1
        h2 = 0.7 * h2 + jnp.tanh(self.c2(u))
        return h2[:2] + jnp.tanh(u), (h1, h2)


@pytest.mark.parametrize("algorithm", [etrace.RTRL(), etrace.SnAp(3)])
def test_whole_state_gradient_of_a_value_read_by_the_output_and_the_next_layer(
    algorithm,
):
    model = f64(SharedProjection(jr.key(0)))
    xs, ys = data(2, 6, 2, 2)
    state = (jnp.zeros(3), jnp.zeros(3))
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, require_live=False)
    # Negative control: D-RTRL's lower layer leaves out the path through h2.
    with pytest.warns(etrace.EtraceWarning, match="one-step gradient: \\['w'\\]"):
        learner, ts = etrace.compile(model, xs[0], state=state)
    et.assert_differs_from_bptt(
        learner, mse, model, ts, xs, ys, params="c1", require_live=False
    )


def test_rtrl_trace_of_and_summary():
    model, state = _model("gru", 2, 3, 0)
    learner, ts = etrace.compile(
        model, jnp.zeros(2), state=state, algorithm=etrace.RTRL()
    )
    (trace,) = learner.trace_of(ts, lambda m: m.cell.weight_hh).values()
    assert trace.shape == (3, 9, 3)
    assert "RTRL" in learner.summary() and "(3, 9, 3)" in learner.summary()


def test_spike_helper_is_binary():
    assert set(map(float, spike(jnp.array([-1.0, 1.0])))) == {0.0, 1.0}
