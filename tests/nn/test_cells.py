"""`etrace.nn`: surrogate spikes, neurons and cells, by hand and against BPTT."""

import math
import pathlib
import re

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import assume, given, note, settings

import etrace
import etrace.nn as enn
import etrace.testing as et

from ..helpers import mse


ROOT = pathlib.Path(__file__).resolve().parents[2]

# -- surrogate spike functions -----------------------------------------------------


def _sigmoid(u):
    return 1 / (1 + np.exp(-u))


# The formulas written out independently of the implementation, as functions of
# (slope, x) in NumPy.
SURROGATES = {
    enn.Sigmoid: lambda k, x: k * _sigmoid(k * x) * (1 - _sigmoid(k * x)),
    enn.FastSigmoid: lambda k, x: 1 / (1 + k * np.abs(x)) ** 2,
    enn.Triangle: lambda k, x: k * np.maximum(0, 1 - k * np.abs(x)),
    enn.Arctan: lambda k, x: (k / 2) / (1 + (np.pi * k * x / 2) ** 2),
    enn.Gaussian: lambda k, x: k / np.sqrt(2 * np.pi) * np.exp(-((k * x) ** 2) / 2),
}
POINTS = np.array([-2.0, -0.7, -0.3, -1e-3, 0.0, 1e-3, 0.25, 0.6, 1.5, 3.0])


@pytest.mark.parametrize("cls", list(SURROGATES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_surrogate_forward_is_the_step(cls, dtype):
    x = jnp.asarray(POINTS, dtype)
    out = cls()(x)
    assert out.dtype == dtype and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), (POINTS > 0).astype(np.float64))
    assert jax.jit(cls())(x).dtype == dtype


@pytest.mark.parametrize("cls", list(SURROGATES))
@pytest.mark.parametrize("slope", [None, 0.5, 3.0])
def test_surrogate_derivative_is_the_formula(cls, slope):
    surrogate = cls() if slope is None else cls(slope=slope)
    k = surrogate.slope
    want = SURROGATES[cls](k, POINTS)
    x = jnp.asarray(POINTS)
    # Scalar grad point by point, vmapped, jitted, forward mode and reverse mode.
    pointwise = np.array([float(jax.grad(surrogate)(jnp.asarray(p))) for p in POINTS])
    vmapped = jax.vmap(jax.grad(surrogate))(x)
    jitted = jax.jit(jax.vmap(jax.grad(surrogate)))(x)
    _, forward = jax.jvp(surrogate, (x,), (jnp.ones_like(x),))
    cotangent = jnp.linspace(-1.0, 2.0, x.size)
    _, pullback = jax.vjp(surrogate, x)
    (reverse,) = pullback(cotangent)
    for got in (pointwise, vmapped, jitted, forward):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        np.asarray(reverse), np.asarray(cotangent) * want, rtol=1e-12, atol=1e-15
    )
    # Reverse mode of a jitted, vmapped surrogate on a batch.
    batch = jnp.stack([x, -x])
    _, pullback = jax.vjp(jax.jit(jax.vmap(surrogate)), batch)
    (reverse,) = pullback(jnp.ones_like(batch))
    np.testing.assert_allclose(
        np.asarray(reverse), np.stack([want, SURROGATES[cls](k, -POINTS)]), rtol=1e-12
    )


def test_surrogate_defaults_peak_near_one_and_ints_are_accepted():
    for cls in SURROGATES:
        peak = float(jax.grad(cls())(jnp.asarray(0.0)))
        assert 0.99 < peak <= 1.0, cls
    assert enn.FastSigmoid(5).slope == 5.0 and isinstance(
        enn.FastSigmoid(5).slope, float
    )
    assert enn.Triangle(2) == enn.Triangle(2.0)


def test_custom_surrogate_subclass():
    class Box(enn.AbstractSurrogate):
        slope: float = 2.0

        def derivative(self, x):
            return jnp.where(jnp.abs(x) < 1 / self.slope, self.slope / 2, 0.0)

    g = jax.vmap(jax.grad(Box()))(jnp.array([-1.0, 0.1, 0.4, 0.6]))
    np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 1.0, 0.0])


# -- neuron dynamics, by hand ------------------------------------------------------


