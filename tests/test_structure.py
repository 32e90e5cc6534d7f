"""Static structure the runtime exploits for speed: the coupling pattern of each
group's diagonal Jacobian, the neuron map's fast paths and the batch sum."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import etrace
import etrace.nn as enn
import etrace.testing as et

from .helpers import leaf_errors, mse


SEEN: list = []


class Record(etrace.AbstractWrappedAlgorithm):
    """An algorithm that keeps every `Jacobians` it is given (run eagerly)."""

    inner: etrace.AbstractAlgorithm

    def update(self, graph, traces, jac):
        SEEN.append(jac)
        return self.inner.update(graph, traces, jac)


class SpikingLayer(eqx.Module):
    """Input and own previous spikes through one linear map into LIF neurons."""

    synapses: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key, refractory=0, reset="soft"):
        k1, k2 = jr.split(key)
        self.synapses = eqx.nn.Linear(3 + 4, 4, key=k1)
        self.lif = enn.LIF(
            4, tau=3.0, threshold=0.3, refractory=refractory, reset=reset
        )
        self.readout = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x, state):
        current = self.synapses(jnp.concatenate([x, self.lif.spikes(state)]))
        z, state = self.lif(current, state)
        return self.readout(z), state


class LSTM(eqx.Module):
    cell: eqx.nn.LSTMCell
    hc: eqx.nn.StateIndex

    def __init__(self, key):
        self.cell = eqx.nn.LSTMCell(3, 4, key=key)
        self.hc = eqx.nn.StateIndex((jnp.zeros(4), jnp.zeros(4)))

    def __call__(self, x, state):
        h, c = self.cell(x, state.get(self.hc))
        return h, state.set(self.hc, (h, c))


class Gated(eqx.Module):
    """`h` reads the previous `c` only through `stop_gradient`."""

    w: jax.Array
    u: jax.Array

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.w = jr.normal(k1, (4, 3))
        self.u = jr.normal(k2, (4, 3))

    def __call__(self, x, state):
        h, c = state
        h = 0.9 * h + jax.lax.stop_gradient(c) * (self.w @ x)
        c = 0.5 * c + jnp.tanh(self.u @ x)
        return h, (h, c)


def _build(name, key):
    if name == "lstm":
        model, state = eqx.nn.make_with_state(LSTM)(key)
    elif name == "gated":
        model, state = Gated(key), (jnp.full(4, 0.5), jnp.full(4, 1.5))
    else:
        refractory = 2 if name == "refractory" else 0
        reset = "hard" if name == "hard" else "soft"
        model, state = eqx.nn.make_with_state(SpikingLayer)(key, refractory, reset)
    return model, state


# Per model: the group of interest and its pattern by leaf name, row = new state,
# column = previous state.
EXPECTED = {
    # The spike's previous value reaches neither state (only the input weight).
    "lif": {"z": {"z": False, "v": True}, "v": {"z": False, "v": True}},
    "hard": {"z": {"z": False, "v": True}, "v": {"z": False, "v": True}},
    # The counter reaches the membrane and the spike only through a comparison.
    "refractory": {
        "z": {"z": False, "v": True, "counter": False},
        "v": {"z": False, "v": True, "counter": False},
        "counter": {"z": False, "v": False, "counter": True},
    },
    # Gates read `h` through weights: inside the update only `c` recurs.
    "lstm": {"h": {"h": False, "c": True}, "c": {"h": False, "c": True}},
    "gated": {"h": {"h": True, "c": False}, "c": {"h": False, "c": True}},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_coupling_is_the_structure_of_D(name, key):
    model, state = _build(name, key)
    learner, _ = etrace.compile(
        model, jnp.zeros(3), state=state, algorithm=Record(etrace.D_RTRL())
    )
    (group,) = [g for g in learner.graph.groups if g.k > 1]
    labels = {
        "lstm": ["h", "c"],
        "gated": ["h", "c"],
    }.get(name) or [n.rsplit(".", 1)[-1] for n in group.leaf_names]
    want = EXPECTED[name]
    expected = tuple(tuple(want[r][c] for c in labels) for r in labels)
    assert group.coupling == expected

    # Every structural zero is a zero of `D`, at states that do spike and adapt;
    # and the entries claimed possible are not all zero (the pattern is not
    # vacuous).
    SEEN.clear()
    trace_state = learner.init()
    xs = 2.0 * jr.normal(jr.key(1), (12, 3))
    for x in xs:
        _, trace_state = learner.step(model, trace_state, x)
    Ds = np.stack([np.asarray(j.D[group.name]) for j in SEEN])
    pattern = np.asarray(expected)
    assert np.all(Ds[:, :, ~pattern] == 0)
    assert np.any(Ds[:, :, pattern] != 0)


def test_coupling_of_single_state_groups(key):
    model, state = eqx.nn.make_with_state(SpikingLayer)(key)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    assert all(g.coupling is not None for g in learner.graph.groups)
    model, state = et.build("gru", 3, 4, 2, 0)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    assert [g.coupling for g in learner.graph.groups] == [((True,),)]


class Gates(eqx.Module):
    """A GRU (outputs `3H`, neuron `m mod H`), an elementwise bias (neuron `m`)
    and a convolution (channels by positions)."""

    gru: eqx.nn.GRUCell
    conv: eqx.nn.Conv1d

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.gru = eqx.nn.GRUCell(3, 4, key=k1)
        self.conv = eqx.nn.Conv1d(1, 2, 3, padding=1, key=k2)

    def __call__(self, x, state):
        h, v = state
        h = self.gru(x, h)
        v = 0.8 * v + jnp.tanh(self.conv(x[None]))
        return h, (h, v)


@pytest.mark.parametrize("axis", [0, 1])
def test_gather_equals_indexing(axis, key):
    model = Gates(key)
    learner, _ = etrace.compile(
        model, jnp.zeros(3), state=(jnp.zeros(4), jnp.zeros((2, 3)))
    )
    maps = set()
    for unit in learner.graph.units:
        n = unit.group.n
        shape = (5, n, 2, 2) if axis else (n, 2, 2)
        a = jr.normal(jr.key(2), shape)
        want = a[:, unit.nmap] if axis else a[unit.nmap]
        np.testing.assert_array_equal(unit.gather(a, axis=axis), want)
        flat = unit.nmap.reshape(-1)
        maps.add("identity" if np.array_equal(flat, np.arange(flat.size)) else "other")
    assert maps == {"identity", "other"}


def test_gather_of_irregular_tiled_and_repeated_maps(key):
    model, state = et.build("gru", 3, 4, 2, 0)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    unit = learner.graph.units[0]
    a = jnp.arange(6.0).reshape(3, 2)
    maps = {
        "irregular": np.array([[[2], [0], [2], [1]]], np.int32),
        "tiled": np.tile(np.arange(3), 2).reshape(1, 6, 1),
        "repeated": np.repeat(np.arange(3), 2).reshape(1, 6, 1),
    }
    out = {}
    for name, nmap in maps.items():
        u = dataclasses.replace(unit, nmap=nmap)
        out[name] = u.gather(a)
        np.testing.assert_array_equal(out[name], a[nmap])
    assert not np.array_equal(out["tiled"], out["repeated"])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13, 64])
def test_batch_sum(n, key):
    a = jr.normal(key, (n, 3, 2))
    np.testing.assert_allclose(
        etrace.batch_sum(a), a.sum(axis=0), rtol=1e-12, atol=1e-14
    )
    assert etrace.batch_sum(a).shape == (3, 2)


TAKEN: list = []


class Spy(etrace.AbstractWrappedAlgorithm):
    """Records whether the read-out from the previous traces was used."""

    inner: etrace.AbstractAlgorithm

    def gradients_from_previous(self, graph, traces, signal, jac, *, summed=False):
        out = super().gradients_from_previous(graph, traces, signal, jac, summed=summed)
        TAKEN.append((graph.groups[0].name, summed, out is not None))
        return out


class Updated(etrace.AbstractWrappedAlgorithm):
    """The same algorithm, read out from the updated traces (a wrapper that
    overrides `gradients` opts out of the read-out from the previous ones)."""

    inner: etrace.AbstractAlgorithm

    def gradients(self, graph, traces, signal, jac):
        return self.inner.gradients(graph, traces, signal, jac)


class Composed(etrace.AbstractAlgorithm):
    """D-RTRL driven by hand, not as a wrapper: read out from the updated traces."""

    inner: etrace.AbstractAlgorithm

    def init(self, graph):
        return self.inner.init(graph)

    def update(self, graph, traces, jac):
        return self.inner.update(graph, traces, jac)

    def gradients(self, graph, traces, signal, jac):
        return self.inner.gradients(graph, traces, signal, jac)


class MaskedSpiking(eqx.Module):
    """Feed-forward LIF layer with a constant mask on its input weight."""

    w: jax.Array
    lif: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.w = jr.normal(k1, (4, 3))
        self.lif = enn.LIF(4, tau=3.0, threshold=0.3)
        self.readout = eqx.nn.Linear(4, 2, key=k2)

    def __call__(self, x, state):
        mask = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], bool)
        z, state = self.lif(jnp.where(mask, self.w, 0.0) @ x, state)
        return self.readout(z), state


def _rate(model, state, xs):
    """The firing rate of the LIF neurons over `xs` (batched on axis 1 or not)."""

    def body(s, x):
        _, s = model(x, s)
        return s, model.lif.spikes(s)

    flat = xs if xs.ndim == 2 else xs.reshape(-1, xs.shape[-1])
    _, z = jax.lax.scan(body, state, flat)
    return float(jnp.mean(z))


@pytest.mark.parametrize("name", ["recurrent", "masked"])
@pytest.mark.parametrize("batch", [None, 3])
def test_read_out_from_previous_traces(name, batch, key):
    build = SpikingLayer if name == "recurrent" else MaskedSpiking
    model, state = eqx.nn.make_with_state(build)(key)
    xs = 2.0 * jr.normal(jr.key(3), (10, 3) if batch is None else (10, batch, 3))
    ys = jr.normal(jr.key(4), xs.shape[:-1] + (2,))

    def run(algorithm):
        learner, _ = etrace.compile(
            model, jnp.zeros(3), state=state, algorithm=algorithm
        )
        ts = learner.init(batch_size=batch)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        return grads, ts

    TAKEN.clear()
    previous, ts = run(Spy(etrace.D_RTRL()))
    # No trace is kept for the spike (state 0), whose previous value no update
    # reads; a wrapper that reads out from the updated traces keeps it.
    spiking = [t for name, t in ts.traces.items() if "lif" in name]
    assert spiking and all(t[0] is None and t[1] is not None for t in spiking)
    _, ts_updated = run(Updated(etrace.D_RTRL()))
    kept = [t for name, t in ts_updated.traces.items() if "lif" in name]
    assert all(t[0] is not None for t in kept)
    assert max(float(jnp.abs(t[0]).max()) for t in kept) > 1e-3
    taken = {(g, s) for g, s, used in TAKEN if used}
    # The spiking group's gradients came from the previous traces (summed over the
    # batch when there is one); the readout's group has no transient state.
    assert ("lif.z+lif.v", batch is not None) in taken
    assert all("lif" in g for g, _ in taken)
    assert 0 < _rate(model, state, xs) < 1
    updated, _ = run(Updated(etrace.D_RTRL()))
    assert max(leaf_errors(previous, updated).values()) <= 1e-12
    # Not vacuous: the traced weight's gradient is non-zero.
    weight = previous.synapses.weight if name == "recurrent" else previous.w
    assert np.abs(np.asarray(weight)).max() > 1e-3
    # And right: one feed-forward LIF layer is D-RTRL's exact regime, where the
    # read-out from the previous traces must equal BPTT (zero or stale traces
    # would not); the recurrent weight must differ.
    s0 = (
        state
        if batch is None
        else jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    )
    bptt, _ = etrace.bptt_grad(mse, model, s0, xs, ys, batched=batch is not None)
    error = max(leaf_errors(previous, bptt).values())
    assert error <= 1e-9 if name == "masked" else error > 1e-3


class Summed(eqx.Module):
    """`tanh(W x + U h + b)`: three sites summed before the update reads them."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __init__(self, key):
        k1, k2, k3 = jr.split(key, 3)
        self.w = jr.normal(k1, (4, 3))
        self.u = 0.5 * jr.normal(k2, (4, 4))
        self.b = jr.normal(k3, (4,))

    def __call__(self, x, h):
        h = jnp.tanh(self.w @ x + self.u @ h + self.b)
        return h, h


