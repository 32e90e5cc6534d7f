"""Invariants every algorithm keeps: chunked runs continue exactly, vmap equals a
loop over examples, and the gradient has the model's structure."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import etrace
import etrace.testing as et
from etrace._algorithm import registry

from .helpers import data, leaf_errors, modulators, mse


ALGORITHMS = registry.INSTANCES


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_chunks_vmap_and_structure(name):
    model, state = et.build("lstm", 2, 3, 2, 4)
    xs, ys = data(4, 6, 2, 2, batch=2)
    learner, _ = etrace.compile(
        model, xs[0, 0], state=state, algorithm=ALGORITHMS[name]
    )
    ms = modulators(learner, xs)  # for an algorithm that takes them

    def part(a, where):
        return None if a is None else a[where]

    x1, y1, m1 = xs[:, 0], ys[:, 0], part(ms, (slice(None), 0))

    def run(ts, xs, ys, ms, **kwargs):
        return etrace.online_grad(
            learner, mse, model, ts, xs, ys, modulators=ms, **kwargs
        )

    whole, ts_whole, _ = run(learner.init(), x1, y1, m1)
    first, mid, _ = run(learner.init(), x1[:2], y1[:2], part(m1, slice(2)))
    second, ts_end, _ = run(mid, x1[2:], y1[2:], part(m1, slice(2, None)))
    assert (
        max(leaf_errors(whole, jax.tree.map(jnp.add, first, second)).values()) <= 1e-9
    )
    assert max(leaf_errors(ts_whole, ts_end).values()) <= 1e-9

    batched, _, _ = run(learner.init(batch_size=2), xs, ys, ms)
    loop = [
        run(learner.init(), xs[:, b], ys[:, b], part(ms, (slice(None), b)))[0]
        for b in range(2)
    ]
    mean = jax.tree.map(lambda p, q: (p + q) / 2, *loop)
    assert max(leaf_errors(batched, mean).values()) <= 1e-9
    params = eqx.filter(model, eqx.is_inexact_array)
    assert jax.tree.structure(whole) == jax.tree.structure(params)

    zero, _, _ = run(learner.init(), x1, y1, m1, mask=jnp.zeros(6))
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(zero))


class NoHiddenState(eqx.Module):
    """Parameters reach only the output; the state is a passive leaky input filter."""

    w: jax.Array

    def __call__(self, x, h):
        h = 0.5 * h + x
        return self.w @ jnp.tanh(h), h


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_model_without_hidden_group(name):
    model = NoHiddenState(jax.random.normal(jax.random.key(0), (2, 3)))
    learner, ts = etrace.compile(
        model, jnp.zeros(3), state=jnp.zeros(3), algorithm=ALGORITHMS[name]
    )
    assert not learner.graph.groups
    xs, ys = data(0, 5, 3, 2)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, require_live=False)


@pytest.mark.parametrize("name", ["es_d_rtrl", "ottt", "d_rtrl"])
def test_vmap_of_grad_keeps_per_example_gradients(name):
    # `online_grad` sums the read-out over its batch inside `vmap`; under
    # `vmap(grad(step))` every example must keep its own gradient.
    model, state = et.build("lstm", 2, 3, 2, 4)
    xs, ys = data(5, 1, 2, 2, batch=3)
    learner, _ = etrace.compile(
        model, xs[0, 0], state=state, algorithm=ALGORITHMS[name]
    )
    warm = jax.vmap(lambda x: learner.step(model, learner.init(), x)[1])(xs[0])

    def grad_one(ts, x, y):
        def loss(m):
            return mse(learner.step(m, ts, x)[0], y)

        return eqx.filter_grad(loss)(model)

    per_example = jax.vmap(grad_one)(warm, xs[0], ys[0])
    for b in range(3):
        ts_b = jax.tree.map(lambda a: a[b], warm)
        one = grad_one(ts_b, xs[0, b], ys[0, b])
        got = jax.tree.map(lambda a: a[b], per_example)
        assert max(leaf_errors(got, one).values()) <= 1e-9
    # Examples differ, so a summed read-out would have been caught.
    first, second = (jax.tree.map(lambda a: a[b], per_example) for b in (0, 1))
    assert max(leaf_errors(first, second).values()) > 1e-3


def test_summed_read_out_respects_an_overridden_gradient_unit():
    class Doubled(etrace.ES_D_RTRL):
        def gradient_unit(self, unit, trace, signal, Df, x):
            return 2 * super().gradient_unit(unit, trace, signal, Df, x)

    model, state = et.build("lstm", 2, 3, 2, 4)
    xs, ys = data(6, 4, 2, 2, batch=3)

    def batched(algorithm):
        learner, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=algorithm)
        ts = learner.init(batch_size=3)
        return etrace.online_grad(learner, mse, model, ts, xs, ys)[0]

    plain, doubled = batched(etrace.ES_D_RTRL(decay=0.6)), batched(Doubled(decay=0.6))
    traced = lambda g: g.cell.weight_hh  # noqa: E731
    twice = jax.tree.map(lambda a: 2 * a, traced(plain))
    assert leaf_errors(traced(doubled), twice)[""] <= 1e-9
    assert float(jnp.max(jnp.abs(traced(plain)))) > 1e-3
