"""DNI: truncated whole-state learning with a synthetic gradient at each chunk's
end, checked against truncated BPTT written by hand; its predictor, fitted with
`etrace.dni_grad` on a linear system, recovers the exact future cotangent."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest

import etrace
import etrace.testing as et
from etrace._algorithm.dni import synthetic_gradient

from ..helpers import data, leaf_errors, mse


def _by_hand(learner, model, state, xs, ys, every, predictor):
    """Truncated BPTT over chunks of `every` steps (no gradient through the state a
    chunk starts from), plus the predictor's output at each chunk's end as the
    cotangent of the state it ends in."""
    leaves, treedef = jax.tree.flatten(state)
    hidden = [j for g in learner.graph.groups for j in g.leaves]

    def total(model):
        s, out = leaves, 0.0
        for start in range(0, len(xs), every):
            s = [jax.lax.stop_gradient(a) for a in s]
            for t in range(start, start + every):
                y, new = model(xs[t], jax.tree.unflatten(treedef, s))
                s = jax.tree.leaves(new)
                out = out + mse(y, ys[t])
            h = jnp.concatenate([jnp.ravel(s[j]) for j in hidden])
            g = synthetic_gradient(learner.graph, predictor, h)
            out = out + jnp.dot(jax.lax.stop_gradient(g), h)
        return out

    return eqx.filter_jit(eqx.filter_grad(total))(model)


def _with_predictor(ts, predictor):
    return eqx.tree_at(lambda t: t.traces["predictor"], ts, predictor)


@pytest.mark.parametrize("family", ["gru", "rnn"])
def test_equals_truncated_bptt_with_the_synthetic_gradient(family):
    model, state = et.build(family, 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.DNI(every=3)
    )
    zero = ts.traces["predictor"]
    plain = etrace.online_grad(learner, mse, model, ts, xs, ys)[0]
    assert (
        max(
            leaf_errors(
                plain, _by_hand(learner, model, state, xs, ys, 3, zero)
            ).values()
        )
        < 1e-9
    )
    # Truncation matters here: the plain truncated gradient is not BPTT's.
    bptt, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    assert max(leaf_errors(plain, bptt).values()) > 1e-3

    predictor = jax.tree.map(lambda a: jr.normal(jr.key(a.size), a.shape), zero)
    ts = _with_predictor(ts, predictor)
    corrected = etrace.online_grad(learner, mse, model, ts, xs, ys)[0]
    by_hand = _by_hand(learner, model, state, xs, ys, 3, predictor)
    assert max(leaf_errors(corrected, by_hand).values()) < 1e-9
    # The synthetic gradient changes the result (not dropped, not doubled).
    assert max(leaf_errors(corrected, plain).values()) > 1e-3


# A linear system `h' = W h + U x`, `y = C h`, with constant input `x = xbar` and
# target 0: the gradient of every later loss by the state is exactly affine in it,
# `P h + b` with `P = sum_k (W^k)^T C^T C W^k` and `b` from the input's drive.
N_HIDDEN, N_IN, N_OUT = 3, 2, 2
XBAR = jnp.array([1.0, -0.5])


class LinearRNN(eqx.Module):
    w: jax.Array
    u: jax.Array
    c: jax.Array

    def __call__(self, x, h):
        h = self.w @ h + self.u @ x
        return self.c @ h, h


def _half_mse(y, target):
    return 0.5 * jnp.sum((y - target) ** 2)


def _linear(seed):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    q, _ = jnp.linalg.qr(jr.normal(k1, (N_HIDDEN, N_HIDDEN)))
    w = q @ jnp.diag(jnp.array([0.6, -0.5, 0.4])) @ q.T
    return LinearRNN(
        w, jr.normal(k2, (N_HIDDEN, N_IN)), jr.normal(k3, (N_OUT, N_HIDDEN))
    )


def _future_cotangent(model, terms=300):
    """`(P, b)`: the exact gradient of all later losses by the state, `P h + b`."""
    a, c, u = model.w, model.c, model.u
    p, b = jnp.zeros((N_HIDDEN, N_HIDDEN)), jnp.zeros(N_HIDDEN)
    power, drive = jnp.eye(N_HIDDEN), jnp.zeros(N_HIDDEN)
    for _ in range(terms):
        drive = a @ drive + u @ XBAR
        power = a @ power
        p = p + power.T @ c.T @ c @ power
        b = b + power.T @ c.T @ (c @ drive)
    return p, b


def _errors(predictor, p, b):
    (fit,) = predictor.values()
    return (
        float(jnp.linalg.norm(fit["weight"] - p) / jnp.linalg.norm(p)),
        float(jnp.linalg.norm(fit["bias"] - b) / jnp.linalg.norm(b)),
    )


def test_fitted_predictor_recovers_the_future_cotangent():
    every = 4
    model = _linear(0)
    p, b = _future_cotangent(model)
    learner, ts = etrace.compile(
        model,
        jnp.zeros(N_IN),
        state=jnp.zeros(N_HIDDEN),
        algorithm=etrace.DNI(every=every),
    )
    # Two chunks from each of 64 random states, fitted on their mean gradient.
    starts = 2.0 * jr.normal(jr.key(3), (64, N_HIDDEN))
    xs = jnp.broadcast_to(XBAR, (2 * every, N_IN))
    ys = jnp.zeros((2 * every, N_OUT))
    optimiser = optax.adam(optax.exponential_decay(0.1, 50, 0.5))
    predictor = ts.traces["predictor"]
    assert _errors(predictor, p, b) == (1.0, 1.0)  # untrained: zero

    @eqx.filter_jit
    def fit_step(predictor, opt_state):
        def one(h):
            start = eqx.tree_at(lambda t: t.state, _with_predictor(ts, predictor), h)
            return etrace.dni_grad(learner, _half_mse, model, start, xs, ys)[1]

        grads = jax.tree.map(lambda g: g.mean(0), jax.vmap(one)(starts))
        updates, opt_state = optimiser.update(grads, opt_state)
        return optax.apply_updates(predictor, updates), opt_state

    opt_state = optimiser.init(predictor)
    for _ in range(200):
        predictor, opt_state = fit_step(predictor, opt_state)
    weight_error, bias_error = _errors(predictor, p, b)
    assert weight_error < 1e-3 and bias_error < 1e-3, (weight_error, bias_error)
    # The fitted predictor brings a noisy stretch's gradient closer to BPTT's.
    xs = XBAR[None] + jr.normal(jr.key(4), (40, N_IN))
    ys = 0.3 * jr.normal(jr.key(5), (40, N_OUT))
    bptt, _ = etrace.bptt_grad(_half_mse, model, jnp.zeros(N_HIDDEN), xs, ys)
    plain = etrace.online_grad(learner, _half_mse, model, ts, xs, ys)[0]
    fitted = _with_predictor(ts, predictor)
    corrected = etrace.online_grad(learner, _half_mse, model, fitted, xs, ys)[0]
    assert _cosine(corrected, bptt) > _cosine(plain, bptt) + 1e-3


def _flat(grads):
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    return jnp.concatenate([jnp.ravel(a) for a in leaves])


def _cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_gradient_brings_truncation_closer_to_bptt(seed):
    model = _linear(seed)
    p, b = _future_cotangent(model)
    learner, ts = etrace.compile(
        model, jnp.zeros(N_IN), state=jnp.zeros(N_HIDDEN), algorithm=etrace.DNI(every=4)
    )
    xs = XBAR[None] + jr.normal(jr.key(10 + seed), (40, N_IN))
    ys = 0.3 * jr.normal(jr.key(20 + seed), (40, N_OUT))
    bptt, _ = etrace.bptt_grad(_half_mse, model, jnp.zeros(N_HIDDEN), xs, ys)
    plain = etrace.online_grad(learner, _half_mse, model, ts, xs, ys)[0]
    (group,) = ts.traces["predictor"]
    exact = _with_predictor(ts, {group: {"weight": p, "bias": b}})
    corrected = etrace.online_grad(learner, _half_mse, model, exact, xs, ys)[0]
    assert _cosine(corrected, bptt) > _cosine(plain, bptt) + 1e-3
    assert 1 - _cosine(corrected, bptt) < 0.5 * (1 - _cosine(plain, bptt))
    # Negative control: an untrained (zero) predictor is the plain truncation.
    untrained = etrace.online_grad(learner, _half_mse, model, ts, xs, ys)[0]
    assert _cosine(untrained, bptt) == _cosine(plain, bptt)


def test_masked_losses_keep_the_synthetic_gradient():
    # It stands for later losses: a zero mask removes this stretch's own losses only,
    # so what is left is the synthetic part, the corrected gradient less the plain.
    model, state = et.build("rnn", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.DNI(every=3)
    )
    zero = ts.traces["predictor"]
    predictor = jax.tree.map(lambda a: jr.normal(jr.key(a.size), a.shape), zero)

    def run(predictor, mask):
        ts_ = _with_predictor(ts, predictor)
        grads = etrace.online_grad(learner, mse, model, ts_, xs, ys, mask=mask)[0]
        return eqx.filter(grads, eqx.is_array)

    masked = run(predictor, jnp.zeros(6))
    alone = jax.tree.map(
        jnp.subtract, run(predictor, jnp.ones(6)), run(zero, jnp.ones(6))
    )
    assert max(leaf_errors(masked, alone).values()) < 1e-9
    assert float(jnp.abs(masked.rec.weight).max()) > 1e-3


def test_inner_must_be_whole_state():
    with pytest.raises(etrace.EtraceError, match=r"DNI\(inner=D_RTRL.*whole-state"):
        etrace.DNI(etrace.D_RTRL())
    with pytest.raises(
        etrace.EtraceError, match=r"DNI\(every=0\).*chunk length.*at least 1"
    ):
        etrace.DNI(every=0)


def test_dni_grad_refuses_what_it_cannot_run():
    model, state = et.build("rnn", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=etrace.RTRL())
    with pytest.raises(etrace.EtraceError, match=r"DNI\(\.\.\.\).*runs RTRL"):
        etrace.dni_grad(learner, mse, model, ts, xs, ys)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=etrace.DNI(every=4)
    )
    with pytest.raises(etrace.EtraceError, match=r"`xs` has 6 steps.*4 steps"):
        etrace.dni_grad(learner, mse, model, ts, xs, ys)
    with pytest.raises(etrace.EtraceError, match=r"unbatched trace state"):
        etrace.dni_grad(learner, mse, model, learner.init(batch_size=2), xs, ys)
    _, later, _ = etrace.online_grad(learner, mse, model, ts, xs[:1], ys[:1])
    with pytest.raises(etrace.EtraceError, match=r"at step 1, inside a DNI chunk"):
        etrace.dni_grad(learner, mse, model, later, xs[:4], ys[:4])