def _run(neuron, currents):
    """Runs a neuron alone over `currents`; returns the emitted spikes and every
    state leaf after every step, and checks that the spikes are the spike leaf."""
    state = eqx.nn.State(neuron)
    spikes, leaves = [], []
    previous = None
    for current in currents:
        if isinstance(neuron, enn.AbstractSpikingNeuron):
            np.testing.assert_array_equal(
                np.asarray(neuron.spikes(state)),
                np.zeros(neuron.n) if previous is None else previous,
            )
        z, state = neuron(jnp.asarray(current), state)
        if isinstance(neuron, enn.AbstractSpikingNeuron):
            np.testing.assert_array_equal(np.asarray(neuron.spikes(state)), z)
        previous = np.asarray(z)
        spikes.append(previous)
        leaves.append(
            {
                name: np.asarray(state.get(getattr(neuron, name)))
                for name in ("v", "a", "z", "counter", "y")
                if getattr(neuron, name, None) is not None
            }
        )
    return np.array(spikes), leaves


def _lif_by_hand(currents, *, alpha, thr, reset, refractory=0):
    v = np.zeros(currents.shape[1])
    c = np.zeros_like(v)
    zs, vs, cs = [], [], []
    for current in currents:
        v = alpha * v + current
        z = (v > thr).astype(float) * (c <= 0)
        if reset == "hard":
            v = v * (1 - z)
        else:
            v = v - thr * z
        v = v * (c <= 0)
        c = np.where(z > 0, refractory, np.maximum(c - 1, 0))
        zs.append(z), vs.append(v), cs.append(c)
    return np.array(zs), np.array(vs), np.array(cs)


CURRENTS = np.array(
    [[0.6, 1.5, -0.2], [0.7, 0.4, 2.5], [0.1, 1.2, 0.3], [0.9, -0.5, 0.8],
     [0.2, 0.9, 1.1], [1.3, 0.8, 0.0]]
)  # fmt: skip