class Reused(eqx.Module):
    """The bias is read twice, and the input product is scaled before the sum."""

    w: jax.Array
    b: jax.Array

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.w = jr.normal(k1, (4, 3))
        self.b = jr.normal(k2, (4,))

    def __call__(self, x, h):
        h = jnp.tanh(2.0 * (self.w @ x) + self.b) + 0.5 * self.b * h
        return h, h


def _same_df(learner):
    return {u.site.name: u.same_df for u in learner.graph.units}


def test_same_df_of_summed_sites(key):
    model, state = eqx.nn.make_with_state(SpikingLayer)(key)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    weight = "synapses.weight @ x -> lif.z+lif.v"
    assert _same_df(learner) == {"synapses.bias": weight, "synapses.weight @ x": None}
    model, state = et.build("gru", 3, 4, 2, 0)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    got = _same_df(learner)
    # `bias` is added to `weight_ih @ x`; `bias_n` to a third of `weight_hh @ h`.
    assert got == {
        "cell.bias": "cell.weight_ih @ x -> h",
        "cell.bias_n": None,
        "cell.weight_ih @ x": None,
        "cell.weight_hh @ x": None,
    }
    learner, _ = etrace.compile(Summed(key), jnp.zeros(3), state=jnp.zeros(4))
    # `w` keeps the trace (the first matrix site); `u` and `b` read it.
    assert _same_df(learner) == {
        "b": "w @ x -> state",
        "u @ x": "w @ x -> state",
        "w @ x": None,
    }
    learner, _ = etrace.compile(Reused(key), jnp.zeros(3), state=jnp.zeros(4))
    assert set(_same_df(learner).values()) == {None}


