"""`etrace.ThreeFactor`: D-RTRL's traces read out with a modulator in place of the
loss's gradient; checked against its equations written out by hand."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import etrace
from etrace.testing._families import spike

from ..helpers import leaf_errors, mse


RTOL = 1e-9
T, N, N_IN, N_OUT = 12, 4, 3, 2


class Leaky(eqx.Module):
    """`h = a * h + W x + b`, read out linearly."""

    w: jax.Array
    b: jax.Array
    a: jax.Array
    readout: jax.Array

    def __call__(self, x, h):
        h = self.a * h + self.w @ x + self.b
        return self.readout @ h, h


class HandLIF(eqx.Module):
    """`v = lam v + W x - theta z_prev`, `z = spike(v - theta)`: the previous
    spike resets the membrane softly, so both states keep a trace."""

    w: jax.Array
    readout: jax.Array
    lam: float = eqx.field(static=True)
    theta: float = eqx.field(static=True)

    def __call__(self, x, state):
        v, z = state
        v = self.lam * v + self.w @ x - self.theta * z
        z = spike(v - self.theta)
        return self.readout @ z, (v, z)


def _leaky():
    k = jr.split(jr.key(0), 4)
    model = Leaky(
        jr.normal(k[0], (N, N_IN)),
        jr.normal(k[1], (N,)),
        jax.nn.sigmoid(jr.normal(k[2], (N,))),
        jr.normal(k[3], (N_OUT, N)),
    )
    return model, jnp.zeros(N)


def _lif():
    k = jr.split(jr.key(1), 2)
    model = HandLIF(jr.normal(k[0], (N, N_IN)), jr.normal(k[1], (N_OUT, N)), 0.8, 0.5)
    return model, (jnp.zeros(N), jnp.zeros(N))


def _data(seed=2, batch=()):
    k = jr.split(jr.key(seed), 3)
    xs = 1.5 * jr.normal(k[0], (T, *batch, N_IN))
    ys = jr.normal(k[1], (T, *batch, N_OUT))
    ms = jr.normal(k[2], (T, *batch, N))
    return xs, ys, ms


def _online(model, state, xs, ys, ms, **kwargs):
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.ThreeFactor()
    )
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, modulators=ms)
    return grads


def _leaky_by_hand(model, xs, ms):
    """`eps = a eps + Df x` for `w`, `b` (x = 1) and `a` (Df = h_prev); the
    gradient is the modulator times the trace, summed over time."""
    a = np.asarray(model.a)
    h = np.zeros(N)
    e_w, e_b, e_a = np.zeros((N, N_IN)), np.zeros(N), np.zeros(N)
    g_w, g_b, g_a = np.zeros((N, N_IN)), np.zeros(N), np.zeros(N)
    for x, m in zip(np.asarray(xs), np.asarray(ms)):
        e_w = a[:, None] * e_w + x[None, :]
        e_b = a * e_b + 1.0
        e_a = a * e_a + h
        h = a * h + np.asarray(model.w) @ x + np.asarray(model.b)
        g_w += m[:, None] * e_w
        g_b += m * e_b
        g_a += m * e_a
    return g_w, g_b, g_a


def _lif_by_hand(model, xs, ms):
    """Both states' traces: `eps_v = lam eps_v - theta eps_z + x`,
    `eps_z = psi eps_v` with `psi` the surrogate's slope at the new membrane;
    the gradient is `m (eps_v + eps_z)`, summed over time."""
    w = np.asarray(model.w)
    v, z = np.zeros(N), np.zeros(N)
    e_v, e_z, g = np.zeros((N, N_IN)), np.zeros((N, N_IN)), np.zeros((N, N_IN))
    spikes = []
    for x, m in zip(np.asarray(xs), np.asarray(ms)):
        v = model.lam * v + w @ x - model.theta * z
        psi = 1.0 / (1.0 + 4.0 * np.abs(v - model.theta)) ** 2
        z = (v > model.theta).astype(float)
        e_v = model.lam * e_v - model.theta * e_z + x[None, :]
        e_z = psi[:, None] * e_v
        g += m[:, None] * (e_v + e_z)
        spikes.append(z)
    return g, float(np.mean(spikes))


def test_equals_its_equations_on_a_leaky_layer():
    model, state = _leaky()
    xs, ys, ms = _data()
    grads = _online(model, state, xs, ys, ms)
    for got, want in zip((grads.w, grads.b, grads.a), _leaky_by_hand(model, xs, ms)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-12)
        assert np.abs(want).max() > 1e-3  # not vacuous
    # The readout has no trace: its ordinary gradient, BPTT's.
    bptt, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    assert leaf_errors(grads.readout, bptt.readout)[""] <= RTOL
    # Negative control: the loss's gradient gives something else (D-RTRL).
    learner, ts = etrace.compile(model, xs[0], state=state)
    d_rtrl, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    assert leaf_errors(d_rtrl.w, grads.w)[""] > 0.1


def test_equals_its_equations_on_a_lif_layer():
    model, state = _lif()
    xs, ys, ms = _data()
    want, rate = _lif_by_hand(model, xs, ms)
    assert 0 < rate < 1  # the network spikes, and not always
    grads = _online(model, state, xs, ys, ms)
    np.testing.assert_allclose(grads.w, want, rtol=RTOL, atol=1e-12)
    assert np.abs(want).max() > 1e-3
    # Negative control: the spike's trace left out differs.
    without_spike = _lif_by_hand_without_spike(model, xs, ms)
    assert np.abs(without_spike - want).max() > 1e-3


def _lif_by_hand_without_spike(model, xs, ms):
    w = np.asarray(model.w)
    v, z = np.zeros(N), np.zeros(N)
    e_v, g = np.zeros((N, N_IN)), np.zeros((N, N_IN))
    for x, m in zip(np.asarray(xs), np.asarray(ms)):
        v = model.lam * v + w @ x - model.theta * z
        z = (v > model.theta).astype(float)
        e_v = model.lam * e_v + x[None, :]
        g += m[:, None] * e_v
    return g


def test_linear_in_the_modulator_and_zero_without_it():
    model, state = _lif()
    xs, ys, ms = _data()
    _, _, other = _data(seed=7)
    one = _online(model, state, xs, ys, ms)
    two = _online(model, state, xs, ys, other)
    both = _online(model, state, xs, ys, ms + 2.0 * other)
    np.testing.assert_allclose(both.w, one.w + 2.0 * two.w, rtol=1e-9, atol=1e-12)
    zero = _online(model, state, xs, ys, jnp.zeros_like(ms))
    assert float(jnp.abs(zero.w).max()) == 0.0
    # The readout's gradient comes from the loss, whatever the modulator.
    assert float(jnp.abs(zero.readout).max()) > 0
    assert leaf_errors(zero.readout, one.readout)[""] <= RTOL


def test_scalar_dict_and_per_neuron_modulators():
    model, state = _leaky()
    xs, ys, ms = _data()
    scalars = ms[:, 0]
    a = _online(model, state, xs, ys, scalars)
    b = _online(model, state, xs, ys, jnp.broadcast_to(scalars[:, None], ms.shape))
    c = _online(model, state, xs, ys, {"state": scalars})
    assert max(leaf_errors(a, b).values()) <= RTOL
    assert max(leaf_errors(a, c).values()) <= RTOL


def test_batched_step_vmap_and_jit():
    model, state = _lif()
    xs, ys, ms = _data(batch=(3,))
    learner, _ = etrace.compile(
        model, xs[0, 0], state=state, algorithm=etrace.ThreeFactor()
    )
    ts = learner.init(batch_size=3)
    batched, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, modulators=ms)
    per_example = [
        _online(model, state, xs[:, b], ys[:, b], ms[:, b]) for b in range(3)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *per_example)
    assert max(leaf_errors(batched, mean).values()) <= RTOL

    @eqx.filter_jit
    @eqx.filter_grad(has_aux=True)
    def grad_of_step(model, ts, x, y, m, vmapped):
        if vmapped:
            out, ts = jax.vmap(lambda t, x, m: learner.step(model, t, x, modulator=m))(
                ts, x, m
            )
        else:
            out, ts = learner.step(model, ts, x, modulator=m)
        return jnp.mean(jax.vmap(mse)(out, y)), ts

    g1, ts1 = grad_of_step(model, ts, xs[0], ys[0], ms[0] / 3, False)
    g2, ts2 = grad_of_step(model, ts, xs[0], ys[0], ms[0] / 3, True)
    assert max(leaf_errors(g1, g2).values()) <= RTOL
    assert max(leaf_errors(ts1, ts2).values()) <= RTOL


def test_errors():
    model, state = _leaky()
    xs, ys, ms = _data()
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.ThreeFactor()
    )
    with pytest.raises(etrace.EtraceError, match="ThreeFactor takes its learning"):
        learner.step(model, ts, xs[0])
    with pytest.raises(etrace.EtraceError, match=r"group `state` has shape \(3,\)"):
        learner.step(model, ts, xs[0], modulator=jnp.ones(3))
    with pytest.raises(etrace.EtraceError, match="`h` is not a group"):
        learner.step(model, ts, xs[0], modulator={"h": 1.0})
    with pytest.raises(etrace.EtraceError, match="takes a modulator learning signal"):
        etrace.online_grad(learner, mse, model, ts, xs, ys, modulators=ms, chunk=4)
    with pytest.raises(etrace.EtraceError, match=r"modulators` has shape \(5, 4\)"):
        etrace.online_grad(learner, mse, model, ts, xs, ys, modulators=ms[:5])
    d_rtrl, ts = etrace.compile(model, xs[0], state=state)
    with pytest.raises(etrace.EtraceError, match="not from a modulator"):
        d_rtrl.step(model, ts, xs[0], modulator=1.0)