@pytest.mark.parametrize("reset", ["soft", "hard", "detached"])
def test_lif_dynamics_by_hand(reset):
    neuron = enn.LIF(3, tau=2.0, threshold=1.0, reset=reset)
    spikes, leaves = _run(neuron, CURRENTS)
    zs, vs, _ = _lif_by_hand(CURRENTS, alpha=math.exp(-0.5), thr=1.0, reset=reset)
    assert 0 < spikes.mean() < 1
    np.testing.assert_array_equal(spikes, zs)
    np.testing.assert_allclose([s["v"] for s in leaves], vs, rtol=1e-14)
    assert set(leaves[0]) == {"v", "z"}
    # The first two steps written out. Step 1 from rest: neuron 1 crosses at once
    # (1.5 > 1) and is reset to 0.5 (soft) or 0 (hard).
    after = {"soft": 0.5, "detached": 0.5, "hard": 0.0}[reset]
    np.testing.assert_allclose(leaves[0]["v"], [0.6, after, -0.2], rtol=1e-14)
    np.testing.assert_array_equal(leaves[0]["z"], [0.0, 1.0, 0.0])
    # Step 2, alpha = e^{-1/2}: neurons 0 and 2 cross (alpha 0.6 + 0.7 = 1.064 and
    # -0.2 alpha + 2.5 = 2.379), neuron 1 does not.
    alpha = math.exp(-0.5)
    before = np.array([alpha * 0.6 + 0.7, alpha * after + 0.4, -0.2 * alpha + 2.5])
    reset_to = before - 1 if reset != "hard" else np.zeros(3)
    np.testing.assert_array_equal(leaves[1]["z"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(
        leaves[1]["v"], [reset_to[0], before[1], reset_to[2]], rtol=1e-14
    )


def test_lif_refractory_counter_by_hand():
    neuron = enn.LIF(2, tau=4.0, threshold=1.0, refractory=2)
    # Neuron 0: constant strong input spikes every third step; neuron 1: never.
    currents = np.tile([1.5, 0.1], (7, 1))
    spikes, leaves = _run(neuron, currents)
    np.testing.assert_array_equal(spikes[:, 0], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(
        [s["counter"][0] for s in leaves], [2, 1, 0, 2, 1, 0, 2]
    )
    np.testing.assert_array_equal([s["v"][0] for s in leaves][1:3], [0.0, 0.0])
    np.testing.assert_allclose(leaves[0]["v"][0], 0.5, rtol=1e-14)  # soft reset
    np.testing.assert_array_equal(spikes[:, 1], 0)
    # And against the reference loop on richer input.
    neuron = enn.LIF(3, tau=3.0, threshold=1.0, refractory=1, reset="hard")
    spikes, leaves = _run(neuron, 1.6 * CURRENTS)
    zs, vs, cs = _lif_by_hand(
        1.6 * CURRENTS, alpha=math.exp(-1 / 3), thr=1.0, reset="hard", refractory=1
    )
    np.testing.assert_array_equal(spikes, zs)
    np.testing.assert_allclose([s["v"] for s in leaves], vs, rtol=1e-14)
    np.testing.assert_array_equal([s["counter"] for s in leaves], cs)
    assert set(leaves[0]) == {"v", "z", "counter"}


def test_if_and_readout_by_hand():
    spikes, leaves = _run(enn.IF(3, threshold=0.8, reset="hard"), CURRENTS)
    zs, vs, _ = _lif_by_hand(CURRENTS, alpha=1.0, thr=0.8, reset="hard")
    np.testing.assert_array_equal(spikes, zs)
    np.testing.assert_allclose([s["v"] for s in leaves], vs, rtol=1e-14)

    ys, _ = _run(enn.LeakyRateReadout(3, kappa=0.9), CURRENTS)
    y, want = np.zeros(3), []
    for current in CURRENTS:
        y = 0.9 * y + current
        want.append(y)
    np.testing.assert_allclose(ys, want, rtol=1e-14)
    ys_tau, _ = _run(enn.LeakyRateReadout(3, tau=-1 / math.log(0.9)), CURRENTS)
    np.testing.assert_allclose(ys_tau, want, rtol=1e-14)


def test_alif_dynamics_by_hand():
    tau, tau_a, beta, thr = 3.0, 5.0, 0.7, 1.0
    neuron = enn.ALIF(3, tau=tau, tau_adapt=tau_a, beta=beta, threshold=thr)
    spikes, leaves = _run(neuron, 1.5 * CURRENTS)
    alpha, rho = math.exp(-1 / tau), math.exp(-1 / tau_a)
    v, a, z = np.zeros(3), np.zeros(3), np.zeros(3)
    for t, current in enumerate(1.5 * CURRENTS):
        a = rho * a + (1 - rho) * z
        big_a = thr + beta * a
        v = alpha * v + current
        z = (v > big_a).astype(float)
        v = v - big_a * z
        np.testing.assert_array_equal(spikes[t], z)
        np.testing.assert_allclose(leaves[t]["v"], v, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(leaves[t]["a"], a, rtol=1e-14, atol=1e-15)
    assert 0 < spikes.mean() < 1 and np.max(a) > 0
    assert set(leaves[0]) == {"v", "a", "z"}


def test_detached_reset_changes_gradients_not_values():
    currents = jnp.asarray(2.0 * CURRENTS)

    def total(neuron, scale):
        state = eqx.nn.State(neuron)
        out = 0.0
        for t, current in enumerate(currents):
            z, state = neuron(scale * current, state)
            out = out + (t + 1) * jnp.sum(z)
        return out

    soft, detached = enn.LIF(3, tau=3.0), enn.LIF(3, tau=3.0, reset="detached")
    assert float(total(soft, 1.0)) == float(total(detached, 1.0)) > 0
    g_soft = jax.grad(lambda s: total(soft, s))(1.0)
    g_detached = jax.grad(lambda s: total(detached, s))(1.0)
    assert abs(float(g_soft) - float(g_detached)) > 1e-3


def test_state_leaves_are_separate_and_typed():
    cases = [
        (enn.IF(4), 2),
        (enn.LIF(4), 2),
        (enn.LIF(4, refractory=3), 3),
        (enn.ALIF(4), 3),
        (enn.LeakyRateReadout(4), 1),
    ]
    for neuron, count in cases:
        leaves = jtu.tree_leaves(eqx.nn.State(neuron))
        assert len(leaves) == count
        assert all(leaf.shape == (4,) and leaf.dtype == jnp.float64 for leaf in leaves)
    # float32 on request, and the call keeps it.
    neuron = enn.ALIF(4, learn_tau=True, learn_threshold=True, dtype=jnp.float32)
    state = eqx.nn.State(neuron)
    assert {leaf.dtype for leaf in jtu.tree_leaves(state)} == {jnp.dtype("float32")}
    assert neuron.tau.dtype == neuron.threshold.dtype == jnp.float32
    z, state = neuron(jnp.ones(4, jnp.float32), state)
    assert z.dtype == jnp.float32
    assert {leaf.dtype for leaf in jtu.tree_leaves(state)} == {jnp.dtype("float32")}
    # Not learnt: Python floats, not parameters.
    lif, _ = eqx.nn.make_with_state(enn.LIF)(4, tau=10)
    assert isinstance(lif.tau, float) and isinstance(lif.threshold, float)
    assert jtu.tree_leaves(eqx.filter(lif, eqx.is_inexact_array)) == []
    assert isinstance(enn.LIF(4, learn_tau=True).tau, jax.Array)


# -- online gradients against BPTT --------------------------------------------------


class Net(eqx.Module):
    """Linear -> neuron -> Linear readout."""

    encoder: eqx.nn.Linear
    neuron: eqx.Module
    readout: eqx.nn.Linear

    def __init__(self, neuron, n_in, n_out, *, key):
        k1, k2 = jr.split(key)
        self.encoder = eqx.nn.Linear(n_in, neuron.n, key=k1)
        self.neuron = neuron
        self.readout = eqx.nn.Linear(neuron.n, n_out, key=k2)

    def run(self, x, state):
        z, state = self.neuron(self.encoder(x), state)
        return self.readout(z), z, state

    def __call__(self, x, state):
        y, _, state = self.run(x, state)
        return y, state


def firing_rate(model, state, xs) -> float:
    """Mean of the spikes the model's neuron emits over the sequence."""

    def body(state, x):
        _, z, state = model.run(x, state)
        return state, z

    _, spikes = jax.lax.scan(body, state, xs)
    return float(jnp.mean(spikes))


NEURONS = {
    "IF": lambda n: enn.IF(n, threshold=1.0, surrogate=enn.Triangle(0.5)),
    "LIF-soft": lambda n: enn.LIF(n, tau=5.0, surrogate=enn.Sigmoid()),
    "LIF-hard": lambda n: enn.LIF(n, tau=5.0, reset="hard", surrogate=enn.Arctan()),
    "LIF-detached": lambda n: enn.LIF(
        n, tau=5.0, reset="detached", surrogate=enn.Gaussian()
    ),
    "LIF-refractory": lambda n: enn.LIF(n, tau=5.0, refractory=2),
    "LIF-learn-tau": lambda n: enn.LIF(
        n, tau=5.0, learn_tau=True, learn_threshold=True
    ),
    "ALIF": lambda n: enn.ALIF(n, tau=5.0, tau_adapt=10.0, beta=1.0, learn_tau=True),
    "readout": lambda n: enn.LeakyRateReadout(n, tau=5.0, learn_tau=True),
}
SPIKING = set(NEURONS) - {"readout"}


@pytest.mark.parametrize("kind", list(NEURONS))
@settings(max_examples=2, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_in=st.integers(1, 4),
    n=st.integers(2, 5),
    length=st.integers(6, 10),
)
def test_d_rtrl_equals_bptt_for_every_neuron(kind, seed, n_in, n, length):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    model, state = eqx.nn.make_with_state(Net)(NEURONS[kind](n), n_in, 2, key=k1)
    xs = 2.0 * jr.normal(k2, (length, n_in))
    targets = jr.normal(k3, (length, 2))
    assert xs.dtype == model.encoder.weight.dtype == jnp.float64
    if kind in SPIKING:
        # A network that never (or always) spikes would pass any comparison: such
        # draws are discarded, and every example compared fires sometimes.
        rate = firing_rate(model, state, xs)
        note(f"firing rate {rate}")
        assume(0.0 < rate < 1.0)
        assert et.liveness(model, xs, state=state).live
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    assert et.exact_regime(etrace.D_RTRL(), learner)
    rows = et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)
    # Not vacuous: the gradient reaching the neuron is not zero.
    assert rows["encoder.weight"][3] > 1e-8
    for path in ("neuron.tau", "neuron.threshold"):
        if path in rows:
            assert rows[path][3] > 1e-8, path


def test_history_matters_for_spiking_neurons():
    # The same learner with traces reduced to the immediate term (ES-D-RTRL with
    # decay 0) must differ from BPTT: the neurons' memory is exercised.
    k1, k2, k3 = jr.split(jr.key(3), 3)
    model, state = eqx.nn.make_with_state(Net)(NEURONS["ALIF"](4), 3, 2, key=k1)
    xs, targets = 2.0 * jr.normal(k2, (10, 3)), jr.normal(k3, (10, 2))
    learner, _ = etrace.compile(model, xs[0], state=state)
    one_step = eqx.tree_at(
        lambda lr: lr.algorithm, learner, etrace.ES_D_RTRL(decay=0.0)
    )
    et.assert_differs_from_bptt(
        one_step, mse, model, one_step.init(), xs, targets, params="encoder", rtol=1e-4
    )


class RecurrentSpiking(eqx.Module):
    """Input and the layer's own previous spikes through one linear map."""

    synapses: eqx.nn.Linear
    neuron: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, n_in, n, n_out, *, key):
        k1, k2 = jr.split(key)
        self.synapses = eqx.nn.Linear(n_in + n, n, key=k1)
        self.neuron = enn.LIF(n, tau=5.0)
        self.readout = eqx.nn.Linear(n, n_out, key=k2)

    def __call__(self, x, state):
        current = self.synapses(jnp.concatenate([x, self.neuron.spikes(state)]))
        z, state = self.neuron(current, state)
        return self.readout(z), state


class CellNet(eqx.Module):
    cell: eqx.Module
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, cell_cls, n_in, n, n_out, *, key):
        k1, k2 = jr.split(key)
        self.cell = cell_cls(n_in, n, key=k1)
        self.readout = eqx.nn.Linear(n, n_out, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(n))

    def __call__(self, x, state):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


def _data(seed, length, n_in):
    kx, ky = jr.split(jr.key(seed + 1))
    return 2.0 * jr.normal(kx, (length, n_in)), jr.normal(ky, (length, 2))


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 10_000), n_in=st.integers(1, 3), n=st.integers(2, 5))
def test_recurrent_spiking_layer_differs_from_bptt(seed, n_in, n):
    model, state = eqx.nn.make_with_state(RecurrentSpiking)(
        n_in, n, 2, key=jr.key(seed)
    )
    xs, targets = _data(seed, 10, n_in)
    assume(et.liveness(model, xs, state=state).live)
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert not regime and not regime.params["synapses.weight"]
    rows = et.assert_matches_bptt(
        learner, mse, model, trace_state, xs, targets, params="readout"
    )
    assert rows["synapses.weight"][3] > 1e-8
    et.assert_differs_from_bptt(
        learner, mse, model, trace_state, xs, targets, params="synapses", rtol=1e-4
    )


