"""`etrace.RFLO`: the leak-only eligibility trace with random feedback of the
output error, checked against Murray's update equations written out by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import etrace

from ..helpers import leaf_errors, mse


RTOL = 1e-9
T, N, N_IN, N_OUT = 10, 5, 3, 2
TAU = 4.0


class RateRNN(eqx.Module):
    """Murray's network: `h = (1 - 1/tau) h + (1/tau) tanh(W_rec h + W_in x)`,
    `y = W_out h`; with `self_coupling`, each neuron also reads its own previous
    value inside the nonlinearity, so the diagonal Jacobian is more than the
    leak."""

    w_in: jax.Array
    w_rec: jax.Array
    w_out: jax.Array
    s: jax.Array | None = None

    def __call__(self, x, h):
        u = self.w_rec @ h + self.w_in @ x
        if self.s is not None:
            u = u + self.s * h
        h = (1 - 1 / TAU) * h + (1 / TAU) * jnp.tanh(u)
        return self.w_out @ h, h


def _model(self_coupling=False):
    k = jr.split(jr.key(0), 4)
    return RateRNN(
        jr.normal(k[0], (N, N_IN)),
        jr.normal(k[1], (N, N)) / np.sqrt(N),
        jr.normal(k[2], (N_OUT, N)),
        2.0 * jr.normal(k[3], (N,)) if self_coupling else None,
    )


def _data():
    k1, k2 = jr.split(jr.key(1))
    return 1.5 * jr.normal(k1, (T, N_IN)), jr.normal(k2, (T, N_OUT))


def _by_hand(model, xs, ys, feedback):
    """Murray's eqs. 12-15 with etrace's loss `0.5 |y - y*|^2` per step: `p =
    (1 - 1/tau) p + (1/tau) phi'(u) r` for each weight's inputs `r` (the previous
    state, or the input), and `grad = (B (y - y*)) p`, summed over steps."""
    B = np.asarray(feedback.matrix(0, N, N_OUT, jnp.float64))
    w_in, w_rec, w_out = (np.asarray(a) for a in (model.w_in, model.w_rec, model.w_out))
    leak = 1 - 1 / TAU
    h = np.zeros(N)
    p_in, p_rec = np.zeros((N, N_IN)), np.zeros((N, N))
    g_in, g_rec = np.zeros((N, N_IN)), np.zeros((N, N))
    for x, y_star in zip(np.asarray(xs), np.asarray(ys)):
        u = w_rec @ h + w_in @ x
        slope = (1 - np.tanh(u) ** 2) / TAU
        p_in = leak * p_in + slope[:, None] * x[None, :]
        p_rec = leak * p_rec + slope[:, None] * h[None, :]
        h = leak * h + np.tanh(u) / TAU
        signal = B @ (w_out @ h - y_star)
        g_in += signal[:, None] * p_in
        g_rec += signal[:, None] * p_rec
    return g_in, g_rec


def _grads(model, algorithm, xs, ys):
    learner, ts = etrace.compile(model, xs[0], state=jnp.zeros(N), algorithm=algorithm)
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    return grads


def test_equals_murrays_equations():
    model = _model()
    xs, ys = _data()
    feedback = etrace.FixedRandomFeedback(seed=3)
    grads = _grads(model, etrace.RFLO(TAU, feedback), xs, ys)
    g_in, g_rec = _by_hand(model, xs, ys, feedback)
    np.testing.assert_allclose(grads.w_in, g_in, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(grads.w_rec, g_rec, rtol=RTOL, atol=1e-12)
    assert np.abs(g_rec).max() > 1e-3  # not vacuous
    # The readout gets its ordinary gradient, BPTT's.
    bptt, _ = etrace.bptt_grad(mse, model, jnp.zeros(N), xs, ys)
    assert leaf_errors(grads.w_out, bptt.w_out)[""] <= RTOL
    # Negative control: another feedback matrix gives another gradient.
    other = _grads(model, etrace.RFLO(TAU, etrace.FixedRandomFeedback(seed=4)), xs, ys)
    assert leaf_errors(other.w_rec, grads.w_rec)[""] > 0.1


def test_is_random_e_prop_where_the_leak_is_all_of_D_and_differs_elsewhere():
    xs, ys = _data()
    feedback = etrace.FixedRandomFeedback(seed=3)
    model = _model()
    rflo = _grads(model, etrace.RFLO(TAU, feedback), xs, ys)
    eprop = _grads(model, etrace.EProp(feedback=feedback), xs, ys)
    assert max(leaf_errors(rflo, eprop).values()) <= RTOL
    # Each neuron reads itself inside the nonlinearity: D is more than the leak,
    # which RFLO keeps alone.
    coupled = _model(self_coupling=True)
    rflo = _grads(coupled, etrace.RFLO(TAU, feedback), xs, ys)
    eprop = _grads(coupled, etrace.EProp(feedback=feedback), xs, ys)
    assert leaf_errors(rflo.w_in, eprop.w_in)[""] > 1e-2


def test_symmetric_feedback_and_errors():
    model = _model()
    xs, ys = _data()
    symmetric = _grads(model, etrace.RFLO(TAU, "symmetric"), xs, ys)
    d_rtrl = _grads(model, etrace.D_RTRL(), xs, ys)
    # On Murray's network the trace is D-RTRL's; with the true signal, so is all.
    assert max(leaf_errors(symmetric, d_rtrl).values()) <= RTOL
    for tau in (0.5, True, "4"):
        with pytest.raises(etrace.EtraceError, match="`tau` must be a number"):
            etrace.RFLO(tau)
    with pytest.raises(etrace.EtraceError, match="`feedback` must be"):
        etrace.RFLO(TAU, feedback="mirror")
