"""`online_grad(..., chunk=S)`: D-RTRL's traces advanced `S` steps at a time give
the gradient and traces of the step-by-step recurrence (and BPTT's gradient in
its exact regime); the refusals."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest

import etrace
import etrace.testing as et

from ..analysis.test_operators import (
    _conv_problem,
    ConvLIF,
    LeakyConv2d,
    MaskedLIF,
    RecurrentConvLIF,
)
from ..helpers import build, data, firing_rate, mse, rel_err


SPIKING = ("lif", "alif", "stack")


def _worst(a, b) -> float:
    """The largest relative error over the leaves of two pytrees."""
    pairs = zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    return max([0.0] + [rel_err(x, y) for x, y in pairs])


def _restarted(learner, model, ts, xs, ys, chunk):
    """The wrong answer a chunk that forgets the trace it starts from would give:
    `online_grad` over each chunk apart, the traces zeroed at each start."""
    zero = learner.reset(ts).traces
    total = None
    for start in range(0, xs.shape[0], chunk):
        ts = eqx.tree_at(lambda s: s.traces, ts, zero)
        part = slice(start, start + chunk)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs[part], ys[part])
        total = grads if total is None else jtu.tree_map(jnp.add, total, grads)
    return total


@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize(
    "family, algorithm",
    [
        ("gru", etrace.D_RTRL()),
        ("lstm", etrace.D_RTRL()),
        ("lif", etrace.D_RTRL()),
        ("alif", etrace.D_RTRL()),
        ("stack", etrace.D_RTRL()),
        ("rnn", etrace.OSTLRecurrent()),
        ("alif", etrace.OSTLRecurrent()),
    ],
)
def test_chunks_equal_the_step_by_step_recurrence(family, algorithm, batch):
    model, h0 = build(family, 3, 5, 2, seed=1)
    xs, ys = data(1, 11, 3, 2, batch=batch)
    if family in SPIKING and batch is None:
        assert 0.0 < firing_rate(model, h0, xs) < 1.0
    x0 = xs[0] if batch is None else xs[0, 0]
    learner, ts = etrace.compile(model, x0, state=h0, algorithm=algorithm)
    if batch is not None:
        ts = learner.init(batch_size=batch)
    grads, final, losses = etrace.online_grad(learner, mse, model, ts, xs, ys)
    # 11 steps: two chunks of 4 and one of 3; one chunk of all; one step each.
    for chunk in (4, 11, 1):
        got, got_final, got_losses = etrace.online_grad(
            learner, mse, model, ts, xs, ys, chunk=chunk
        )
        assert _worst(got, grads) < 1e-9
        assert _worst(got_final.traces, final.traces) < 1e-9
        assert _worst(got_final.state, final.state) < 1e-12
        assert rel_err(got_losses, losses) < 1e-12
    # Control: the comparison sees a chunk that forgets the trace it starts from.
    assert _worst(_restarted(learner, model, ts, xs, ys, 4), grads) > 1e-3


@pytest.mark.parametrize(
    "problem",
    ["leaky", "conv_lif", "conv_lif_turned", "conv2d_groups"],
)
def test_chunks_equal_bptt_in_d_rtrls_exact_regime(problem):
    if problem == "leaky":
        model, h0 = build("leaky", 3, 5, 2, seed=2)
        xs, ys = data(2, 9, 3, 2)
    elif problem.startswith("conv_lif"):  # several positions (`Fx = 6`), K = 2
        model, h0, xs, ys = _conv_problem(ConvLIF, seed=0, length=9)
        if problem == "conv_lif_turned":  # 4 x 6 outputs of 6 inputs: turned
            model, h0 = eqx.nn.make_with_state(ConvLIF)(jax.random.key(0), c_out=4)
        rates = et.liveness(model, xs, state=h0).rates
        assert rates and all(0.0 < r < 1.0 for r in rates.values())
    else:  # grouped convolution: a block axis `B = 2`
        model = LeakyConv2d(jax.random.key(1), stride=2, padding=1, groups=2)
        xs = jax.random.normal(jax.random.key(2), (9, 4, 5, 5))
        h0 = jnp.zeros(model.conv(xs[0]).shape)
        ys = jax.random.normal(jax.random.key(4), (9, 2))
    learner, ts = etrace.compile(model, xs[0], state=h0)
    turned = learner.algorithm.transposed_gradients(learner.graph, ts.traces)
    assert bool(turned) == (problem == "conv_lif_turned")
    exact, _ = etrace.bptt_grad(mse, model, h0, xs, ys)
    got, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=4)
    assert _worst(got, exact) < 1e-9
    assert _worst(_restarted(learner, model, ts, xs, ys, 4), exact) > 1e-3


def test_chunks_of_a_recurrent_convolution_equal_its_steps():
    model, h0, xs, ys = _conv_problem(RecurrentConvLIF, seed=3, length=10)
    learner, ts = etrace.compile(model, xs[0], state=h0)
    grads, final, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    got, got_final, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=3)
    assert _worst(got, grads) < 1e-9
    assert _worst(got_final.traces, final.traces) < 1e-9


def test_chunks_with_a_mask_under_jit():
    model, h0 = build("lif", 3, 5, 2, seed=4)
    xs, ys = data(4, 10, 3, 2, batch=2)
    learner, _ = etrace.compile(model, xs[0, 0], state=h0)
    ts = learner.init(batch_size=2)
    mask = jnp.array([0.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 2.0, 1.0])

    @eqx.filter_jit
    def both(model, ts):
        step = etrace.online_grad(learner, mse, model, ts, xs, ys, mask=mask)
        chunked = etrace.online_grad(
            learner, mse, model, ts, xs, ys, mask=mask, chunk=4
        )
        return step, chunked

    (grads, _, losses), (got, _, got_losses) = both(model, ts)
    assert _worst(got, grads) < 1e-9
    assert rel_err(got_losses, losses) < 1e-12
    unmasked, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=4)
    assert _worst(got, unmasked) > 1e-3  # the mask reached the learning signals


def test_chunks_write_the_new_traces_over_the_old(monkeypatch):
    # The chunk's read-out reads the traces it starts from and its update writes
    # new ones: `online_grad` makes the update wait for the read-out, so that XLA
    # writes the new traces over the old instead of copying them every chunk.
    # (For traces of a few thousand numbers XLA copies them either way.)
    from etrace import _sequence

    model, h0 = build("lif", 64, 256, 2, seed=4)
    xs, ys = data(4, 8, 64, 2, batch=16)
    learner, _ = etrace.compile(model, xs[0, 0], state=h0)
    ts = learner.init(batch_size=16)
    (shape,) = {a.shape for a in jtu.tree_leaves(ts.traces) if a.shape[-1] == 64}
    copy = re.compile(rf"= f64\[{','.join(map(str, shape))}\]\S* copy\(%get-tuple")

    def copies() -> int:
        def loss(y, target):  # a new function each time: `online_grad` retraces
            return mse(y, target)

        run = jax.jit(
            lambda ts: etrace.online_grad(learner, loss, model, ts, xs, ys, chunk=4)
        )
        return len(copy.findall(run.lower(ts).compile().as_text()))

    assert copies() == 0
    # Control: without the order, the chunk's starting traces are copied.
    monkeypatch.setattr(_sequence, "after", lambda tree, reads: tree)
    assert copies() == 1


@pytest.mark.parametrize("chunk", [0, -2, 2.0, True, "4"])
def test_chunk_must_be_a_positive_integer(chunk):
    model, h0 = build("gru", 3, 4, 2, seed=0)
    xs, ys = data(0, 5, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=h0)
    with pytest.raises(etrace.EtraceError, match="`chunk` must be a positive integer"):
        etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=chunk)


@pytest.mark.parametrize(
    "algorithm, match",
    [
        (etrace.ES_D_RTRL(decay=0.5), "ES_D_RTRL keeps other traces"),
        (etrace.RTRL(), "RTRL keeps other traces"),
        (etrace.EProp(), "EProp keeps other traces"),
        (etrace.OSTTP(), "OSTTP projects a feedback learning signal"),
    ],
)
def test_chunks_refuse_other_traces(algorithm, match):
    model, h0 = build("lif", 3, 4, 2, seed=0)
    xs, ys = data(0, 5, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=h0, algorithm=algorithm)
    with pytest.raises(etrace.EtraceError, match=match):
        etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=2)


def test_chunks_refuse_sparse_traces_and_take_dense_ones():
    model, h0 = eqx.nn.make_with_state(MaskedLIF)(jax.random.key(0), as_leaf=False)
    xs = jax.random.normal(jax.random.key(1), (8, 3)) * 1.5
    ys = jax.random.normal(jax.random.key(2), (8, 2))
    learner, ts = etrace.compile(model, xs[0], state=h0)
    with pytest.raises(etrace.EtraceError, match="D_RTRL\\(sparse=False\\)"):
        etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=3)
    dense, ts = etrace.compile(
        model, xs[0], state=h0, algorithm=etrace.D_RTRL(sparse=False)
    )
    exact, _ = etrace.bptt_grad(mse, model, h0, xs, ys)
    got, _, _ = etrace.online_grad(dense, mse, model, ts, xs, ys, chunk=3)
    assert _worst(got, exact) < 1e-9