@pytest.mark.parametrize("batch", [None, 3])
def test_online_grad_orders_the_update_after_a_read_out_of_previous_traces(
    batch, monkeypatch
):
    # D-RTRL reads a spiking layer's gradient from the traces before the update
    # (the spike keeps no trace), and `online_grad` makes the update of exactly
    # those traces wait for that read-out, so that XLA can write them in place.
    # Nothing else changes: gradients and traces equal a step-by-step loop's, and
    # the traces stay those of the loop where the loss is not finite.
    from etrace import _learner

    from ..helpers import per_step_grads, tree_allclose

    ordered = []

    def recording(ts, names, grads):
        ordered.append(set(names))
        return order(ts, names, grads)

    order = _learner._ordered
    monkeypatch.setattr(_learner, "_ordered", recording)

    model, state = eqx.nn.make_with_state(RecurrentSpiking)(2, 8, 2, key=jr.key(0))
    lead = (10,) if batch is None else (10, batch)
    xs = 2.0 * jr.normal(jr.key(1), lead + (2,))
    ys = jr.normal(jr.key(2), lead + (2,))
    learner, _ = etrace.compile(model, xs.reshape(-1, 2)[0], state=state)
    ts = learner.init(batch_size=batch)

    def spiking(s, x):
        _, s = model(x, s)
        return s, model.neuron.spikes(s)

    _, spikes = jax.lax.scan(spiking, state, xs.reshape(-1, 2))
    assert 0 < float(jnp.mean(spikes)) < 1
    scanned, ts_scan, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    synapses = {u.name for u in learner.graph.units if u.name.startswith("synapses")}
    assert ordered == [synapses] and len(synapses) == 2
    # A GRU's traces are read out after their update: none is ordered.
    gru, gru_state = et.build("gru", 2, 4, 2, seed=0)
    gru_learner, _ = etrace.compile(gru, xs.reshape(-1, 2)[0], state=gru_state)
    gru_ts = gru_learner.init(batch_size=batch)
    etrace.online_grad(gru_learner, mse, gru, gru_ts, xs, ys)
    assert ordered[1:] == [set()]

    looped, ts_loop = per_step_grads(learner, mse, model, ts, xs, ys)
    assert tree_allclose(scanned, looped) and tree_allclose(ts_scan, ts_loop)
    assert float(jnp.abs(scanned.synapses.weight).max()) > 0

    bad = ys.at[4].set(jnp.inf)  # every gradient from step 4 on is not finite
    grads, ts_bad, _ = etrace.online_grad(learner, mse, model, ts, xs, bad)
    assert not np.isfinite(np.asarray(grads.synapses.weight)).any()
    assert tree_allclose(ts_bad.traces, ts_loop.traces)
    assert all(bool(jnp.isfinite(t).all()) for t in jtu.tree_leaves(ts_bad.traces))


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 10_000), n_in=st.integers(1, 3), n=st.integers(2, 5))
def test_elman_differs_and_diagonal_linear_cell_matches(seed, n_in, n):
    xs, targets = _data(seed, 8, n_in)
    model, state = eqx.nn.make_with_state(CellNet)(
        enn.ElmanCell, n_in, n, 2, key=jr.key(seed)
    )
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    assert not et.exact_regime(etrace.D_RTRL(), learner)
    et.assert_matches_bptt(
        learner, mse, model, trace_state, xs, targets, params="readout"
    )
    et.assert_differs_from_bptt(
        learner, mse, model, trace_state, xs, targets, params="cell", rtol=1e-4
    )

    model, state = eqx.nn.make_with_state(CellNet)(
        enn.DiagonalLinearCell, n_in, n, 2, key=jr.key(seed)
    )
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    assert et.exact_regime(etrace.D_RTRL(), learner)
    rows = et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)
    assert rows["cell.nu"][3] > 1e-8 and rows["cell.weight"][3] > 1e-8


