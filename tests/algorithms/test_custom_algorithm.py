"""Custom algorithms: wrapping a shipped one, and subclassing it."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import etrace
import etrace.testing as et

from ..helpers import data, leaf_errors, mse
from ..test_examples import _load


@pytest.fixture(scope="module")
def wrappers():
    return _load("examples/custom_algorithm.py")


def _run(algorithm, length=8):
    model, state = et.build("gru", 3, 4, 2, 0)
    xs, ys = data(0, length, 3, 2, scale=2.0)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    return learner, model, ts, xs, ys, grads


def test_clip_traces_bounds_every_trace(wrappers):
    *_, plain = _run(etrace.D_RTRL())
    _, _, ts, _, _, clipped = _run(wrappers.ClipTraces(etrace.D_RTRL(), 0.01))
    leaves = jax.tree.leaves(ts.traces)
    assert max(float(jnp.max(jnp.abs(t))) for t in leaves) <= 0.01
    assert max(leaf_errors(clipped, plain).values()) > 1e-3
    # A bound that is never reached changes nothing.
    *_, loose = _run(wrappers.ClipTraces(etrace.D_RTRL(), 1e9))
    assert max(leaf_errors(loose, plain).values()) <= 1e-12


def test_clip_grad_norm_bounds_each_read_out(wrappers):
    algorithm = wrappers.ClipGradNorm(etrace.D_RTRL(), 1e-3)
    learner, model, ts, xs, ys, _ = _run(algorithm)

    def loss(m, ts, x, y):
        out, ts = learner.step(m, ts, x)
        return mse(out, y), ts

    ts = learner.init()
    for x, y in zip(xs, ys):
        g, ts = eqx.filter_grad(loss, has_aux=True)(model, ts, x, y)
        cell = jax.tree.leaves(eqx.filter(g.cell, eqx.is_array))
        assert float(jnp.sqrt(sum(jnp.sum(a**2) for a in cell))) <= 1e-3 * (1 + 1e-9)
    *_, plain = _run(etrace.D_RTRL())
    *_, loose = _run(wrappers.ClipGradNorm(etrace.D_RTRL(), 1e9))
    assert max(leaf_errors(loose, plain).values()) <= 1e-12


def test_wrapper_keeps_the_inner_trace_structure(wrappers):
    learner, *_ = _run(wrappers.ClipTraces(etrace.ES_D_RTRL(decay=0.5), 1.0))
    plain, *_ = _run(etrace.ES_D_RTRL(decay=0.5))
    assert jax.tree.structure(learner.init()) == jax.tree.structure(plain.init())


def test_subclass_overriding_update_is_used():
    class Halved(etrace.D_RTRL):
        def update_unit(self, unit, trace, D, Df, x):
            # D-RTRL's trace is a tuple, one array per state
            new = super().update_unit(unit, trace, D, Df, x)
            return jax.tree.map(lambda eps: 0.5 * eps, new)

    *_, plain = _run(etrace.D_RTRL(), length=1)
    *_, halved = _run(Halved(), length=1)
    half = 0.5 * plain.cell.weight_ih
    assert leaf_errors(halved.cell.weight_ih, half)[""] <= 1e-12
    assert max(leaf_errors(halved.readout, plain.readout).values()) <= 1e-12


def test_custom_algorithm_example_runs(wrappers, tmp_path):
    out = tmp_path / "custom.png"
    summary = wrappers.main(["--hidden", "4", "--length", "6", "--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(summary) == {"D-RTRL", "ClipTraces(D-RTRL)", "ClipGradNorm(D-RTRL)"}
