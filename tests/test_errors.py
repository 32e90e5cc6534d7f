"""Every user error is an EtraceError whose message names the culprit."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import etrace

from .helpers import build, data, f64, GRUNet, LSTMNet, mse


class Update(eqx.Module):
    """A one-layer model whose recurrent update is `fn(h, W x)`."""

    w: jax.Array
    fn: object = eqx.field(static=True)

    def __call__(self, x, h):
        h = self.fn(h, self.w @ x)
        return h, h


def _compile(fn, hidden=4, state=None):
    model = f64(Update(jnp.ones((hidden, 3)), fn))
    return etrace.compile(
        model, jnp.zeros(3), state=jnp.zeros(hidden) if state is None else state
    )


def _layer_norm(h):
    return eqx.nn.LayerNorm(h.shape, use_weight=False, use_bias=False)(h)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda h, y: jnp.tanh(0.5 * (h - h.mean()) + y), "`reduce_sum`"),
        (lambda h, y: jnp.tanh(_layer_norm(h) + y), "`reduce_sum`"),
        (
            lambda h, y: jnp.roll(0.5 * h, 1) + y,
            "new `state`\\[0\\] depend on neuron 3",
        ),
        (
            lambda h, y: 0.5 * h.reshape(2, 2).T.reshape(4) + y,
            "`transpose`.*depend on neuron",
        ),
        (lambda h, y: 0.5 * jnp.sort(h) + y, "`sort`"),
        (lambda h, y: 0.5 * jnp.cumsum(h) + y, "`cumsum`"),
    ],
    ids=["mean", "layernorm", "roll", "mixing-reshape", "sort", "cumsum"],
)
def test_tail_not_neuron_local(fn, match):
    with pytest.raises(etrace.EtraceError, match=f"not neuron-local.*{match}"):
        _compile(fn)


class Normalised(eqx.Module):
    """A GRU whose new state goes through `eqx.nn.LayerNorm`: not neuron-local."""

    cell: eqx.nn.GRUCell
    norm: eqx.nn.LayerNorm

    def __call__(self, x, h):
        h = self.norm(self.cell(x, h))  # the line the error must name
        return h, h


def test_errors_name_the_line_of_the_users_model():
    model = f64(Normalised(eqx.nn.GRUCell(3, 4, key=jr.key(0)), eqx.nn.LayerNorm(4)))
    line = Normalised.__call__.__code__.co_firstlineno + 1
    where = rf"test_errors\.py:{line} \(Normalised\.__call__\), inside "
    library = r"equinox/nn/_normalisation\.py:\d+ \(LayerNorm\.__call__\)"
    with pytest.raises(etrace.EtraceError, match=where + library):
        etrace.compile(model, jnp.zeros(3), state=jnp.zeros(4))


def test_neuron_local_layout_is_accepted():
    # A reshape and back, and per-neuron work on the reshaped view, stays local.
    learner, _ = _compile(
        lambda h, y: jnp.tanh(0.5 * h.reshape(2, 2) ** 2).reshape(4) + y
    )
    assert learner.graph.groups[0].n == 4


def test_control_flow_in_update_is_refused():
    def fn(h, y):
        return jax.lax.cond(h[0] > 0, lambda: 0.5 * h + y, lambda: h + y)

    with pytest.raises(etrace.EtraceError, match="Unsupported primitive `cond`"):
        _compile(fn)


def test_while_loop_in_update_is_refused():
    def fn(h, y):
        return jax.lax.fori_loop(0, 2, lambda i, c: 0.5 * c + y, h)

    with pytest.raises(
        etrace.EtraceError, match="Unsupported primitive `(while|scan)`"
    ):
        _compile(fn)


def test_state_dependent_index_is_refused():
    def fn(h, y):
        i = jnp.argmax(h)
        return 0.5 * jax.lax.dynamic_slice(jnp.concatenate([h, h]), (i,), (4,)) + y

    with pytest.raises(etrace.EtraceError, match="`dynamic_slice`.*static indices"):
        _compile(fn)


def test_group_leaves_of_different_size():
    class Odd(eqx.Module):
        w: jax.Array

        def __call__(self, x, s):
            a, b = s
            a = 0.5 * a + self.w @ x + b[:4]
            return a, (a, 0.5 * b + jnp.pad(a, (0, 4)))

    model = f64(Odd(jnp.ones((4, 3))))
    with pytest.raises(etrace.EtraceError, match="differ in size"):
        etrace.compile(model, jnp.zeros(3), state=(jnp.zeros(4), jnp.zeros(8)))


def _gru():
    model, state = build(GRUNet, 3, 4, 2, seed=0)
    learner, ts = etrace.compile(model, jnp.zeros(3), state=state)
    return model, state, learner, ts


def test_input_shape_mismatch_names_both_shapes():
    model, _, learner, ts = _gru()
    with pytest.raises(
        etrace.EtraceError, match=r"float64\[5\].*compiled for float64\[3\]"
    ):
        learner.step(model, ts, jnp.zeros(5))


def test_batched_input_without_vmap_explains_vmap():
    model, _, learner, ts = _gru()
    with pytest.raises(etrace.EtraceError, match=r"float64\[8, 3\].*jax.vmap"):
        learner.step(model, ts, jnp.zeros((8, 3)))


def test_input_dtype_mismatch():
    model, _, learner, ts = _gru()
    with pytest.raises(
        etrace.EtraceError, match=r"float32\[3\].*compiled for float64\[3\]"
    ):
        learner.step(model, ts, jnp.zeros(3, jnp.float32))


def test_input_structure_mismatch():
    model, _, learner, ts = _gru()
    match = r"input is a tuple of 1 \(an array float64\[3\]\), but .* for an array"
    with pytest.raises(etrace.EtraceError, match=match):
        learner.step(model, ts, (jnp.zeros(3),))
    # A Python list where an array was compiled: said so, and how to fix it.
    with pytest.raises(etrace.EtraceError, match=r"list of 3 numbers.*jnp.asarray"):
        learner.step(model, ts, [0.0, 1.0, 2.0])


def test_compile_explains_the_calling_convention():
    model, state = build(GRUNet, 3, 4, 2, seed=0)
    # A batched sample input, instead of one time step:
    match = r"(?s)failed with TypeError: dot_general.*model\(x, state\).*unbatched"
    with pytest.raises(etrace.EtraceError, match=match):
        etrace.compile(model, jnp.zeros((8, 3)), state=state)

    class OneArgument(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return self.w @ x

    with pytest.raises(
        etrace.EtraceError, match=r"(?s)takes 2 positional.*\(x, state\)"
    ):
        etrace.compile(OneArgument(jnp.ones((2, 3))), jnp.zeros(3), state=jnp.zeros(2))
    with pytest.raises(etrace.EtraceError, match=r"list of 3 numbers"):
        etrace.compile(model, [0.0, 1.0, 2.0], state=state)


def test_traces_from_another_algorithm():
    model, state = build(GRUNet, 3, 4, 2, seed=0)
    _, d_rtrl = etrace.compile(model, jnp.zeros(3), state=state)
    es, _ = etrace.compile(
        model, jnp.zeros(3), state=state, algorithm=etrace.ES_D_RTRL(decay=0.5)
    )
    match = r"do not fit this learner \(ES_D_RTRL\): the trace `cell.*compile`, `init`"
    with pytest.raises(etrace.EtraceError, match=match):
        es.step(model, d_rtrl, jnp.zeros(3))


def test_model_structure_mismatch():
    model, _, learner, ts = _gru()
    other, _ = build(GRUNet, 3, 5, 2, seed=0)
    with pytest.raises(
        etrace.EtraceError,
        match=r"different structure.*`cell.weight_ih`: float64\[15, 3\]",
    ):
        learner.step(other, ts, jnp.zeros(3))
    replaced = eqx.tree_at(lambda m: m.readout, model, eqx.nn.Identity())
    with pytest.raises(etrace.EtraceError, match="different structure"):
        learner.step(replaced, ts, jnp.zeros(3))


def test_model_dtype_mismatch_names_path():
    model, _, learner, ts = _gru()
    f32 = jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model
    )
    with pytest.raises(etrace.EtraceError, match="cell.weight_ih"):
        learner.step(f32, ts, jnp.zeros(3))


def test_missing_initial_state():
    model, _ = eqx.nn.make_with_state(GRUNet)(3, 4, 2, jr.key(0))
    with pytest.raises(etrace.EtraceError, match="(?s)make_with_state.*state=state"):
        etrace.compile(model, jnp.zeros(3))


def test_trace_state_from_another_learner():
    model, _, learner, _ = _gru()
    other, state = build(LSTMNet, 3, 4, 2, seed=1)
    _, foreign = etrace.compile(other, jnp.zeros(3), state=state)
    with pytest.raises(etrace.EtraceError, match="trace_state.state"):
        learner.step(model, foreign, jnp.zeros(3))
    wider, state = build(GRUNet, 3, 5, 2, seed=1)
    wide_learner, _ = etrace.compile(wider, jnp.zeros(3), state=state)
    with pytest.raises(etrace.EtraceError, match=r"State leaf `h` is float64\[5\]"):
        learner.step(model, wide_learner.init(), jnp.zeros(3))


def test_algorithm_must_be_an_instance():
    model, state = build(GRUNet, 3, 4, 2, seed=0)
    with pytest.raises(etrace.EtraceError, match="instantiate"):
        etrace.compile(model, jnp.zeros(3), state=state, algorithm=etrace.D_RTRL)


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_bad_batch_size(size):
    _, _, learner, _ = _gru()
    with pytest.raises(etrace.EtraceError, match="batch_size"):
        learner.init(batch_size=size)


def test_model_must_return_pair():
    class NoPair(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            return self.w @ x

    with pytest.raises(etrace.EtraceError, match="pair `\\(y, new_state\\)`"):
        etrace.compile(NoPair(jnp.ones((2, 3))), jnp.zeros(3), state=jnp.zeros(2))


def test_state_structure_must_be_kept():
    class Grows(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            return h, (h, self.w @ x)

    with pytest.raises(etrace.EtraceError, match="structure differs"):
        etrace.compile(Grows(jnp.ones((2, 3))), jnp.zeros(3), state=jnp.zeros(2))


def test_state_dtype_must_be_kept():
    class Casts(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            return h, (self.w @ x).astype(jnp.float32)

    with pytest.raises(etrace.EtraceError, match="State leaf `state` changes"):
        etrace.compile(Casts(jnp.ones((2, 3))), jnp.zeros(3), state=jnp.zeros(2))


def test_non_array_input():
    model, state = build(GRUNet, 3, 4, 2, seed=0)
    with pytest.raises(etrace.EtraceError, match="sample_input.*jnp.asarray"):
        etrace.compile(model, "abc", state=state)


def test_trace_of_errors():
    model, _, learner, ts = _gru()
    with pytest.raises(etrace.EtraceError, match="readout.weight.*no trace.*readout"):
        learner.trace_of(ts, lambda m: m.readout.weight)
    with pytest.raises(etrace.EtraceError, match="select one array"):
        learner.trace_of(ts, lambda m: m.cell)
    with pytest.raises(etrace.EtraceError, match="could not be applied"):
        learner.trace_of(ts, lambda m: m.nonexistent)


def test_sequence_errors():
    model, _, learner, ts = _gru()
    xs, ys = data(0, 4, 3, 2)
    with pytest.raises(etrace.EtraceError, match="same length"):
        etrace.online_grad(learner, mse, model, ts, xs, ys[:3])
    with pytest.raises(etrace.EtraceError, match=r"`mask` must have shape \(4,\)"):
        etrace.online_grad(learner, mse, model, ts, xs, ys, mask=jnp.ones(3))
    xb, yb = data(0, 4, 3, 2, batch=2)
    with pytest.raises(etrace.EtraceError, match="batch size 3.*`xs` has 2"):
        etrace.online_grad(learner, mse, model, learner.init(batch_size=3), xb, yb)

    @dataclasses.dataclass
    class Loss:  # eq=True makes it unhashable
        scale: float = 1.0

        def __call__(self, y, target):
            return self.scale * mse(y, target)

    with pytest.raises(etrace.EtraceError, match="`loss_fn`.*unhashable Loss"):
        etrace.online_grad(learner, Loss(), model, ts, xs, ys)
    with pytest.raises(etrace.EtraceError, match="`loss_fn`.*unhashable Loss"):
        etrace.bptt_grad(Loss(), model, ts.state, xs, ys)


def test_errors_survive_python_optimise_flag():
    # Errors are raised with `raise`, never `assert`, so `python -O` keeps them.
    import subprocess
    import sys

    code = (
        "import jax.numpy as jnp, equinox as eqx, etrace\n"
        "class M(eqx.Module):\n"
        "    w: object\n"
        "    def __call__(self, x, h):\n"
        "        h = jnp.roll(0.5 * h, 1) + self.w @ x\n"
        "        return h, h\n"
        "try:\n"
        "    etrace.compile(M(jnp.ones((3, 2))), jnp.zeros(2), state=jnp.zeros(3))\n"
        "except etrace.EtraceError:\n"
        "    print('raised')\n"
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True
    )
    assert out.stdout.strip() == "raised", out.stderr


def test_traces_of_another_algorithm_missing_a_read_trace():
    # D-RTRL keeps no trace for the spike; OSTL's full diagonal blocks read it.
    from .test_structure import SpikingLayer

    model, state = eqx.nn.make_with_state(SpikingLayer)(jax.random.key(0))
    x0 = jnp.zeros(3)
    _, ts = etrace.compile(model, x0, state=state)
    ostl, _ = etrace.compile(model, x0, state=state, algorithm=etrace.OSTLRecurrent())
    match = (
        r"do not fit this learner \(OSTLRecurrent\): the trace `synapses.*is \(None,"
    )
    with pytest.raises(etrace.EtraceError, match=match):
        ostl.step(model, ts, x0)
