"""KF-RTRL: unbiased for RTRL (a z-test over many seeds), with less variance than
UORO; the site Jacobians it is built on equal the dense immediate Jacobians."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import etrace
import etrace.testing as et

from ..helpers import data, leaf_errors, mse


def _flat(tree, batch=None):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    if batch is None:
        return np.concatenate([np.ravel(a) for a in leaves])
    return np.concatenate([np.reshape(a, (batch, -1)) for a in leaves], axis=1)


def _samples(model, state, xs, ys, algorithm, count, seed=1):
    """`count` online gradients, each from its own key, flattened: `(count, P)`."""
    learner, _ = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    ts = learner.init(batch_size=count)
    keys = jax.vmap(jr.key_data)(jr.split(jr.key(seed), count))
    ts = eqx.tree_at(lambda t: t.traces["key"], ts, keys)
    run = jax.vmap(lambda t: etrace.online_grad(learner, mse, model, t, xs, ys)[0])
    return _flat(jax.jit(run)(ts), count)


def _rtrl(model, state, xs, ys):
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.RTRL())
    return etrace.online_grad(learner, mse, model, ts, xs, ys)[0]


def _case(family):
    model, state = et.build(family, 2, 3, 2, 2 if family == "stack" else 0)
    xs, ys = data(0, 6, 2, 2)
    if family == "stack":  # spiking: the comparison means something only if it spikes
        rates = et.liveness(model, xs, state=state).rates
        assert rates and all(0 < r < 1 for r in rates.values())
    return model, state, xs, ys


def _z_scores(samples, exact, projections=4):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(projections):
        u = rng.normal(size=exact.shape)
        d = samples @ u
        out.append((d.mean() - exact @ u) / (d.std(ddof=1) / np.sqrt(len(d))))
    return np.abs(out)


class _WrongFactor(etrace.KF_RTRL):
    # A deliberately biased variant: the factor dh/dy of every weight op doubled.
    def update(self, graph, traces, jac):
        jac = eqx.tree_at(lambda j: j.Df, jac, {k: 2 * v for k, v in jac.Df.items()})
        return super().update(graph, traces, jac)


@pytest.mark.parametrize("family", ["gru", "stack"])
def test_mean_over_seeds_equals_rtrl(family):
    # The stack's decays are computed from parameters: they take the UORO part.
    model, state, xs, ys = _case(family)
    exact = _flat(_rtrl(model, state, xs, ys))
    samples = _samples(model, state, xs, ys, etrace.KF_RTRL(), 300)
    assert _z_scores(samples, exact).max() < 4.5
    # A single sample is noisy: it must differ from RTRL.
    assert np.linalg.norm(samples[0] - exact) / np.linalg.norm(exact) > 0.05


def test_a_wrong_factor_fails_the_z_test():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    exact = _flat(_rtrl(model, state, xs, ys))
    samples = _samples(model, state, xs, ys, _WrongFactor(), 300)
    assert _z_scores(samples, exact).max() > 10


def test_variance_below_uoro_on_a_gru():
    model, state = et.build("gru", 2, 4, 2, 0)
    xs, ys = data(1, 8, 2, 2)
    exact = _flat(_rtrl(model, state, xs, ys))
    count = 200

    def variance(algorithm):
        samples = _samples(model, state, xs, ys, algorithm, count, seed=5)
        return np.mean(np.sum((samples - exact) ** 2, axis=1))

    kf, uoro = variance(etrace.KF_RTRL()), variance(etrace.UORO())
    assert kf < 0.5 * uoro, (kf, uoro)


def test_biases_are_exact_and_weights_are_not():
    # An element-wise parameter's input is the constant 1: its trace is RTRL's.
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.KF_RTRL())
    grads = etrace.online_grad(learner, mse, model, ts, xs, ys)[0]
    errors = leaf_errors(grads, _rtrl(model, state, xs, ys))
    for path in ("bias", "bias_n"):
        assert errors[f".cell.{path}"] < 1e-9, (path, errors)
    assert errors[".readout.weight"] < 1e-9 and errors[".readout.bias"] < 1e-9
    for path in ("weight_ih", "weight_hh"):
        assert errors[f".cell.{path}"] > 1e-3, (path, errors)
    u, a = learner.trace_of(ts, lambda m: m.cell.weight_hh)["hidden"]
    assert u.shape == (3,) and a.shape == (3, 9)
    assert "Kronecker factors of `cell.weight_hh @ x`" in learner.summary()
    assert not et.exact_regime(etrace.KF_RTRL(), learner)


def test_same_seed_same_result():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 5, 2, 2)
    runs = []
    for seed in (0, 0, 1):
        algorithm = etrace.KF_RTRL(seed=seed)
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        runs.append(etrace.online_grad(learner, mse, model, ts, xs, ys)[0])
    assert max(leaf_errors(runs[0], runs[1]).values()) == 0.0
    assert max(leaf_errors(runs[0], runs[2]).values()) > 1e-6


def test_without_fallback_refuses_what_it_cannot_factor():
    model, state = et.build("stack", 2, 3, 2, 0)
    algorithm = etrace.KF_RTRL(fallback=False)
    with pytest.raises(
        etrace.EtraceError,
        match=r"cannot factor the parameter `l1.tau`.*computed.*fallback=True",
    ):
        etrace.compile(model, jnp.zeros(2), state=state, algorithm=algorithm)
    learner, _ = etrace.compile(
        model, jnp.zeros(2), state=state, algorithm=etrace.KF_RTRL()
    )
    assert "UORO's rank-one factors" in learner.summary()


class _SiteJacobians(etrace.AbstractAlgorithm):
    # Keeps, per step, each direct weight's immediate Jacobian from the site
    # Jacobians (`dh/dy` times `x`) next to the dense `Jtheta` of the same step.
    routing: ClassVar[str] = "joint"
    site_jacobians: ClassVar[bool] = True

    def init(self, graph):
        h = graph.hidden_size
        shapes = {path: (shape, dt) for path, shape, dt in graph.params}
        zeros = {
            p: jnp.zeros((h,) + shapes[p][0], shapes[p][1]) for p in graph.direct_sites
        }
        return {"sites": dict(zeros), "dense": dict(zeros)}

    def update(self, graph, traces, jac):
        sites = {u.site.name: u.site for u in graph.units}
        out = {}
        for path, name in graph.direct_sites.items():
            site = sites[name]
            dy = jac.Df[name].reshape(graph.hidden_size, site.fw)
            immediate = jnp.einsum("hm,c->hmc", dy, jac.x[name].reshape(site.c))
            out[path] = jax.vmap(site.weight_from_canonical)(immediate)
        return {"sites": out, "dense": {p: jac.Jtheta[p] for p in out}}

    def gradients(self, graph, traces, signal, jac):
        return {path: jnp.zeros(shape, dt) for path, shape, dt in graph.params}


@pytest.mark.parametrize("family", ["gru", "stack"])
def test_site_jacobians_give_the_immediate_jacobians(family):
    # On the stack, the bottom layer's weight reaches the top layer's new state in
    # the same step: `dh/dy` must keep that path through the top layer's weight.
    model, state, xs, _ = _case(family)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=_SiteJacobians())
    step = eqx.filter_jit(learner.step)
    largest = dict.fromkeys(learner.graph.direct_sites, 0.0)
    for x in xs:
        _, ts = step(model, ts, x)
        traces = ts.traces
        assert set(traces["sites"]) == set(largest)
        for path, dense in traces["dense"].items():
            np.testing.assert_allclose(
                traces["sites"][path], dense, rtol=1e-9, atol=1e-12
            )
            largest[path] = max(largest[path], float(np.abs(dense).max()))
    # Not trivially equal: every parameter's immediate Jacobian is non-zero.
    assert min(largest.values()) > 1e-3, largest
    if family == "stack":
        # The bottom weight's rows of the top layer (3 on) are non-zero.
        bottom = traces["dense"]["l1.linear.weight"]
        assert np.abs(bottom[3:]).max() > 1e-3
