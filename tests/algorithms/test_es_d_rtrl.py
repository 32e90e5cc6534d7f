"""ES-D-RTRL (pp_prop): exact where its maths says so, its own equations elsewhere."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings

import etrace
import etrace.testing as et

from ..helpers import data, f64, leaf_errors, Leaky, mse


class Memoryless(eqx.Module):
    """The state is overwritten every step (h = tanh(W x + b)): no memory."""

    cell: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        del h
        h = jnp.tanh(self.cell(x))
        return self.readout(h), h


@settings(max_examples=3, deadline=None)
@given(
    n_in=st.integers(1, 4),
    hidden=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(2, 8),
)
def test_memoryless_layer_with_zero_decay_equals_bptt(n_in, hidden, seed, length):
    k1, k2 = jr.split(jr.key(seed))
    model = f64(
        Memoryless(
            eqx.nn.Linear(n_in, hidden, key=k1), eqx.nn.Linear(hidden, 2, key=k2)
        )
    )
    xs, ys = data(seed, length, n_in, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=jnp.zeros(hidden), algorithm=etrace.ES_D_RTRL(rank=1)
    )
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys)
    assert et.exact_regime(etrace.ES_D_RTRL(decay=0.0), learner)


def _by_hand(model, xs, ys, a, correct):
    """ES-D-RTRL for the `Leaky` family, h = sigmoid(d) h + tanh(W x) + b."""
    w, b, d = (np.asarray(p) for p in (model.w, model.b, model.a))
    wo, bo = np.asarray(model.readout.weight), np.asarray(model.readout.bias)
    decay = 1 / (1 + np.exp(-d))
    hidden, n_in = w.shape
    h = np.zeros(hidden)
    ex_w, ef_w = np.zeros(n_in), np.zeros(hidden)
    ex_b, ef_b = 0.0, np.zeros(hidden)
    ex_e, ef_e = 0.0, np.zeros(hidden)
    g = {k: 0.0 for k in ("w", "b", "a", "wo", "bo")}
    for t, (x, y) in enumerate(zip(np.asarray(xs), np.asarray(ys))):
        pre = w @ x
        h_prev = h
        h = decay * h_prev + np.tanh(pre) + b
        err = wo @ h + bo - y
        c = wo.T @ err
        D = decay
        ex_w = a * ex_w + x
        ef_w = a * D * ef_w + (1 - a) * (1 - np.tanh(pre) ** 2)
        ex_b = a * ex_b + 1.0
        ef_b = a * D * ef_b + (1 - a) * 1.0
        ex_e = a * ex_e + 1.0  # the site of `d` is the value sigmoid(d)
        ef_e = a * D * ef_e + (1 - a) * h_prev
        scale = 1 / (1 - a ** (t + 1)) if correct else 1.0
        g["w"] = g["w"] + scale * np.outer(c * ef_w, ex_w)
        g["b"] = g["b"] + scale * c * ef_b * ex_b
        g["a"] = g["a"] + scale * c * ef_e * ex_e * decay * (1 - decay)
        g["wo"] = g["wo"] + np.outer(err, h)
        g["bo"] = g["bo"] + err
    return g


@pytest.mark.parametrize("correct", [False, True])
@settings(max_examples=3, deadline=None)
@given(
    n_in=st.integers(1, 4),
    hidden=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(2, 8),
    a=st.floats(0.1, 0.9),
)
def test_equals_its_equations_by_hand(correct, n_in, hidden, seed, length, a):
    model = f64(Leaky(n_in, hidden, 2, jr.key(seed)))
    xs, ys = data(seed, length, n_in, 2)
    algorithm = etrace.ES_D_RTRL(decay=a, bias_correction=correct)
    learner, ts = etrace.compile(
        model, xs[0], state=jnp.zeros(hidden), algorithm=algorithm
    )
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    hand = _by_hand(model, xs, ys, a, correct)
    got = {
        "w": online.w,
        "b": online.b,
        "a": online.a,
        "wo": online.readout.weight,
        "bo": online.readout.bias,
    }
    for k in hand:
        assert et_rel(got[k], hand[k]) <= 1e-9, k
    # Negative controls: with history, it is neither BPTT nor D-RTRL, and the wrong
    # correction setting gives another answer.
    exact, _ = etrace.bptt_grad(mse, model, jnp.zeros(hidden), xs, ys)
    assert leaf_errors(online, exact)[".w"] > 1e-6
    other = _by_hand(model, xs, ys, a, not correct)
    assert et_rel(got["w"], other["w"]) > 1e-9


def et_rel(a, b):
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def test_exact_regime_is_not_claimed_with_memory():
    model = f64(Leaky(2, 3, 2, jr.key(0)))
    learner, _ = etrace.compile(
        model, jnp.zeros(2), state=jnp.zeros(3), algorithm=etrace.ES_D_RTRL(decay=0.5)
    )
    regime = et.exact_regime(etrace.ES_D_RTRL(decay=0.5), learner)
    assert not regime and "factorised" in str(regime)


def test_rank_and_alias():
    assert etrace.ES_D_RTRL(rank=3).decay == 0.5
    assert etrace.ES_D_RTRL(rank=1).decay == 0.0
    assert etrace.pp_prop is etrace.ES_D_RTRL


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of `decay`"),
        ({"decay": 0.5, "rank": 3}, "exactly one of `decay`"),
        ({"decay": 1.0}, r"`decay` must lie in \[0, 1\)"),
        ({"rank": 0}, "`rank` must be an int >= 1"),
        ({"rank": 2.5}, "`rank` must be an int >= 1"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(etrace.EtraceError, match=match):
        etrace.ES_D_RTRL(**kwargs)


class Cascade(eqx.Module):
    """Two states per neuron, the second fed by the first's previous value:
    u = 0.8 u + tanh(W x), v = 0.5 v + 0.7 u; the readout sees both. The group's
    `D` is lower triangular (`dv/du = 0.7`, `du/dv = 0`), so a transposed `D`
    gives another output trace."""

    w: jax.Array
    readout: eqx.nn.Linear

    def __call__(self, x, state):
        u, v = state
        u_new = 0.8 * u + jnp.tanh(self.w @ x)
        v_new = 0.5 * v + 0.7 * u
        return self.readout(jnp.concatenate([u_new, v_new])), (u_new, v_new)


def _cascade_by_hand(model, xs, ys, a, transposed=False):
    """ES-D-RTRL's gradient of `Cascade.w`, from the equations of its docstring
    (`transposed`: with `D` transposed, the negative control)."""
    w = np.asarray(model.w)
    wo, bo = np.asarray(model.readout.weight), np.asarray(model.readout.bias)
    hidden, n_in = w.shape
    d_uu, d_uv, d_vu, d_vv = 0.8, 0.0, 0.7, 0.5
    if transposed:
        d_uv, d_vu = d_vu, d_uv
    u, v = np.zeros(hidden), np.zeros(hidden)
    ex, ef_u, ef_v = np.zeros(n_in), np.zeros(hidden), np.zeros(hidden)
    grad = np.zeros_like(w)
    for x, y in zip(np.asarray(xs), np.asarray(ys)):
        pre = w @ x
        u, v = 0.8 * u + np.tanh(pre), 0.5 * v + 0.7 * u
        c = wo.T @ (wo @ np.concatenate([u, v]) + bo - y) * 2 / len(y)
        c_u, c_v = c[:hidden], c[hidden:]
        ex = a * ex + x
        # `dv/dy = 0`: the weight's output reaches `v` a step later, through `D`.
        ef_u, ef_v = (
            a * (d_uu * ef_u + d_uv * ef_v) + (1 - a) * (1 - np.tanh(pre) ** 2),
            a * (d_vu * ef_u + d_vv * ef_v),
        )
        grad = grad + np.outer(c_u * ef_u + c_v * ef_v, ex)
    return grad


@pytest.mark.parametrize("seed,a", [(0, 0.3), (1, 0.9)])
def test_two_coupled_states_equal_their_equations_by_hand(seed, a):
    hidden, n_in = 3, 2
    k1, k2 = jr.split(jr.key(seed))
    model = f64(
        Cascade(jr.normal(k1, (hidden, n_in)), eqx.nn.Linear(2 * hidden, 2, key=k2))
    )
    xs, ys = data(seed, 6, n_in, 2)
    state = (jnp.zeros(hidden), jnp.zeros(hidden))
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.ES_D_RTRL(decay=a)
    )
    (group,) = learner.graph.groups
    assert group.k == 2
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    assert et_rel(online.w, _cascade_by_hand(model, xs, ys, a)) <= 1e-9
    # Negative controls: the coupling through `D` matters, in its direction.
    wrong = _cascade_by_hand(model, xs, ys, a, transposed=True)
    assert et_rel(online.w, wrong) > 1e-6
    exact, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    assert leaf_errors(online, exact)[".w"] > 1e-6