def test_cells_by_hand():
    cell = enn.ElmanCell(3, 4, key=jr.key(0))
    x, h = jnp.arange(3.0), jnp.linspace(-1, 1, 4)
    want = np.tanh(
        np.asarray(cell.weight_ih) @ np.asarray(x)
        + np.asarray(cell.weight_hh) @ np.asarray(h)
        + np.asarray(cell.bias)
    )
    np.testing.assert_allclose(cell(x, h), want, rtol=1e-14)
    for w in (cell.weight_ih, cell.weight_hh, cell.bias):
        assert float(jnp.max(jnp.abs(w))) <= 0.5 and w.dtype == jnp.float64
    relu = enn.ElmanCell(3, 4, use_bias=False, activation=jax.nn.relu, key=jr.key(0))
    assert relu.bias is None and bool(jnp.all(relu(x, h) >= 0))
    assert enn.ElmanCell(3, 4, dtype=jnp.float32, key=jr.key(0)).weight_hh.dtype == (
        jnp.float32
    )

    cell = enn.DiagonalLinearCell(3, 500, r_min=0.5, r_max=0.9, key=jr.key(1))
    a = np.asarray(cell.decay())
    assert 0.5 <= a.min() < 0.52 and 0.88 < a.max() <= 0.9
    assert abs(np.mean(a) - 0.7) < 0.02  # uniform on [0.5, 0.9]
    x, h = jnp.arange(3.0), jnp.linspace(-1, 1, 500)
    want = a * np.asarray(h) + np.sqrt(1 - a**2) * (np.asarray(cell.weight) @ x)
    np.testing.assert_allclose(cell(x, h), want, rtol=1e-13)


