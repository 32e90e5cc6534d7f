"""`etrace.ReducedPrecision`: traces stored narrower, arithmetic as before."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace
import etrace.testing as et

from ..helpers import ALGORITHMS, all_eqns, data, leaf_errors, modulators, mse


INNER = {
    "d_rtrl": etrace.D_RTRL(),
    "es_d_rtrl": etrace.ES_D_RTRL(decay=0.7),
    "eprop": etrace.EProp(kappa=0.5),
    "rtrl": etrace.RTRL(),
    "uoro": etrace.UORO(seed=1),
}


def _run(algorithm, family="alif", batch=3):
    model, state = et.build(family, 2, 5, 2, 0)
    xs, ys = data(1, 8, 2, 2, batch=batch)
    learner, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=algorithm)
    grads, ts, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=batch), xs, ys
    )
    return learner, grads, ts


@pytest.mark.parametrize("name", list(INNER))
def test_traces_are_stored_narrow_and_gradients_follow(name):
    inner = INNER[name]
    learner_exact, exact, ts_exact = _run(inner)
    learner, reduced, ts = _run(etrace.ReducedPrecision(inner, jnp.float32))
    # Floating traces are float32 in the trace state; integer leaves (UORO's key,
    # the step counter) are untouched.
    for a, b in zip(jax.tree.leaves(ts.traces), jax.tree.leaves(ts_exact.traces)):
        if jnp.issubdtype(b.dtype, jnp.floating):
            assert a.dtype == jnp.float32 and b.dtype == jnp.float64
        else:
            assert a.dtype == b.dtype
    assert ts.t.dtype == ts_exact.t.dtype
    assert jax.tree.structure(reduced) == jax.tree.structure(exact)
    errors = leaf_errors(reduced, exact)
    # The rounding of float32 storage, not a different rule: close, not equal.
    assert max(errors.values()) < 1e-5
    assert max(errors.values()) > 1e-12
    # The summary counts the stored bytes.
    if name != "uoro":  # whose trace holds a random key besides the floats
        total = [lr.summary().splitlines()[-1] for lr in (learner, learner_exact)]
        assert total[0] != total[1]


def test_no_narrower_dtype_is_the_inner_algorithm_exactly():
    _, exact, _ = _run(etrace.D_RTRL())
    _, same, _ = _run(etrace.ReducedPrecision(etrace.D_RTRL(), jnp.float64))
    assert max(leaf_errors(same, exact).values()) == 0.0


def test_bfloat16_halves_the_trace_memory_of_a_float32_model():
    model, state = et.build("lif", 3, 16, 2, 0)
    model, state = jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a,
        (model, state),
    )
    x0 = jnp.zeros(3, jnp.float32)

    def traces_bytes(algorithm):
        learner, ts = etrace.compile(model, x0, state=state, algorithm=algorithm)
        return sum(a.nbytes for a in jax.tree.leaves(ts.traces)), learner, ts

    full, _, _ = traces_bytes(etrace.D_RTRL())
    half, learner, ts = traces_bytes(etrace.ReducedPrecision(etrace.D_RTRL()))
    assert half * 2 == full
    assert {a.dtype for a in jax.tree.leaves(ts.traces)} == {jnp.dtype(jnp.bfloat16)}
    # A step runs under jit and its gradient is float32, like the model.
    xs = jax.random.normal(jax.random.key(0), (6, 3), jnp.float32)
    ys = jnp.zeros((6, 2), jnp.float32)
    grads, ts, losses = eqx.filter_jit(etrace.online_grad)(
        learner, mse, model, ts, xs, ys
    )
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert np.all(np.isfinite(losses))


@pytest.mark.parametrize(
    "args, match",
    [
        ((jnp.float32,), "must be an `etrace.AbstractAlgorithm`"),
        ((etrace.D_RTRL(), jnp.int32), "must be a floating-point dtype"),
        ((etrace.D_RTRL(), "not a dtype"), "must be a floating-point dtype"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(etrace.EtraceError, match=match):
        etrace.ReducedPrecision(*args)


def _float64_values(closed) -> list[str]:
    """The primitives of `closed` (and of the jaxprs inside it) with a float64
    result."""
    return [
        e.primitive.name
        for e in all_eqns(closed.jaxpr)
        if any(getattr(v.aval, "dtype", None) == jnp.float64 for v in e.outvars)
    ]


ALL = {**ALGORITHMS, "bf16": etrace.ReducedPrecision(etrace.D_RTRL())}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", list(ALL))
def test_float32_models_compute_in_float32(name, dtype):
    # The test session runs with `jax_enable_x64`, where Python floats and default
    # arrays are float64: a float32 model must not be promoted anywhere.
    model, state = et.build("alif", 2, 4, 2, 0)
    model, state = jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, (model, state)
    )
    xs, ys = jax.tree.map(lambda a: a.astype(dtype), data(1, 4, 2, 2, batch=2))
    learner, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=ALL[name])
    ms = modulators(learner, xs)
    closed = jax.make_jaxpr(
        lambda ts, xs, ys: etrace.online_grad(
            learner, mse, model, ts, xs, ys, modulators=ms
        )
    )(learner.init(batch_size=2), xs, ys)
    found = _float64_values(closed)
    if dtype == jnp.float32:
        assert not found, found
    else:  # the check sees float64 where there is some
        assert found
