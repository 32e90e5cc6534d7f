"""The spiking-network algorithms (e-prop, OSTL, OTTT, OTPE, OSTTP), each against
the oracle in the regime where its equations say it is exact, with a negative
control next to every equality. Networks are `etrace.nn` neurons; every comparison
first checks that the network spikes (rate strictly between 0 and 1)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from hypothesis import assume, given, Phase, settings, strategies as st

import etrace
import etrace.nn as enn
import etrace.testing as et

from ..helpers import leaf_errors, mse


TAU = 5.0
LEAK = math.exp(-1 / TAU)


class SNN(eqx.Module):
    """`depth` spiking layers (optionally recurrent: input and own spikes through
    one linear map), a linear readout and optionally a leaky readout with state."""

    linears: tuple[eqx.nn.Linear, ...]
    neurons: tuple[enn.AbstractSpikingNeuron, ...]
    out: eqx.nn.Linear
    readout: enn.LeakyRateReadout | None
    recurrent: bool = eqx.field(static=True)

    def __init__(
        self,
        n_in,
        n,
        n_out,
        key,
        *,
        depth=1,
        neuron="lif",
        recurrent=False,
        kappa=None,
        reset="soft",
    ):
        keys = jr.split(key, depth + 1)
        sizes = [n_in] + [n] * depth
        self.linears = tuple(
            eqx.nn.Linear(sizes[i] + (n if recurrent else 0), n, key=keys[i])
            for i in range(depth)
        )
        if neuron == "lif":
            make = lambda: enn.LIF(n, tau=TAU, threshold=0.5, reset=reset)  # noqa: E731
        else:
            make = lambda: enn.ALIF(  # noqa: E731
                n, tau=TAU, tau_adapt=8.0, beta=0.4, threshold=0.5, reset=reset
            )
        self.neurons = tuple(make() for _ in range(depth))
        self.out = eqx.nn.Linear(n, n_out, key=keys[-1])
        self.readout = (
            None if kappa is None else enn.LeakyRateReadout(n_out, kappa=kappa)
        )
        self.recurrent = recurrent

    def __call__(self, x, state):
        for linear, neuron in zip(self.linears, self.neurons):
            if self.recurrent:
                x = jnp.concatenate([x, neuron.spikes(state)])
            x, state = neuron(linear(x), state)
        y = self.out(x)
        if self.readout is not None:
            y, state = self.readout(y, state)
        return y, state


def build(seed, *, n_in=3, n=5, n_out=2, **kwargs):
    return eqx.nn.make_with_state(SNN)(n_in, n, n_out, jr.key(seed), **kwargs)


def sequence(seed, T=10, n_in=3, n_out=2, scale=2.5):
    xs = scale * jr.normal(jr.key(seed + 1000), (T, n_in))
    ys = jr.normal(jr.key(seed + 2000), (T, n_out))
    return xs, ys


def compiled(algorithm, model, state, xs):
    return etrace.compile(model, xs[0], algorithm=algorithm, state=state)


def online(algorithm, model, state, xs, ys):
    learner, ts = compiled(algorithm, model, state, xs)
    return etrace.online_grad(learner, mse, model, ts, xs, ys)[0]


def same(a, b, rtol=1e-12):
    errors = leaf_errors(a, b)
    return max(errors.values()) <= rtol, errors


def live(model, state, xs):
    """Discards a drawn network that never (or always) spikes somewhere: a
    comparison on it would be vacuous (`assert_matches_bptt` refuses it too)."""
    assume(et.liveness(model, xs, state=state).live)


def check(algorithm, model, state, xs, ys, *, equal, params=None):
    learner, ts = compiled(algorithm, model, state, xs)
    assert_ = et.assert_matches_bptt if equal else et.assert_differs_from_bptt
    return assert_(learner, mse, model, ts, xs, ys, params=params)


seeds = st.integers(0, 10_000)
neurons = st.sampled_from(["lif", "alif"])
# Each example compiles and runs two gradient oracles: few examples, and no
# shrinking (a failing seed is already minimal).
few = settings(
    max_examples=2,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)


# -- e-prop ---------------------------------------------------------------------------


@few
@given(seed=seeds, neuron=neurons, recurrent=st.booleans())
def test_eprop_symmetric_without_filter_is_d_rtrl(seed, neuron, recurrent):
    model, state = build(seed, neuron=neuron, recurrent=recurrent)
    xs, ys = sequence(seed)
    live(model, state, xs)
    ok, errors = same(
        online(etrace.EProp(), model, state, xs, ys),
        online(etrace.D_RTRL(), model, state, xs, ys),
    )
    assert ok, errors
    # Without recurrent weights that is BPTT; with them, it is not.
    check(etrace.EProp(), model, state, xs, ys, equal=not recurrent)


def test_eprop_without_filter_keeps_d_rtrls_traces():
    # Without a filter, e-prop's traces and read-out are D-RTRL's: the same trace
    # state (no trace for a spike, a GRU's input weight stored turned and shown
    # canonical by `trace_of`), the same gradients. Random feedback changes the
    # learning signal only: the same traces, other gradients.
    model, state = build(4, n=6, recurrent=True)
    xs, ys = sequence(4)
    rates = et.liveness(model, xs, state=state).rates
    assert rates and all(0 < r < 1 for r in rates.values())
    runs = {}
    for name, algorithm in (
        ("eprop", etrace.EProp()),
        ("d_rtrl", etrace.D_RTRL()),
        ("random", etrace.EProp(feedback="random")),
    ):
        learner, ts = compiled(algorithm, model, state, xs)
        runs[name] = ts, etrace.online_grad(learner, mse, model, ts, xs, ys)[:2]
    (ts, (grads, out)), (ts_d, (grads_d, out_d)) = runs["eprop"], runs["d_rtrl"]
    assert jax.tree.structure(ts.traces) == jax.tree.structure(ts_d.traces)
    assert any(None in t for t in ts.traces.values())  # the spike keeps none
    assert same(grads, grads_d)[0] and same(out.traces, out_d.traces)[0]
    assert jnp.abs(grads.linears[0].weight).max() > 0
    ts_r, (grads_r, _) = runs["random"]
    assert jax.tree.structure(ts_r.traces) == jax.tree.structure(ts_d.traces)
    assert not same(grads_r.linears[0].weight, grads.linears[0].weight, 1e-3)[0]

    gru, gru_state = et.build("gru", 3, 6, 2, seed=0)
    views = {}
    for name, algorithm in (("eprop", etrace.EProp()), ("d_rtrl", etrace.D_RTRL())):
        learner, ts = etrace.compile(gru, xs[0], state=gru_state, algorithm=algorithm)
        ts = etrace.online_grad(learner, mse, gru, ts, xs, ys)[1]
        views[name] = ts, learner.trace_of(ts, lambda m: m.cell.weight_ih)
    (ts, view), (_, view_d) = views["eprop"], views["d_rtrl"]
    stored = next(v for k, v in ts.traces.items() if k.startswith("cell.weight_ih"))
    assert stored[0].shape != view["h"][0][0].shape  # stored turned
    assert same(view, view_d)[0]


@few
@given(seed=seeds, neuron=neurons)
def test_eprop_kappa_equals_bptt_on_a_leaky_readout(seed, neuron):
    kappa = 0.7
    model, state = build(seed, neuron=neuron, kappa=kappa)
    xs, ys = sequence(seed)
    live(model, state, xs)
    check(etrace.EProp(kappa=kappa), model, state, xs, ys, equal=True)
    # Negative controls: a mismatched filter, and no filter at all (D-RTRL), lose
    # the readout's memory of the hidden layer's past spikes.
    rows = check(etrace.EProp(kappa=0.3), model, state, xs, ys, equal=False)
    assert max(rows[p][0] for p in rows if p.startswith("linears")) > 1e-3
    check(etrace.D_RTRL(), model, state, xs, ys, equal=False, params="linears")
    # The readout's own weights are its D-RTRL traces (not filtered twice).
    check(etrace.EProp(kappa=0.3), model, state, xs, ys, equal=True, params="out")


def _textbook_update(filt, trace, D, Df, x):
    """A filtered unit's update written out: every state's trace
    `eps_k = sum_j D_kj eps_j + Df_k x`, then `filtered = filt(filtered, eps)`."""
    eps = trace["trace"]
    new = tuple(
        sum(D[..., k, j][..., None] * eps[j] for j in range(len(eps)))
        + Df[..., k][..., None] * x[:, None]
        for k in range(len(eps))
    )
    return {"trace": new, "filtered": filt(trace["filtered"], new)}


class _FullEProp(etrace.EProp):
    """e-prop that keeps every trace (a subclass replacing `update_unit`), with
    the update written out."""

    def update_unit(self, unit, trace, D, Df, x):
        if not isinstance(trace, dict):
            return super().update_unit(unit, trace, D, Df, x)
        return _textbook_update(self.kappa, trace, D, Df, x)


class _FullOTPE(etrace.OTPE):
    def update_unit(self, unit, trace, D, Df, x):
        if not isinstance(trace, dict):
            return super().update_unit(unit, trace, D, Df, x)
        return _textbook_update(self.filter, trace, D, Df, x)


class _ReadsUpdated(etrace.AbstractWrappedAlgorithm):
    """The same algorithm behind a wrapper that reads out from the updated
    traces: its `init` asks for every trace."""

    inner: etrace.AbstractAlgorithm

    def gradients(self, graph, traces, signal, jac):
        return self.inner.gradients(graph, traces, signal, jac)


class _HalfInput(etrace.KappaFilter):
    """A filter of its own: `kappa * filtered + e / 2`."""

    def __call__(self, filtered, e):
        return jax.tree.map(lambda f, v: self.kappa * f + 0.5 * v, filtered, e)


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize(
    "make, full",
    [
        (lambda: etrace.EProp(kappa=0.7), lambda: _FullEProp(kappa=0.7)),
        (lambda: etrace.OTPE(0.7), lambda: _FullOTPE(0.7)),
        # A filter that replaces `KappaFilter.__call__` is the one applied.
        (
            lambda: etrace.EProp(kappa=_HalfInput(0.7)),
            lambda: _FullEProp(kappa=_HalfInput(0.7)),
        ),
    ],
    ids=["eprop", "otpe", "own-filter"],
)
def test_filtered_traces_keep_no_spike_trace_and_update_in_place(make, full, batch):
    # A filtered group's spike trace feeds only its filtered trace: it is not kept
    # but computed from the previous traces at each update, and the kept traces
    # are updated after the filtered ones, so that XLA writes them in place.
    # Gradients and traces equal those of the full traces, and the spike's
    # filtered trace, which the dropped trace feeds, is not zero.
    model, state = build(3, n=6, kappa=0.7, recurrent=True)
    lead = (12,) if batch is None else (12, batch)
    xs = 2.5 * jr.normal(jr.key(5), lead + (3,))
    ys = jr.normal(jr.key(6), lead + (2,))
    rates = et.liveness(model, xs.reshape(-1, 3), state=state).rates
    assert rates and all(0 < r < 1 for r in rates.values())
    runs = {}
    cases = (("dropped", make()), ("full", full()), ("wrapped", _ReadsUpdated(make())))
    for name, algorithm in cases:
        learner, _ = compiled(algorithm, model, state, xs.reshape(-1, 3))
        ts = learner.init(batch_size=batch)
        run = jax.jit(
            lambda ts, learner=learner: etrace.online_grad(
                learner, mse, model, ts, xs, ys
            )[:2]
        )
        temp = run.lower(ts).compile().memory_analysis().temp_size_in_bytes
        runs[name] = (ts, run(ts), temp)
    ts, (grads, out), temp = runs["dropped"]
    ts_full, (grads_full, out_full), temp_full = runs["full"]
    filtered = {k: v for k, v in ts.traces.items() if isinstance(v, dict)}
    # The spike's trace (the LIF layer's state not kept) is `None`, the membrane's
    # is kept; the full traces keep both.
    spike = {
        k: [e is None for e in v["trace"]].index(True) for k, v in filtered.items()
    }
    assert filtered and all(
        sum(e is None for e in v["trace"]) == 1 for v in filtered.values()
    )
    assert all(e is not None for k in filtered for e in ts_full.traces[k]["trace"])
    assert same(grads, grads_full)[0]
    # A wrapper that reads the updated traces itself is given every trace, and
    # the update with them all kept is the same.
    ts_wrapped, (grads_wrapped, out_wrapped), _ = runs["wrapped"]
    for k in filtered:
        assert all(e is not None for e in ts_wrapped.traces[k]["trace"])
        assert same(out_wrapped.traces[k], out_full.traces[k])[0]
    assert same(grads_wrapped, grads_full)[0]
    assert jnp.abs(grads.linears[0].weight).max() > 0
    for k, j in spike.items():
        new, old = out.traces[k], out_full.traces[k]
        assert same(new["filtered"], old["filtered"])[0]
        assert same(new["trace"][1 - j], old["trace"][1 - j])[0]
        assert jnp.abs(new["filtered"][j]).max() > 0
    # One trace fewer per filtered unit, and no copy of the kept ones.
    assert temp < temp_full


@few
@given(seed=seeds, n_out=st.integers(1, 7))
def test_eprop_random_feedback_any_readout_width(seed, n_out):
    kappa = 0.7
    model, state = build(seed, n_out=n_out, kappa=kappa)
    xs, ys = sequence(seed, n_out=n_out)
    live(model, state, xs)
    random = etrace.EProp(feedback="random", kappa=kappa)
    rows = check(random, model, state, xs, ys, equal=False, params="linears")
    # The readout is reached without crossing a weight: its gradient stays exact.
    check(random, model, state, xs, ys, equal=True, params=("out", "readout"))
    # The matrix is frozen: the same seed gives the same gradient, another seed not.
    g1 = online(random, model, state, xs, ys)
    g2 = online(random, model, state, xs, ys)
    other = etrace.EProp(feedback=etrace.FixedRandomFeedback(seed=7), kappa=kappa)
    g3 = online(other, model, state, xs, ys)
    assert same(g1, g2)[0]
    assert not same(g1, g3, rtol=1e-3)[0]
    assert rows["linears[0].weight"][0] > 1e-3


def test_random_feedback_signal_is_the_projected_error():
    """By hand: one step, the hidden group's learning signal on its spike state is
    `B dL/dy` with `B` from `FixedRandomFeedback.matrix`."""
    model, state = build(3, n=4, n_out=3)
    xs, ys = sequence(3, T=1, n_out=3)
    fb = etrace.FixedRandomFeedback(seed=5, scale=2.0)
    learner, ts = compiled(etrace.EProp(feedback=fb), model, state, xs)

    def loss(m):
        y, _ = learner.step(m, ts, xs[0])
        return mse(y, ys[0])

    grads = eqx.filter_grad(loss)(model)
    y, new_ts = learner.step(model, ts, xs[0])
    B = fb.matrix(0, 4, 3, jnp.float64)
    signal = B @ (y - ys[0])  # dL/dy of 0.5 * sum((y - t)^2), on the spike leaf
    # D-RTRL trace of the input weight on the spike state, after one step:
    # eps_z = psi * x (membrane Df is 1 and its derivative psi).
    neuron = model.neurons[0]
    v_pre = model.linears[0](xs[0])
    psi = jax.vmap(jax.grad(lambda u: neuron.surrogate(u)))(v_pre - 0.5)
    expected = (signal * psi)[:, None] * xs[0][None, :]
    assert jnp.allclose(grads.linears[0].weight, expected, rtol=1e-12, atol=1e-14)
    assert float(jnp.abs(expected).max()) > 0


# -- OSTL -----------------------------------------------------------------------------


@few
@given(seed=seeds, neuron=neurons)
def test_ostl_feedforward_is_d_rtrl_on_one_layer(seed, neuron):
    model, state = build(seed, neuron=neuron)
    xs, ys = sequence(seed)
    live(model, state, xs)
    ok, errors = same(
        online(etrace.OSTLFeedforward(), model, state, xs, ys),
        online(etrace.D_RTRL(), model, state, xs, ys),
    )
    assert ok, errors
    check(etrace.OSTLFeedforward(), model, state, xs, ys, equal=True)


@few
@given(seed=seeds, neuron=neurons)
def test_ostl_recurrent_equals_rtrl_when_the_block_is_the_jacobian(seed, neuron):
    # One recurrent neuron (with its K states): the per-neuron block of the
    # Jacobian is the whole Jacobian.
    model, state = build(seed, n=1, neuron=neuron, recurrent=True)
    xs, ys = sequence(seed, T=12)
    live(model, state, xs)
    ok, errors = same(
        online(etrace.OSTLRecurrent(), model, state, xs, ys),
        online(etrace.RTRL(), model, state, xs, ys),
        rtol=1e-9,
    )
    assert ok, errors
    check(etrace.OSTLRecurrent(), model, state, xs, ys, equal=True)
    # Without H the recurrent weight's own path is dropped.
    check(etrace.OSTLFeedforward(), model, state, xs, ys, equal=False)


@few
@given(seed=seeds)
def test_ostl_recurrent_is_approximate_on_larger_and_deeper_networks(seed):
    model, state = build(seed, n=4, recurrent=True)
    xs, ys = sequence(seed)
    live(model, state, xs)
    check(etrace.OSTLRecurrent(), model, state, xs, ys, equal=False)
    model, state = build(seed, n=1, depth=2, recurrent=True)
    live(model, state, xs)
    check(etrace.OSTLRecurrent(), model, state, xs, ys, equal=False)


# -- OTTT -----------------------------------------------------------------------------


@few
@given(seed=seeds)
def test_ottt_a_equals_bptt_on_one_detached_lif_layer(seed):
    model, state = build(seed, reset="detached")
    xs, ys = sequence(seed)
    live(model, state, xs)
    check(etrace.OTTT(decay=LEAK), model, state, xs, ys, equal=True)
    # Negative controls: a wrong decay, the no-trace variant, a reset in the
    # gradient, and two layers.
    check(etrace.OTTT(decay=0.5), model, state, xs, ys, equal=False)
    check(etrace.OTTT(mode="O"), model, state, xs, ys, equal=False)
    soft, soft_state = build(seed, reset="soft")
    live(soft, soft_state, xs)
    check(etrace.OTTT(decay=LEAK), soft, soft_state, xs, ys, equal=False)
    deep, deep_state = build(seed, depth=2, reset="detached")
    live(deep, deep_state, xs)
    check(etrace.OTTT(decay=LEAK), deep, deep_state, xs, ys, equal=False)


def test_ottt_memory_is_the_input_size():
    model, state = build(0, n_in=3, n=5)
    learner, ts = compiled(etrace.OTTT(decay=LEAK), model, state, jnp.zeros((1, 3)))
    sizes = sorted(leaf.size for leaf in jax.tree.leaves(ts.traces))
    assert sizes == [1, 3]  # the bias's input is 1; the weight's is 3


# -- OTPE -----------------------------------------------------------------------------


@few
@given(seed=seeds, neuron=neurons)
def test_otpe_equals_ostl_on_one_hidden_layer(seed, neuron):
    model, state = build(seed, neuron=neuron)
    xs, ys = sequence(seed)
    live(model, state, xs)
    ok, errors = same(
        online(etrace.OTPE(LEAK), model, state, xs, ys),
        online(etrace.OSTLFeedforward(), model, state, xs, ys),
    )
    assert ok, errors
    # Both equal BPTT here, so zero or mis-read traces cannot pass by agreeing.
    check(etrace.OTPE(LEAK), model, state, xs, ys, equal=True)


def test_otpe_is_closer_to_bptt_than_ostl_on_two_layers():
    wins = []
    for seed in range(5):
        model, state = build(seed, n_in=4, n=6, depth=2)
        xs, ys = sequence(seed, T=16, n_in=4)
        otpe = check(etrace.OTPE(LEAK), model, state, xs, ys, equal=False)
        ostl = check(etrace.OSTLFeedforward(), model, state, xs, ys, equal=False)
        bottom = "linears[0].weight"
        assert otpe[bottom][0] > 1e-6  # it differs ...
        wins.append(otpe[bottom][1] >= ostl[bottom][1])  # ... but aligns better
        # The top layer feeds only the memoryless readout: both are exact there.
        assert otpe["linears[1].weight"][0] <= 1e-9
    assert all(wins), wins


def test_fotpe_is_exact_where_its_factors_are():
    """A leaky linear layer `y = kappa y + W x` read directly: D = kappa and Df = 1,
    so the factorised estimate (normalised output factor) is the exact trace."""

    class Leaky(eqx.Module):
        linear: eqx.nn.Linear
        cell: enn.LeakyRateReadout
        out: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jr.split(key)
            self.linear = eqx.nn.Linear(3, 4, key=k1)
            self.cell = enn.LeakyRateReadout(4, kappa=0.6)
            self.out = eqx.nn.Linear(4, 2, key=k2)

        def __call__(self, x, state):
            h, state = self.cell(self.linear(x), state)
            return self.out(h), state

    model, state = eqx.nn.make_with_state(Leaky)(jr.key(0))
    xs, ys = sequence(0)
    check(etrace.OTPE(0.6, approx=True), model, state, xs, ys, equal=True)
    check(etrace.OTPE(0.3, approx=True), model, state, xs, ys, equal=False)


def test_fotpe_differs_on_spiking_layers_and_keeps_small_traces():
    model, state = build(1, n_in=3, n=5)
    xs, ys = sequence(1)
    rows = check(etrace.OTPE(LEAK, approx=True), model, state, xs, ys, equal=False)
    assert rows["linears[0].weight"][1] > 0.5  # an approximation, not noise
    learner, ts = compiled(etrace.OTPE(LEAK, approx=True), model, state, xs)
    per_unit = [sum(a.size for a in jax.tree.leaves(t)) for t in ts.traces.values()]
    assert max(per_unit) <= 3 + 5 * 2  # I + M K, never I * M


# -- OSTTP ----------------------------------------------------------------------------


def _uses(jaxpr, var) -> int:
    return sum(1 for eqn in jaxpr.eqns for v in eqn.invars if v is var)


def _readout_weight_uses(algorithm):
    """How many equations of the whole-model gradient's jaxpr read the readout
    weight."""
    model, state = build(0, n_out=3)
    xs, ys = sequence(0, n_out=3)
    learner, ts = compiled(algorithm, model, state, xs)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    (index,) = [i for i, a in enumerate(leaves) if a is model.out.weight]

    def loss(m):
        y, _ = learner.step(m, ts, xs[0], ys[0])
        return mse(y, ys[0])

    def grads(*leaves):
        m = eqx.combine(jax.tree.unflatten(treedef, list(leaves)), static)
        return eqx.filter_grad(loss)(m)

    closed = jax.make_jaxpr(grads)(*leaves)
    return _uses(closed.jaxpr, closed.jaxpr.invars[index])


def test_osttp_never_propagates_back_through_the_readout():
    # The readout weight enters one dot_general: the forward. Its transpose (the
    # backward pass into the hidden layer) is absent; symmetric e-prop has it.
    osttp = _readout_weight_uses(etrace.OSTTP())
    assert osttp == 1, osttp
    assert _readout_weight_uses(etrace.EProp()) > osttp


def test_osttp_reads_the_target_of_every_step():
    model, state = build(2, n_out=3)
    xs, ys = sequence(2, n_out=3)
    learner, ts = compiled(etrace.OSTTP(), model, state, xs)

    @eqx.filter_jit
    def grads(model, target):
        def loss(m):
            y, _ = learner.step(m, ts, xs[0], target)
            return mse(y, target)

        return eqx.filter_grad(loss)(model)

    a = grads(model, ys[0])
    b = grads(model, 2 * ys[0])
    # Hidden gradient is linear in the target, not captured when first traced.
    assert jnp.allclose(b.linears[0].weight, 2 * a.linears[0].weight, rtol=1e-12)
    assert float(jnp.abs(a.linears[0].weight).max()) > 0
    with pytest.raises(etrace.EtraceError, match="target"):
        learner.step(model, ts, xs[0])


def test_osttp_learns_a_synthetic_task():
    """Forward-only training lowers the loss: classify which of two input channels
    carries a burst, read out by a leaky readout at every step."""
    import optax

    n_in, n, n_out, T, batch = 4, 16, 2, 12, 32
    model, state = build(0, n_in=n_in, n=n, n_out=n_out, kappa=0.8)
    learner, _ = etrace.compile(
        model, jnp.zeros(n_in), algorithm=etrace.OSTTP(), state=state
    )
    labels = jr.bernoulli(jr.key(1), 0.5, (batch,)).astype(jnp.int32)
    rate = jnp.where(jnp.arange(n_in)[None, :] % 2 == labels[:, None], 0.6, 0.1)
    xs = 2.0 * jr.bernoulli(jr.key(2), rate[None], (T, batch, n_in)).astype(float)
    targets = jnp.broadcast_to(jax.nn.one_hot(labels, n_out), (T, batch, n_out))
    opt = optax.adam(3e-2)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = opt.init(params)

    @eqx.filter_jit
    def train_step(model, opt_state):
        grads, _, losses = etrace.online_grad(
            learner, mse, model, learner.init(batch_size=batch), xs, targets
        )
        updates, opt_state = opt.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, jnp.mean(losses)

    losses = []
    for _ in range(40):
        model, opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses


# -- bad arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: etrace.EProp(feedback="mirror"), "feedback"),
        (lambda: etrace.EProp(kappa=1.5), "kappa"),
        (lambda: etrace.KappaFilter("0.5"), "kappa"),
        (lambda: etrace.OTTT(), "decay"),
        (lambda: etrace.OTTT(decay=0.5, mode="B"), "mode"),
        (lambda: etrace.OTPE(-0.1), "decay|kappa"),
        (lambda: etrace.OSTTP(feedback="random"), "FixedRandomFeedback"),
        (lambda: etrace.FixedRandomFeedback(scale=0), "scale"),
        (lambda: etrace.FixedRandomFeedback(seed=1.5), "seed"),
        (lambda: etrace.PresynapticTrace(1.0), "decay"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(etrace.EtraceError, match=match):
        make()


# -- exact_regime ---------------------------------------------------------------------


def test_exact_regime_verdicts_for_the_spiking_algorithms():
    ff, ff_state = build(0)
    rec1, rec1_state = build(0, n=1, recurrent=True)
    rec4, rec4_state = build(0, n=4, recurrent=True)
    leaky, leaky_state = build(0, kappa=0.7)
    x0 = jnp.zeros(3)

    def regime(algorithm, model, state):
        return et.exact_regime(algorithm, model, x0, state=state)

    assert regime(etrace.EProp(), ff, ff_state)
    assert regime(etrace.OSTLFeedforward(), ff, ff_state)
    assert regime(etrace.OTPE(LEAK), ff, ff_state)
    assert regime(etrace.OSTLRecurrent(), rec1, rec1_state)
    assert not regime(etrace.OSTLFeedforward(), rec1, rec1_state)
    assert not regime(etrace.OSTLRecurrent(), rec4, rec4_state)
    verdict = regime(etrace.EProp(kappa=0.7), leaky, leaky_state)
    assert not verdict and "kappa" in str(verdict)
    assert verdict.params["out.weight"]  # the readout's own weights stay exact
    verdict = regime(etrace.OSTTP(), ff, ff_state)
    assert not verdict and "target" in str(verdict)
    assert not regime(etrace.EProp(feedback="random"), ff, ff_state)


# -- batching, jit and vmap on a deep recurrent network ------------------------------


SPIKING = {
    "eprop_random": etrace.EProp(feedback="random", kappa=0.7),
    "eprop_kappa": etrace.EProp(kappa=0.7),
    "ostl_recurrent": etrace.OSTLRecurrent(),
    "ottt": etrace.OTTT(decay=LEAK),
    "otpe": etrace.OTPE(LEAK),
    "f_otpe": etrace.OTPE(LEAK, approx=True),
    "osttp": etrace.OSTTP(recurrent=True),
}


@pytest.mark.parametrize("name", list(SPIKING))
def test_vmap_equals_a_loop_and_jit_equals_eager_on_deep_recurrent_alif(name):
    model, state = build(0, n=3, depth=2, neuron="alif", recurrent=True, kappa=0.7)
    T, B = 8, 3
    xs = 2.5 * jr.normal(jr.key(5), (T, B, 3))
    ys = jr.normal(jr.key(6), (T, B, 2))
    assert et.liveness(model, xs[:, 0], state=state).live
    learner, _ = etrace.compile(model, xs[0, 0], algorithm=SPIKING[name], state=state)
    batched, _, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=B), xs, ys
    )
    loop = [
        etrace.online_grad(learner, mse, model, learner.init(), xs[:, b], ys[:, b])[0]
        for b in range(B)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / B, *loop)
    assert max(leaf_errors(batched, mean).values()) <= 1e-9
    assert float(jnp.abs(batched.linears[0].weight).max()) > 0
    jitted = eqx.filter_jit(etrace.online_grad)(
        learner, mse, model, learner.init(), xs[:, 0], ys[:, 0]
    )[0]
    assert max(leaf_errors(jitted, loop[0]).values()) <= 1e-9