def test_summary_lists_neuron_parameters():
    n = 3
    model, state = eqx.nn.make_with_state(Net)(
        enn.LIF(n, learn_tau=True), 2, 2, key=jr.key(0)
    )
    learner, trace_state = etrace.compile(model, jnp.zeros(2), state=state)
    text = learner.summary()
    assert re.search(r"neuron\.z\+neuron\.v: N=3 neurons, K=2", text)
    (row,) = [line for line in text.splitlines() if "neuron.tau" in line]
    # One trace per state, but none for the spike, whose previous value no
    # update reads (D-RTRL reads its gradient from the traces before the update).
    assert "elementwise" in row and "  (1, 3, 1, 1)  " in row
    assert "no trace kept for neuron.z" in row
    assert "neuron.threshold" not in text  # a Python float: no parameter
    (trace,) = learner.trace_of(trace_state, lambda m: m.neuron.tau).values()
    assert trace[0] is None and trace[1].shape == (1, n, 1, 1)

    model, state = eqx.nn.make_with_state(Net)(enn.ALIF(n), 2, 2, key=jr.key(0))
    text = etrace.compile(model, jnp.zeros(2), state=state)[0].summary()
    assert "K=3" in text and "neuron.tau" not in text
    # The adaptation reads the previous spike: every state keeps its trace.
    assert re.search(r"encoder\.weight .* matrix .* 3 x \(1, 3, 1, 2\)", text)


