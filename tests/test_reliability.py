"""Scale-out and reliability: data parallelism over devices, the numerical guard,
checkpoint and resume, long runs."""

import json
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import etrace

from .helpers import mse


ROOT = pathlib.Path(__file__).parent.parent


# --------------------------------------------------------------------------------
# Data parallelism (4 virtual CPU devices, in a subprocess: the device count is
# fixed when JAX starts).


@pytest.fixture(scope="module")
def sharded_report():
    devices = "--xla_force_host_platform_device_count=4"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {devices}"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "sharded_check.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_batch_gradient_equals_single_device(sharded_report):
    assert sharded_report["devices"] == 4 and sharded_report["x64"]
    assert sharded_report["max_rel_error"] < 1e-9


def test_sharded_chunks_equal_single_device_steps(sharded_report):
    # D-RTRL's chunks (`online_grad(..., chunk=5)`) on the batch split over four
    # devices give the step-by-step gradient of one device.
    assert sharded_report["chunk_max_rel_error"] < 1e-9


def test_per_device_memory_falls_with_the_number_of_devices(sharded_report):
    ratio = (
        sharded_report["bytes_per_device_sharded"] / sharded_report["bytes_one_device"]
    )
    # 1/4 of the batch-dependent memory, plus replicated parameters and scratch
    # (0.41 on this small model; an unsplit batch gives 1).
    assert ratio < 0.45, ratio
    assert sharded_report["shard_shape"] == [2, 3]


@pytest.mark.parametrize(
    "case, match",
    [
        ("indivisible", "batch size 6 on axis 0, not a multiple of the 4 devices"),
        ("no_axis", r"shape \(\), with no batch axis 0"),
        ("axis_name", r"pass `axis_name=`"),
        ("not_a_mesh", r"`mesh` must be a `jax.sharding.Mesh`"),
    ],
)
def test_shard_batch_errors(sharded_report, case, match):
    import re

    message = sharded_report["errors"][case]
    assert message is not None and re.search(match, message), message


# --------------------------------------------------------------------------------
# The numerical guard.


class Exploding(eqx.Module):
    w: jax.Array
    decay: jax.Array
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = self.decay * h + self.w @ x
        return self.readout(h), h


def _exploding(decay):
    model = Exploding(
        jnp.ones((3, 2)),
        jnp.full((3,), decay),
        eqx.nn.Linear(3, 1, key=jax.random.key(0)),
    )
    return model, jnp.ones((40, 2)), jnp.zeros((40, 1))


def test_guard_names_the_parameter_whose_trace_stops_being_finite():
    model, xs, ys = _exploding(1e30)

    def saturating(y, target):  # its gradient stays finite until h itself is inf
        return jnp.sum(jnp.tanh(y) - target)

    learner, ts = etrace.compile(model, xs[0], state=jnp.zeros(3), check_finite=True)
    with pytest.raises(Exception, match=r"The trace of `w` is not finite"):
        eqx.filter_jit(etrace.online_grad)(learner, saturating, model, ts, xs, ys)
    # Off by default: the same run goes through and returns non-finite values.
    learner, ts = etrace.compile(model, xs[0], state=jnp.zeros(3))
    run = eqx.filter_jit(etrace.online_grad)
    grads, _, _ = run(learner, saturating, model, ts, xs, ys)
    assert not np.isfinite(np.asarray(grads.w)).all()


def test_guard_names_the_parameter_whose_gradient_stops_being_finite():
    model, xs, ys = _exploding(0.5)

    def log_loss(y, target):  # square root of a negative number: NaN gradient
        return jnp.sum(jnp.sqrt(y - 1e3) - target)

    learner, ts = etrace.compile(model, xs[0], state=jnp.zeros(3), check_finite=True)
    message = r"The gradient of parameter `readout\.(weight|bias)`"
    with pytest.raises(Exception, match=message):
        eqx.filter_jit(etrace.online_grad)(learner, log_loss, model, ts, xs[:3], ys[:3])
    # A healthy run under the guard is unchanged.
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs[:5], ys[:5])
    plain, ts0 = etrace.compile(model, xs[0], state=jnp.zeros(3))
    expect, _, _ = etrace.online_grad(plain, mse, model, ts0, xs[:5], ys[:5])
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


