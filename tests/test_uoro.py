"""UORO: unbiased for RTRL (a z-test over many seeds), noisy for one seed."""

import equinox as eqx
import jax
import jax.random as jr
import numpy as np
import pytest

import etrace
import etrace.testing as et

from .helpers import data, leaf_errors, mse


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
