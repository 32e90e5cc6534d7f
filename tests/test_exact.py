"""D-RTRL against the BPTT oracle, in its exact regime and outside it."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from hypothesis import assume, given, settings

import etrace
import etrace.testing as et

from .helpers import (
    ALIFNet,
    build,
    data,
    f64,
    firing_rate,
    leaf_errors,
    Leaky,
    LIFNet,
    mse,
    per_step_grads,
    Stack,
    sweep,
    VanillaRNN,
)


EXACT = [Leaky, LIFNet, ALIFNet]
SPIKING = (LIFNet, ALIFNet, Stack)
sizes = st.integers(1, 5)


def _require(condition):
    assert condition


def _online_and_bptt(family, n_in, hidden, seed, length, check=assume, **kwargs):
    model, state = build(family, n_in, hidden, 2, seed, **kwargs)
    xs, ys = data(seed, length, n_in, 2)
    if family in SPIKING:
        rate = firing_rate(model, state, xs)
        check(0.0 < rate < 1.0)
    learner, ts = etrace.compile(model, xs[0], state=state)
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    exact, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    return model, learner, ts, xs, ys, online, exact


def _check_elementwise_recurrence(case, data):
    model, state = case.build()
    seq = data.draw(et.sequences(case, length=(2, 8)))
    assume(et.liveness(model, seq.xs, state=state).live)
    learner, ts = etrace.compile(model, case.sample_input, state=state)
    assert et.exact_regime(etrace.D_RTRL(), learner)
    et.assert_matches_bptt(learner, mse, model, ts, seq.xs, seq.targets)
    # Not vacuous: history matters here, so the same rule with its traces reset every
    # step (only the immediate term) must be wrong somewhere.
    exact, _ = etrace.bptt_grad(mse, model, state, seq.xs, seq.targets)
    truncated, _ = per_step_grads(
        learner, mse, model, ts, seq.xs, seq.targets, reset_traces=True
    )
    assert max(leaf_errors(truncated, exact).values()) > 1e-6


(
    test_d_rtrl_equals_bptt_elementwise_recurrence,
    test_d_rtrl_equals_bptt_elementwise_recurrence_sweep,
) = sweep(
    3,
    40,
    case=et.model_families(("leaky", "lif", "alif"), inputs=(1, 5), hidden=(1, 5)),
    data=st.data(),
)(_check_elementwise_recurrence)


def test_d_rtrl_equals_bptt_with_custom_vjp_surrogate():
    model, learner, ts, xs, ys, online, exact = _online_and_bptt(
        LIFNet, 3, 5, 7, 10, check=_require, use_vjp=True
    )
    assert max(leaf_errors(online, exact).values()) <= 1e-9
    # The surrogate is what the gradients use: the true derivative of a step is 0.
    leaves = jtu.tree_leaves(eqx.filter(online.lif, eqx.is_array))
    assert max(float(jnp.max(jnp.abs(x))) for x in leaves) > 0


small = dict(
    n_in=sizes,
    hidden=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(3, 8),
)


def _check_two_layer_stack(n_in, hidden, seed, length):
    model, state = build(Stack, n_in, hidden, 2, seed)
    xs, ys = data(seed, length, n_in, 2)
    assume(et.liveness(model, xs, state=state).live)
    learner, ts = etrace.compile(model, xs[0], state=state)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert not regime and regime.params["l2.linear.weight"]
    assert not regime.params["l1.linear.weight"]
    rows = et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params=["l2", "readout"]
    )
    # The bottom layer's signal misses the top layer's memory: it must differ
    # whenever BPTT's bottom gradient is not zero.
    assume(rows["l1.linear.weight"][3] > 1e-8)
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params="l1")


(
    test_two_layer_stack_top_exact_bottom_differs,
    test_two_layer_stack_top_exact_bottom_differs_sweep,
) = sweep(3, 40, **small)(_check_two_layer_stack)


def _check_vanilla_rnn(n_in, hidden, seed, length):
    model, state = build(VanillaRNN, n_in, hidden, 2, seed)
    xs, ys = data(seed, length, n_in, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    assert not et.exact_regime(etrace.D_RTRL(), learner)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, params="readout")
    et.assert_differs_from_bptt(
        learner, mse, model, ts, xs, ys, params="rec", rtol=1e-4
    )


(
    test_vanilla_rnn_with_recurrent_weight_differs,
    test_vanilla_rnn_with_recurrent_weight_differs_sweep,
) = sweep(3, 40, **small)(_check_vanilla_rnn)


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(
    family=st.sampled_from(EXACT),
    n_in=st.integers(1, 12),
    hidden=st.integers(1, 24),
    seed=st.integers(0, 10_000),
    length=st.integers(2, 40),
)
def test_d_rtrl_equals_bptt_sweep(family, n_in, hidden, seed, length):
    _, _, _, _, _, online, exact = _online_and_bptt(family, n_in, hidden, seed, length)
    assert max(leaf_errors(online, exact).values()) <= 1e-9


class SharedWeight(eqx.Module):
    """One weight op feeds two hidden populations.

    With `split=False` the whole output drives both populations (they share neuron
    positions, so they form one group of two states); with `split=True` its halves
    drive two separate groups (one site, two units).
    """

    w: eqx.nn.Linear
    decay: jax.Array
    readout: eqx.nn.Linear
    split: bool = eqx.field(static=True)

    def __call__(self, x, state):
        h1, h2 = state
        y = self.w(x)
        a, b = (y[: h1.size], y[h1.size :]) if self.split else (y, y)
        h1 = jax.nn.sigmoid(self.decay[: h1.size]) * h1 + a
        h2 = 0.8 * h2 + jnp.tanh(b)
        return self.readout(jnp.concatenate([h1, h2])), (h1, h2)


@pytest.mark.parametrize("split", [False, True])
def test_one_weight_op_feeding_two_groups(split):
    hidden = 3
    out = 2 * hidden if split else hidden
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    model = f64(
        SharedWeight(
            eqx.nn.Linear(2, out, key=k1),
            jax.random.normal(k2, (hidden,)),
            eqx.nn.Linear(2 * hidden, 2, key=k3),
            split,
        )
    )
    state = (jnp.zeros(hidden), jnp.zeros(hidden))
    learner, ts = etrace.compile(model, jnp.zeros(2), state=state)
    assert len(learner.graph.groups) == (2 if split else 1)
    w_units = [u for u in learner.graph.units if u.site.name == "w.weight @ x"]
    assert len(w_units) == (2 if split else 1)
    xs, ys = data(3, 6, 2, 2)
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    exact, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    assert max(leaf_errors(online, exact).values()) <= 1e-9


def test_group_and_unit_order_is_deterministic():
    model, state = build(Stack, 3, 4, 2, seed=0)
    names = []
    for _ in range(2):
        learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
        names.append([u.name for u in learner.graph.units])
    assert names[0] == names[1]
    groups = [n.split(" -> ")[1] for n in names[0]]
    assert groups == sorted(groups) and len(names[0]) == 8