class Unshared(etrace.ES_D_RTRL):
    """ES-D-RTRL with a full trace for every unit (a subclass that replaces a unit
    method opts out of sharing)."""

    def update_unit(self, unit, trace, D, Df, x):
        return super().update_unit(unit, trace, D, Df, x)


@pytest.mark.parametrize("name", ["gru", "lif", "summed"])
@pytest.mark.parametrize("batch", [None, 3])
def test_shared_output_traces(name, batch, key):
    if name == "gru":
        model, state = et.build("gru", 3, 4, 2, 0)
    elif name == "lif":
        model, state = eqx.nn.make_with_state(SpikingLayer)(key)
    else:
        model, state = Summed(key), jnp.zeros(4)
    xs = 2.0 * jr.normal(jr.key(5), (10, 3) if batch is None else (10, batch, 3))
    ys = jr.normal(jr.key(6), xs.shape[:-1] + (4 if name == "summed" else 2,))

    def run(algorithm):
        learner, _ = etrace.compile(
            model, jnp.zeros(3), state=state, algorithm=algorithm
        )
        ts = learner.init(batch_size=batch)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        return learner, grads, ts

    learner, shared, ts = run(etrace.ES_D_RTRL(decay=0.8))
    _, full, full_ts = run(Unshared(decay=0.8))
    twins = {u.name: u.same_df for u in learner.graph.units if u.same_df}
    assert twins
    for twin, source in twins.items():
        # The shared unit keeps its input trace only; the full run's output trace
        # of that unit is the source's, step after step.
        assert ts.traces[twin][1] is None
        np.testing.assert_array_equal(ts.traces[twin][0], full_ts.traces[twin][0])
        np.testing.assert_array_equal(
            full_ts.traces[twin][1], full_ts.traces[source][1]
        )
    assert max(leaf_errors(shared, full).values()) <= 1e-12
    if name == "lif":
        assert 0 < _rate(model, state, xs) < 1
        (bias_trace,) = learner.trace_of(ts, lambda m: m.synapses.bias).values()
        assert bias_trace[1] is None
        assert "shares the output trace of synapses.weight @ x" in learner.summary()
    # Not vacuous: every shared unit's parameter has a gradient.
    bias = {"gru": lambda g: g.cell.bias, "lif": lambda g: g.synapses.bias}.get(
        name, lambda g: g.b
    )
    assert np.abs(np.asarray(bias(shared))).max() > 1e-3

    # The claim behind it: the two units' `Df` are equal at every step, and a
    # unit that is not shared (the GRU's `weight_hh`, whose new-gate output is
    # scaled by the reset gate) has a different one.
    SEEN.clear()
    learner, _ = etrace.compile(
        model, jnp.zeros(3), state=state, algorithm=Record(etrace.ES_D_RTRL(0.8))
    )
    trace_state = learner.init()
    for x in xs if batch is None else xs[:, 0]:
        _, trace_state = learner.step(model, trace_state, x)
    for jac in SEEN:
        Df = jac.Df
        for twin, source in twins.items():
            np.testing.assert_array_equal(Df[twin], Df[source])
        if name == "gru":
            hh = Df["cell.weight_hh @ x -> h"]
            assert not np.array_equal(hh, Df["cell.weight_ih @ x -> h"])


