"""UORO: unbiased for RTRL (a z-test over many seeds), noisy for one seed."""

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


def _keys(learner, count, seed):
    ts = learner.init(batch_size=count)
    keys = jax.vmap(jr.key_data)(jr.split(jr.key(seed), count))
    return eqx.tree_at(lambda t: t.traces["key"], ts, keys)


@pytest.mark.parametrize("family", ["gru", "rnn"])
def test_mean_over_seeds_equals_rtrl(family):
    model, state = et.build(family, 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, _ = etrace.compile(model, xs[0], state=state, algorithm=etrace.UORO())
    count = 300
    per_seed = jax.jit(
        jax.vmap(lambda ts: etrace.online_grad(learner, mse, model, ts, xs, ys)[0])
    )(_keys(learner, count, 1))
    rtrl, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.RTRL())
    exact = _flat(etrace.online_grad(rtrl, mse, model, ts, xs, ys)[0])
    samples = _flat(per_seed, count)
    rng = np.random.default_rng(0)
    for _ in range(4):
        u = rng.normal(size=exact.shape)
        d = samples @ u
        z = (d.mean() - exact @ u) / (d.std(ddof=1) / np.sqrt(count))
        assert abs(z) < 4.5, z
    # A single sample is noisy: it must differ from RTRL.
    assert np.linalg.norm(samples[0] - exact) / np.linalg.norm(exact) > 0.05


def test_uoro_is_reproducible_and_seeded():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 5, 2, 2)
    runs = []
    for seed in (0, 0, 1):
        learner, ts = etrace.compile(
            model, xs[0], state=state, algorithm=etrace.UORO(seed=seed)
        )
        runs.append(etrace.online_grad(learner, mse, model, ts, xs, ys)[0])
    assert max(leaf_errors(runs[0], runs[1]).values()) == 0.0
    assert max(leaf_errors(runs[0], runs[2]).values()) > 1e-6


def test_uoro_readout_is_exact_and_trace_of():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 5, 2, 2)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.UORO())
    et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params="readout", require_live=False
    )
    s, theta = learner.trace_of(ts, lambda m: m.cell.weight_hh)["hidden"]
    assert s.shape == (3,) and theta.shape == (9, 3)
    assert "UORO" in learner.summary()
    assert not et.exact_regime(etrace.UORO(), learner)


class _Products(etrace.AbstractAlgorithm):
    # Keeps, for fixed random vectors `v` and `u`, the products `jac.jvp` and
    # `jac.vjp` give next to the same products taken with the dense `jac.J` and
    # `jac.Jtheta` of the same step.
    routing: ClassVar[str] = "joint"

    def init(self, graph):
        dtype = graph.groups[0].dtype
        v, u = jr.normal(jr.key(3), (2, graph.hidden_size), dtype)
        zero = jnp.zeros_like(v)
        params = {path: jnp.zeros(shape, dt) for path, shape, dt in graph.params}
        products = (zero, zero, params)
        return {"v": v, "u": u, "products": products, "dense": products, "vJ": zero}

    def update(self, graph, traces, jac):
        v, u = traces["v"], traces["u"]
        uJ, uI = jac.vjp(u)
        dense_uI = {p: jnp.tensordot(u, jac.Jtheta[p], axes=1) for p in uI}
        return {
            "v": v,
            "u": u,
            "products": (jac.jvp(v), uJ, uI),
            "dense": (jac.J @ v, u @ jac.J, dense_uI),
            "vJ": v @ jac.J,
        }

    def gradients(self, graph, traces, signal, jac):
        return {path: jnp.zeros(shape, dt) for path, shape, dt in graph.params}


