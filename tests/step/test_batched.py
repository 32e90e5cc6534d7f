"""`learner.step` on a batched trace state: its read-out sums over the batch
itself, and its gradients and traces equal those of `jax.vmap(learner.step)` and
of `etrace.online_grad`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import etrace
import etrace.nn as enn
import etrace.testing as et
from etrace._algorithm.diagonal.turned import is_turned
from etrace._step import hooks

from ..helpers import leaf_errors, mse


B, T = 3, 4
RTOL = 1e-10


class RecurrentLIF(eqx.Module):
    """Input and its own previous spikes through one linear map into LIF neurons."""

    synapses: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2 = jr.split(key)
        self.synapses = eqx.nn.Linear(n_in + hidden, hidden, key=k1)
        self.lif = enn.LIF(hidden, tau=3.0, threshold=0.3)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)

    def __call__(self, x, state):
        current = self.synapses(jnp.concatenate([x, self.lif.spikes(state)]))
        z, state = self.lif(current, state)
        return self.readout(z), state


def _model(family):
    if family == "lif":
        return eqx.nn.make_with_state(RecurrentLIF)(3, 5, 2, jr.key(0))
    return et.build(family, 3, 5, 2, seed=0)


ALGORITHMS = {
    "d_rtrl": etrace.D_RTRL(),
    "es_d_rtrl": etrace.ES_D_RTRL(decay=0.6, bias_correction=True),
    "eprop": etrace.EProp(feedback="random"),
    "rtrl": etrace.RTRL(),
    "osttp": etrace.OSTTP(recurrent=True),
}


def _data(seed=1):
    xs = 2.0 * jr.normal(jr.key(seed), (T, B, 3))
    ys = jr.normal(jr.key(seed + 1), (T, B, 2))
    return xs, ys


def _run(learner, model, xs, ys, step):
    """Per-step gradients of the batch-mean loss, summed over the sequence, and
    the final trace state; `step(model, ts, x, target)` runs one batched step."""
    projects = learner.algorithm.learning_signal == "target_feedback"

    def loss(model, ts, x, y):
        # OSTTP's signal is linear in the target: weighted like the batch mean.
        out, ts = step(model, ts, x, y / B if projects else None)
        return jnp.mean(jax.vmap(mse)(out, y)), ts

    grad = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))
    ts, total = learner.init(batch_size=B), None
    for x, y in zip(xs, ys):
        g, ts = grad(model, ts, x, y)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total, ts


def _batched(learner):
    return lambda model, ts, x, target: learner.step(model, ts, x, target)


def _vmapped(learner):
    def step(model, ts, x, target):
        axes = (None, 0, 0, None if target is None else 0)
        return jax.vmap(learner.step, in_axes=axes)(model, ts, x, target)

    return step


def _worst(a, b):
    return max(leaf_errors(a, b).values())


@pytest.mark.parametrize("family", ["gru", "lstm", "lif"])
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_batched_step_equals_vmapped_step_and_online_grad(family, name):
    model, state = _model(family)
    xs, ys = _data()
    if family == "lif":
        assert 0 < _rate(model, state, xs) < 1
    learner, _ = etrace.compile(
        model, xs[0, 0], state=state, algorithm=ALGORITHMS[name]
    )
    grads, ts = _run(learner, model, xs, ys, _batched(learner))
    looped, ts_loop = _run(learner, model, xs, ys, _vmapped(learner))
    online, ts_online, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=B), xs, ys
    )
    assert _worst(grads, looped) <= RTOL and _worst(grads, online) <= RTOL
    assert _worst(ts, ts_loop) <= RTOL and _worst(ts, ts_online) <= RTOL
    # Not vacuous: every parameter has a gradient, the traces are not zero.
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    assert max(float(jnp.abs(t).max()) for t in jax.tree.leaves(ts.traces)) > 0


class InOutCell(eqx.Module):
    """A tanh cell whose weights are stored `(in, out)` and applied as `x @ W`,
    the layout in which an outer-product read-out forms its product turned and
    D-RTRL stores its traces turned; with `diagonal`, an element-wise recurrence
    (D-RTRL is then exact)."""

    w: jax.Array
    u: jax.Array
    readout: eqx.nn.Linear
    diagonal: bool = eqx.field(static=True)

    def __init__(self, n_in, hidden, n_out, key, diagonal=False):
        k1, k2, k3 = jr.split(key, 3)
        self.w = jr.normal(k1, (n_in, hidden)) / n_in**0.5
        shape = (hidden,) if diagonal else (hidden, hidden)
        self.u = 0.5 * jr.normal(k2, shape) / (1 if diagonal else hidden**0.5)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k3)
        self.diagonal = diagonal

    def __call__(self, x, h):
        recurrent = self.u * h if self.diagonal else h @ self.u
        h = jnp.tanh(x @ self.w + recurrent)
        return self.readout(h), h


IN_OUT_HIDDEN = 16  # D-RTRL stores an `(in, out)` weight's traces turned from 16


@pytest.mark.parametrize(
    "algorithm",
    [etrace.ES_D_RTRL(decay=0.6), etrace.OTTT(decay=0.7), etrace.D_RTRL()],
    ids=["es_d_rtrl", "ottt", "d_rtrl"],
)
def test_weights_stored_in_out(algorithm):
    # A weight stored `(in, out)` gets its summed gradient formed in its own
    # layout (turned): the batched step still equals the vmapped one and
    # online_grad.
    model = InOutCell(3, IN_OUT_HIDDEN, 2, jr.key(3), diagonal=True)
    state = jnp.zeros(IN_OUT_HIDDEN)
    xs, ys = _data()
    learner, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=algorithm)
    units = [u for u in learner.graph.units if u.site.kind == "matrix"]
    assert {u.site.w_perm for u in units} == {(1, 0)}
    if isinstance(algorithm, etrace.D_RTRL):
        traces = learner.init().traces
        assert all(is_turned(u, traces[u.name]) for u in units)
    grads, ts = _run(learner, model, xs, ys, _batched(learner))
    looped, ts_loop = _run(learner, model, xs, ys, _vmapped(learner))
    online, _, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=B), xs, ys
    )
    assert _worst(grads, looped) <= RTOL and _worst(grads, online) <= RTOL
    assert _worst(ts, ts_loop) <= RTOL
    assert float(jnp.abs(grads.w).min()) > 0 and float(jnp.abs(grads.u).max()) > 0
    # A negative control: the rows of `w`'s gradient out of order fail it.
    assert _worst(grads, eqx.tree_at(lambda g: g.w, looped, looped.w[::-1])) > 1e-3


def test_d_rtrl_exact_with_turned_in_out_traces():
    # An element-wise recurrence with its input weight stored `(in, out)`: D-RTRL,
    # with that weight's traces stored turned, equals BPTT for every parameter;
    # with the recurrence made dense it does not (the negative control). Float64
    # (tests/conftest.py).
    xs, ys = _data()
    for diagonal, check in [
        (True, et.assert_matches_bptt),
        (False, et.assert_differs_from_bptt),
    ]:
        model = InOutCell(3, IN_OUT_HIDDEN, 2, jr.key(4), diagonal)
        state = jnp.zeros(IN_OUT_HIDDEN)
        learner, _ = etrace.compile(model, xs[0, 0], state=state)
        (unit,) = [u for u in learner.graph.units if u.name.startswith("w @")]
        # (The dense recurrence reaches the state only through `u`: no trace.)
        assert is_turned(unit, learner.init().traces[unit.name]) is diagonal
        assert xs.dtype == jnp.float64 and model.w.dtype == jnp.float64
        check(learner, mse, model, learner.init(batch_size=B), xs, ys)


def _rate(model, state, xs):
    def body(s, x):
        _, s = model(x, s)
        return s, model.lif.spikes(s)

    _, z = jax.lax.scan(body, state, xs.reshape(-1, xs.shape[-1]))
    return float(jnp.mean(z))


@pytest.mark.parametrize("fault", ["twice", "no_mean"])
def test_a_wrong_batch_sum_is_caught(fault, monkeypatch):
    # The comparison above is sharp: a read-out that sums over the batch twice
    # (here, B times the sum) or forgets the mean must fail it.
    model, state = _model("gru")
    xs, ys = _data()
    learner, _ = etrace.compile(model, xs[0, 0], state=state)
    looped, _ = _run(learner, model, xs, ys, _vmapped(learner))
    summed = hooks.summed_over_batch

    def faulty(read_out, batch_read_out, on):
        def wrong(*args):
            out = batch_read_out(*args)
            scale = B if fault == "twice" else 1.0 / B
            return [o * scale for o in out]

        return summed(read_out, wrong, on)

    monkeypatch.setattr(hooks, "summed_over_batch", faulty)
    monkeypatch.setattr(etrace._step.group, "summed_over_batch", faulty)
    grads, _ = _run(learner, model, xs, ys, _batched(learner))
    assert _worst(grads.cell, looped.cell) > 0.5
    # The readout's gradient is ordinary autodiff, untouched by the read-out.
    assert _worst(grads.readout, looped.readout) <= RTOL


def test_any_loss_of_the_batch():
    # The parameters are shared by the batch, so their gradient is the sum of the
    # examples' parts whatever the loss: one that couples the examples (a softmax
    # over the batch, a maximum) gives the gradient autodiff gives through the
    # per-example read-outs of `vmap(step)`.
    model, state = _model("gru")
    xs, ys = _data()
    learner, _ = etrace.compile(model, xs[0, 0], state=state)

    def coupled(step):
        def loss(model, ts, x, y):
            out, ts = step(model, ts, x, None)
            errors = jax.vmap(mse)(out, y)
            return jnp.sum(jax.nn.softmax(errors) * errors) + jnp.max(out), ts

        return eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))

    ts_a = ts_b = learner.init(batch_size=B)
    for x, y in zip(xs, ys):
        a, ts_a = coupled(_batched(learner))(model, ts_a, x, y)
        b, ts_b = coupled(_vmapped(learner))(model, ts_b, x, y)
        assert _worst(a, b) <= RTOL
    assert float(jnp.abs(a.cell.weight_hh).max()) > 0


def test_per_example_gradients_of_the_batched_step():
    # `jax.jacrev` of the batch's losses gives each example's own online gradient.
    model, state = _model("gru")
    xs, ys = _data()
    learner, _ = etrace.compile(model, xs[0, 0], state=state)
    ts = learner.init(batch_size=B)
    for x, y in zip(xs[:-1], ys[:-1]):
        _, ts = learner.step(model, ts, x)

    def losses(model):
        out, _ = learner.step(model, ts, xs[-1])
        return jax.vmap(mse)(out, ys[-1])

    per_example = eqx.filter_jacrev(losses)(model)

    def one(model, ts, x, y):
        out, _ = learner.step(model, ts, x)
        return mse(out, y)

    grad_one = eqx.filter_grad(one)
    for b in range(B):
        ts_b = jax.tree.map(lambda a: a[b], ts)
        want = grad_one(model, ts_b, xs[-1, b], ys[-1, b])
        got = jax.tree.map(lambda g: g[b], per_example)
        assert _worst(got, want) <= RTOL


def test_unbatched_use_and_errors():
    model, state = _model("gru")
    xs, ys = _data()
    learner, ts = etrace.compile(model, xs[0, 0], state=state)
    y, ts = learner.step(model, ts, xs[0, 0])  # unbatched, as before
    assert y.shape == (2,)
    batched = learner.init(batch_size=B)
    y, _ = learner.step(model, batched, xs[0])
    assert y.shape == (B, 2)
    with pytest.raises(etrace.EtraceError, match=r"batch size 3.*`x` has shape \(3,\)"):
        learner.step(model, batched, xs[0, 0])
    with pytest.raises(
        etrace.EtraceError, match=r"batch size 3.*`x` has shape \(2, 3\)"
    ):
        learner.step(model, batched, xs[0, :2])
    osttp, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=etrace.OSTTP())
    with pytest.raises(etrace.EtraceError, match=r"`target` has shape \(2,\)"):
        osttp.step(model, osttp.init(batch_size=B), xs[0], ys[0, 0])