def test_spike_trace_memory_and_read_out_without_it(key):
    model, state = eqx.nn.make_with_state(MaskedSpiking)(key)
    x0 = jnp.zeros(3)
    kept, _ = etrace.compile(model, x0, state=state, algorithm=Updated(etrace.D_RTRL()))
    dropped, ts = etrace.compile(model, x0, state=state)
    total = kept.summary().splitlines()[-1], dropped.summary().splitlines()[-1]
    # The masked weight's 7 non-zeros in float64, for two states or for one.
    assert total == (
        "Trace memory per example: 112 B",
        "Trace memory per example: 56 B",
    )
    assert "no trace kept for lif.z: the update reads" in dropped.summary()
    assert "no trace for" not in kept.summary()
    # A read-out from the updated traces that does not go through
    # `AbstractWrappedAlgorithm` meets the missing trace and says so.
    composed, ts = etrace.compile(
        model, x0, state=state, algorithm=Composed(etrace.D_RTRL())
    )
    with pytest.raises(etrace.EtraceError, match=r"needs the trace of lif\.z"):
        eqx.filter_grad(lambda m: jnp.sum(composed.step(m, ts, x0)[0]))(model)


def test_wrapper_around_reduced_precision_keeps_spike_trace(key):
    # The outer wrapper reads out from the updated traces; the narrowed traces of
    # the inner `ReducedPrecision` then hold the spike's trace too.
    model, state = eqx.nn.make_with_state(MaskedSpiking)(key)
    xs = 2.0 * jr.normal(jr.key(3), (10, 3))
    ys = jr.normal(jr.key(4), (10, 2))
    assert 0 < _rate(model, state, xs) < 1
    grads = {}
    for name, algorithm in [
        ("plain", etrace.D_RTRL()),
        ("nested", Updated(etrace.ReducedPrecision(etrace.D_RTRL(), jnp.float32))),
    ]:
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        spiking = [t for n, t in ts.traces.items() if "lif" in n]
        assert all((t[0] is None) == (name == "plain") for t in spiking)
        grads[name], _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    errors = leaf_errors(grads["nested"], grads["plain"])
    # float32 traces: agreement to their rounding, not exactly.
    assert 0 < max(errors.values()) <= 1e-5