# --------------------------------------------------------------------------------
# Checkpoint and resume.


class GRUNet(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.cell = eqx.nn.GRUCell(2, 8, key=k1)
        self.readout = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def _training(algorithm):
    model = GRUNet(jax.random.key(0))
    learner, _ = etrace.compile(
        model, jnp.zeros(2), state=jnp.zeros(8), algorithm=algorithm
    )
    optimiser = optax.adam(1e-2)

    @eqx.filter_jit
    def chunk(model, opt_state, ts, xs, ys):
        grads, ts, losses = etrace.online_grad(learner, mse, model, ts, xs, ys)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, ts, losses

    def data(i):
        xs = jax.random.normal(jax.random.key(100 + i), (10, 4, 2))
        return xs, jnp.roll(xs[..., :1], 2, axis=0)

    carry = (model, optimiser.init(eqx.filter(model, eqx.is_array)), learner.init(4))
    return chunk, data, carry


@pytest.mark.parametrize("algorithm", [etrace.D_RTRL(), etrace.ES_D_RTRL(decay=0.5)])
def test_resumed_run_continues_bit_identically(tmp_path, algorithm):
    chunk, data, carry = _training(algorithm)
    for i in range(3):
        carry = chunk(*carry, *data(i))[:3]
    path = tmp_path / "checkpoint.eqx"
    eqx.tree_serialise_leaves(path, carry)
    straight = carry
    for i in range(3, 6):
        straight = chunk(*straight, *data(i))[:3]
    # A fresh process would rebuild the same structures and read the leaves back.
    _, _, like = _training(algorithm)
    resumed = eqx.tree_deserialise_leaves(path, like)
    for i in range(3, 6):
        resumed = chunk(*resumed, *data(i))[:3]
    a, b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert int(straight[2].t[0]) == 60


# --------------------------------------------------------------------------------
# Long runs.


class Leaky(eqx.Module):
    w: jax.Array

    def __call__(self, x, h):
        h = 0.9 * h + jnp.tanh(self.w @ x)
        return h.sum(keepdims=True), h


def _long_run(steps, chunk):
    model = Leaky(0.3 * jax.random.normal(jax.random.key(0), (4, 2)))
    learner, ts = etrace.compile(model, jnp.zeros(2), state=jnp.zeros(4))
    xs = jnp.sin(0.01 * jnp.arange(steps)[:, None] * jnp.array([[1.0, 1.7]]))
    ys = jnp.cos(0.01 * jnp.arange(steps))[:, None]
    run = eqx.filter_jit(etrace.online_grad)
    total = jax.tree.map(jnp.zeros_like, model)
    for start in range(0, steps, chunk):
        g, ts, _ = run(
            learner,
            mse,
            model,
            ts,
            xs[start : start + chunk],
            ys[start : start + chunk],
        )
        total = jax.tree.map(jnp.add, total, g)
    return learner, model, total, ts, xs, ys


def _check_long_run(steps, chunk):
    learner, model, chunked, ts, xs, ys = _long_run(steps, chunk)
    assert int(ts.t) == steps  # the step counter does not wrap
    whole, ts_whole, _ = eqx.filter_jit(etrace.online_grad)(
        learner, mse, model, learner.init(), xs, ys
    )
    # The same sums in a different grouping: no drift beyond float64 rounding.
    assert float(jnp.max(jnp.abs(chunked.w - whole.w) / jnp.abs(whole.w))) < 1e-11
    for a, b in zip(jax.tree.leaves(ts.traces), jax.tree.leaves(ts_whole.traces)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    def temp(n):
        def run(xs, ys):
            return etrace.online_grad(learner, mse, model, learner.init(), xs, ys)[:2]

        shapes = (
            jax.ShapeDtypeStruct((n, 2), xs.dtype),
            jax.ShapeDtypeStruct((n, 1), xs.dtype),
        )
        return (
            jax.jit(run).lower(*shapes).compile().memory_analysis().temp_size_in_bytes
        )

    assert temp(steps) == temp(chunk)  # memory does not grow with the length


def test_hundred_thousand_steps_in_chunks_equal_one_piece():
    _check_long_run(100_000, 10_000)
