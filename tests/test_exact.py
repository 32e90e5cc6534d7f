"""D-RTRL against the BPTT oracle, in its exact regime and outside it."""

import equinox as eqx
import hypothesis.strategies as st
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from hypothesis import assume, given, settings

import etrace

from .helpers import (
    ALIFNet,
    build,
    data,
    firing_rate,
    leaf_errors,
    Leaky,
    LIFNet,
    mse,
    per_step_grads,
    Stack,
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


@settings(max_examples=8, deadline=None)
@given(
    family=st.sampled_from(EXACT),
    n_in=sizes,
    hidden=sizes,
    seed=st.integers(0, 10_000),
    length=st.integers(2, 8),
)
def test_d_rtrl_equals_bptt_elementwise_recurrence(family, n_in, hidden, seed, length):
    model, learner, ts, xs, ys, online, exact = _online_and_bptt(
        family, n_in, hidden, seed, length
    )
    errors = leaf_errors(online, exact)
    assert max(errors.values()) <= 1e-9, errors
    # Not vacuous: history matters here, so the same rule with its traces reset every
    # step (only the immediate term) must be wrong somewhere.
    truncated, _ = per_step_grads(learner, mse, model, ts, xs, ys, reset_traces=True)
    assert max(leaf_errors(truncated, exact).values()) > 1e-6


def test_d_rtrl_equals_bptt_with_custom_vjp_surrogate():
    model, learner, ts, xs, ys, online, exact = _online_and_bptt(
        LIFNet, 3, 5, 7, 10, check=_require, use_vjp=True
    )
    assert max(leaf_errors(online, exact).values()) <= 1e-9
    # The surrogate is what the gradients use: the true derivative of a step is 0.
    leaves = jtu.tree_leaves(eqx.filter(online.lif, eqx.is_array))
    assert max(float(jnp.max(jnp.abs(x))) for x in leaves) > 0


@settings(max_examples=8, deadline=None)
@given(
    n_in=sizes,
    hidden=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(3, 8),
)
def test_two_layer_stack_top_exact_bottom_differs(n_in, hidden, seed, length):
    model, _, _, _, _, online, exact = _online_and_bptt(
        Stack, n_in, hidden, seed, length
    )
    top = leaf_errors((online.l2, online.readout), (exact.l2, exact.readout))
    assert max(top.values()) <= 1e-9, top
    bottom = leaf_errors(online.l1, exact.l1)
    # The bottom layer's signal misses the top layer's memory: it must differ
    # whenever BPTT's bottom gradient is not zero.
    assume(max(float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(exact.l1)) > 1e-8)
    assert max(bottom.values()) > 1e-6, bottom


@settings(max_examples=8, deadline=None)
@given(
    n_in=sizes,
    hidden=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(3, 8),
)
def test_vanilla_rnn_with_recurrent_weight_differs(n_in, hidden, seed, length):
    _, _, _, _, _, online, exact = _online_and_bptt(
        VanillaRNN, n_in, hidden, seed, length
    )
    errors = leaf_errors(online, exact)
    assert errors[".readout.weight"] <= 1e-9
    assert errors[".rec.weight"] > 1e-4, errors


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