def test_neurons_work_in_sequential():
    def make(key):
        k1, k2 = jr.split(key)
        return eqx.nn.Sequential(
            [
                eqx.nn.Linear(2, 3, key=k1),
                enn.LIF(3, tau=4.0),
                eqx.nn.Linear(3, 2, key=k2),
            ]
        )

    model, state = eqx.nn.make_with_state(make)(jr.key(0))
    xs, targets = _data(0, 8, 2)
    learner, trace_state = etrace.compile(model, xs[0], state=state)
    et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)


def test_docs_recurrent_snippet_runs():
    text = (ROOT / "docs" / "nn.md").read_text()
    (code,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
        if "class RecurrentSNN" in b
    ]
    code = code.replace("(50, ", "(6, ")  # fewer steps
    namespace: dict = {}
    exec(compile(code, "docs/nn.md", "exec"), namespace)
    assert jnp.isfinite(namespace["losses"]).all()


# -- argument errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: enn.LIF(3, reset="sticky"), r"`reset` must be one of 'soft'"),
        (lambda: enn.IF(3, reset="Soft"), r"`reset` must be one of"),
        (lambda: enn.ALIF(3, reset=""), r"`reset` must be one of"),
        (lambda: enn.LIF(3, tau=0.0), r"`tau` must be a finite number > 0.*tau=20"),
        (lambda: enn.LIF(3, tau=-5.0), r"`tau` must be"),
        (lambda: enn.LIF(3, tau=math.inf), r"`tau` must be"),
        (lambda: enn.ALIF(3, tau_adapt=0.0), r"`tau_adapt` must be"),
        (lambda: enn.ALIF(3, beta=-1.0), r"`beta` must be >= 0"),
        (lambda: enn.LIF(3, refractory=-1), r"`refractory` must be >= 0.*Use 0"),
        (lambda: enn.LIF(3, threshold=math.nan), r"`threshold` must be a finite"),
        (lambda: enn.LIF(0), r"`n`, the number of neurons, must be an int >= 1"),
        (lambda: enn.LeakyRateReadout(3, tau=5.0, kappa=0.9), r"at most one of `tau`"),
        (lambda: enn.LeakyRateReadout(3, kappa=1.0), r"`kappa` must lie in \(0, 1\)"),
        (lambda: enn.LeakyRateReadout(3, kappa=0.0), r"`kappa` must be"),
        (lambda: enn.LeakyRateReadout(3, tau=-1.0), r"`tau` must be"),
        (lambda: enn.FastSigmoid(0.0), r"`slope` of `FastSigmoid` must be"),
        (lambda: enn.Gaussian(slope=-1.0), r"`slope` of `Gaussian` must be"),
        (
            lambda: enn.DiagonalLinearCell(2, 3, r_min=0.9, r_max=0.5, key=jr.key(0)),
            r"0 < r_min <= r_max < 1",
        ),
        (
            lambda: enn.DiagonalLinearCell(2, 3, r_max=1.0, key=jr.key(0)),
            r"0 < r_min <= r_max < 1",
        ),
        (lambda: enn.ElmanCell(0, 3, key=jr.key(0)), r"`input_size` must be an int"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(etrace.EtraceError, match=match):
        make()
    assert issubclass(etrace.EtraceError, ValueError)