class WideSpiking(eqx.Module):
    """A feed-forward LIF layer of 16 neurons on 3 inputs: a trace with few inputs
    against many outputs, and a spike read out from the previous traces."""

    synapses: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jr.split(key)
        self.synapses = eqx.nn.Linear(3, 16, key=k1)
        self.lif = enn.LIF(16, tau=3.0, threshold=0.3)
        self.readout = eqx.nn.Linear(16, 2, key=k2)

    def __call__(self, x, state):
        z, state = self.lif(self.synapses(x), state)
        return self.readout(z), state


@pytest.mark.parametrize("name", ["gru", "spiking"])
@pytest.mark.parametrize("batch", [None, 3])
def test_turned_traces_of_few_inputs(name, batch, key, monkeypatch):
    from etrace import _kernels

    if name == "gru":  # a GRU of 16 units on 3 inputs, with a linear readout
        model, state = et.build("gru", 3, 16, 2, seed=0)
        where = lambda m: m.cell.weight_ih  # noqa: E731
    else:
        model, state = eqx.nn.make_with_state(WideSpiking)(key)
        where = lambda m: m.synapses.weight  # noqa: E731
    lead = (12,) if batch is None else (12, batch)
    xs = 2.0 * jr.normal(jr.key(3), lead + (3,))
    ys = jr.normal(jr.key(4), lead + (2,))
    if name == "spiking":
        assert 0 < _rate(model, state, xs) < 1

    def run():
        learner, ts = etrace.compile(model, xs.reshape(-1, 3)[0], state=state)
        if batch is not None:
            ts = learner.init(batch_size=batch)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        (unit,) = [
            u
            for u in learner.graph.units
            if "weight" in u.name and ("ih" in u.name or "synapses" in u.name)
        ]
        return grads, ts, learner, unit

    grads, ts, learner, unit = run()
    monkeypatch.setattr(_kernels, "TURNED_INPUTS", 0)
    plain, plain_ts, plain_learner, _ = run()
    # Stored turned, `(B, C, Fw, Fx)`, and shown canonical by `trace_of`.
    b, w, f, c = unit.shape
    stored = [eps for eps in ts.traces[unit.name] if eps is not None]
    assert stored and all(eps.shape[-4:] == (b, c, w, f) for eps in stored)
    (shown,) = learner.trace_of(ts, where).values()
    (expected,) = plain_learner.trace_of(plain_ts, where).values()
    for eps, ref in zip(shown, expected):
        if ref is None:
            assert eps is None
            continue
        assert eps.shape[-4:] == (b, w, f, c)
        np.testing.assert_allclose(eps, ref, rtol=1e-12, atol=1e-15)
        # Negative control: the stored array is the transpose, not a reshape.
        assert float(jnp.max(jnp.abs(ref))) > 0
        assert not np.allclose(stored[0].reshape(ref.shape), ref)
    # The same gradients as from canonical traces, to rounding.
    assert max(leaf_errors(grads, plain).values()) <= 1e-12
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))