@pytest.mark.parametrize("family", ["alif", "stack", "lstm"])
def test_products_equal_the_dense_jacobians(family):
    # `jac.jvp` is the transpose of the step's pullback: for spiking neurons
    # (`custom_vjp` surrogates, no forward mode) as for cells and stacked layers.
    model, state = et.build(family, 3, 4, 2, 0)
    xs, ys = data(0, 6, 3, 2)
    if family == "alif":
        rates = et.liveness(model, xs, state=state).rates
        assert rates and all(0 < r < 1 for r in rates.values())
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=_Products())
    traces = etrace.online_grad(learner, mse, model, ts, xs, ys)[1].traces
    products, dense = traces["products"], traces["dense"]
    assert jax.tree.structure(products) == jax.tree.structure(dense)
    for got, want in zip(jax.tree.leaves(products), jax.tree.leaves(dense)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # Negative controls: the products are not zero, and `J v` is not `v^T J`
    # (`J` is not symmetric here), so a transpose taken the wrong way would fail.
    jv, uJ, uI = products
    assert np.linalg.norm(jv) > 1e-3 and max(np.abs(a).max() for a in uI.values()) > 0
    assert np.linalg.norm(traces["vJ"] - jv) > 1e-3 * np.linalg.norm(jv)


class _DenseUORO(etrace.AbstractWrappedAlgorithm):
    # Tallec & Ollivier's update written with the dense `J` and `I`.
    inner: etrace.UORO
    dense_jacobians: ClassVar[bool] = True

    def update(self, graph, traces, jac):
        eps = self.inner.eps
        key, sub = jr.split(jr.wrap_key_data(traces["key"]))
        s = traces["s"]
        nu = 2 * (jr.bits(sub, s.shape, jnp.uint32) & 1).astype(s.dtype) - 1
        js = jac.J @ s
        nu_i = {p: jnp.tensordot(nu, jac.Jtheta[p], axes=1) for p in traces["theta"]}

        def norm(tree):
            return jnp.sqrt(sum(jnp.sum(a**2) for a in tree.values()))

        rho0 = jnp.sqrt((norm(traces["theta"]) + eps) / (jnp.linalg.norm(js) + eps))
        rho1 = jnp.sqrt((norm(nu_i) + eps) / (jnp.linalg.norm(nu) + eps))
        theta = {p: t / rho0 + nu_i[p] / rho1 for p, t in traces["theta"].items()}
        return {"key": jr.key_data(key), "s": rho0 * js + rho1 * nu, "theta": theta}


@pytest.mark.parametrize("family", ["gru", "alif"])
def test_uoro_equals_its_update_with_dense_jacobians(family):
    model, state = et.build(family, 3, 4, 2, 0)
    xs, ys = data(0, 6, 3, 2)
    runs = []
    for algorithm in (etrace.UORO(seed=2), _DenseUORO(etrace.UORO(seed=2))):
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        runs.append((grads, ts.traces))
    (grads, traces), (dense_grads, dense_traces) = runs
    assert max(leaf_errors(grads, dense_grads).values()) < 1e-9
    assert max(leaf_errors(traces["theta"], dense_traces["theta"]).values()) < 1e-9
    np.testing.assert_allclose(traces["s"], dense_traces["s"], rtol=1e-9)
    # Not trivially equal: no parameter's estimate is zero.
    assert all(np.abs(t).max() > 1e-6 for t in traces["theta"].values())


class _WrongShape(etrace.AbstractWrappedAlgorithm):
    inner: etrace.UORO

    def update(self, graph, traces, jac):
        jac.jvp(traces["s"][:-1])
        return traces


def test_products_refuse_a_vector_of_the_wrong_shape():
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, ys = data(0, 2, 2, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=_WrongShape(etrace.UORO())
    )
    with pytest.raises(etrace.EtraceError, match=r"jac.jvp.*shape \(3,\).*\(2,\)"):
        etrace.online_grad(learner, mse, model, ts, xs, ys)


class _ReadsJ(etrace.AbstractWrappedAlgorithm):
    # Declares no dense Jacobians (through UORO) and reads them all the same.
    inner: etrace.UORO
    use: str

    def update(self, graph, traces, jac):
        if self.use == "matmul":
            jac.J @ traces["s"]
        elif self.use == "tensordot":
            jnp.tensordot(traces["s"], jac.J, axes=1)
        else:
            jac.Jtheta[next(iter(traces["theta"]))]
        return traces


@pytest.mark.parametrize("use", ["matmul", "tensordot", "index"])
def test_unformed_jacobians_refuse_use(use):
    model, state = et.build("gru", 2, 3, 2, 0)
    xs, _ = data(0, 2, 2, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=_ReadsJ(etrace.UORO(), use)
    )
    name = "Jtheta" if use == "index" else "J"
    with pytest.raises(
        etrace.EtraceError, match=rf"jac.{name} is not formed.*dense_jacobians = True"
    ):
        learner.step(model, ts, xs[0])
