"""The element-wise recurrent layers of `etrace.nn` (RGLRU, MinGRU, MinLSTM, ELSTM)
and the residual `Block`: their equations by hand, D-RTRL against BPTT on one layer
(exact) and on stacks (exact on top only)."""

import re
import warnings

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from hypothesis import assume, note

import etrace
import etrace.nn as enn
import etrace.testing as et

from ..helpers import data, f64, leaf_errors, mse, per_step_grads, sweep


CELLS = {
    "rglru": lambda n_in, n, key: enn.RGLRU(n_in, n, key=key),
    "mingru": lambda n_in, n, key: enn.MinGRU(n_in, n, key=key),
    "mingru-positive": lambda n_in, n, key: enn.MinGRU(n_in, n, positive=True, key=key),
    "minlstm": lambda n_in, n, key: enn.MinLSTM(n_in, n, key=key),
    "minlstm-raw": lambda n_in, n, key: enn.MinLSTM(
        n_in, n, normalise=False, positive=True, key=key
    ),
    "elstm": lambda n_in, n, key: enn.ELSTM(n_in, n, key=key),
}


def _step(cell, x, s):
    """`(output, state)` of one step; an ELSTM keeps only `c` as its state."""
    out = cell(x, s)
    return out if isinstance(out, tuple) else (out, out)


class OneLayer(eqx.Module):
    cell: eqx.Module
    readout: eqx.nn.Linear

    def __init__(self, kind, n_in, n, n_out, key):
        k1, k2 = jr.split(key)
        self.cell = CELLS[kind](n_in, n, k1)
        self.readout = eqx.nn.Linear(n, n_out, key=k2)

    def __call__(self, x, s):
        h, s = _step(self.cell, x, s)
        return self.readout(h), s


class TwoLayers(eqx.Module):
    l1: eqx.Module
    l2: eqx.Module
    readout: eqx.nn.Linear

    def __init__(self, kind, n_in, n, n_out, key):
        k1, k2, k3 = jr.split(key, 3)
        self.l1 = CELLS[kind](n_in, n, k1)
        self.l2 = CELLS[kind](n, n + 1, k2)
        self.readout = eqx.nn.Linear(n + 1, n_out, key=k3)

    def __call__(self, x, state):
        h1, s1 = _step(self.l1, x, state[0])
        h2, s2 = _step(self.l2, h1, state[1])
        return self.readout(h2), (s1, s2)


def _gates(cell, x, s):
    """Every gate of one step, as values in [0, 1] (a tanh mapped there)."""
    sig = jax.nn.sigmoid
    if isinstance(cell, enn.RGLRU):
        return [sig(cell.recurrence_gate(x)), sig(cell.input_gate(x))]
    if isinstance(cell, enn.MinGRU):
        return [sig(cell.gate(x))]
    if isinstance(cell, enn.MinLSTM):
        return [sig(cell.forget_gate(x)), sig(cell.input_gate(x))]
    f = sig(cell.forget_gate(x) + cell.w_f * s)
    z = jnp.tanh(cell.candidate(x) + cell.w_z * s)
    c = f * s + (1 - f) * z
    o = sig(cell.output_gate(jnp.concatenate([x, c])))
    return [f, (z + 1) / 2, o]


def _unsaturated(cells, model, state, xs):
    """The fraction of gate values in (0.05, 0.95) over the sequence, for each
    `(cell, inputs, previous states)` that `cells(model, xs, states)` lists."""

    def body(s, x):
        _, new = model(x, s)
        return new, s

    _, before = jax.lax.scan(body, state, xs)
    values = []
    for cell, inputs, states in cells(model, xs, before):
        for x, s in zip(inputs, states):
            values += [np.asarray(v) for v in _gates(cell, x, s)]
    values = np.concatenate(values)
    return float(np.mean((values > 0.05) & (values < 0.95)))


def _one_layer_cells(model, xs, states):
    return [(model.cell, xs, states)]


def _two_layer_cells(model, xs, states):
    s1, s2 = states
    h1 = [_step(model.l1, x, s)[0] for x, s in zip(xs, s1)]
    return [(model.l1, xs, s1), (model.l2, h1, s2)]


def _build(cls, kind, n_in, n, seed, length):
    model = f64(cls(kind, n_in, n, 2, jr.key(seed)))
    if cls is OneLayer:
        state = jnp.zeros(n)
    else:
        state = (jnp.zeros(n), jnp.zeros(n + 1))
    xs, ys = data(seed, length, n_in, 2)
    return model, state, xs, ys


# -- one layer: D-RTRL is exact -----------------------------------------------------


def _check_one_layer(kind, n_in, n, seed, length):
    model, state, xs, ys = _build(OneLayer, kind, n_in, n, seed, length)
    # Live: the gates are mostly away from 0 and 1, so every path carries gradient.
    live = _unsaturated(_one_layer_cells, model, state, xs)
    note(f"unsaturated gate fraction {live}")
    assert live >= 0.8
    assert et.liveness(model, xs, state=state).live
    learner, ts = etrace.compile(model, xs[0], state=state)
    assert et.exact_regime(etrace.D_RTRL(), learner)
    rows = et.assert_matches_bptt(learner, mse, model, ts, xs, ys)
    # Not vacuous: every parameter of the cell gets a gradient ...
    for path, row in rows.items():
        assert row[3] > 1e-8, path
    # ... and its history matters: the same rule with the traces reset every step
    # (only the immediate term) is wrong.
    exact, _ = etrace.bptt_grad(mse, model, state, xs, ys)
    truncated, _ = per_step_grads(learner, mse, model, ts, xs, ys, reset_traces=True)
    errors = leaf_errors(truncated.cell, exact.cell)
    assert max(errors.values()) > 1e-4


test_one_layer_d_rtrl_equals_bptt, test_one_layer_d_rtrl_equals_bptt_sweep = sweep(
    1,
    30,
    n_in=st.integers(1, 4),
    n=st.integers(1, 5),
    seed=st.integers(0, 10_000),
    length=st.integers(4, 9),
)(_check_one_layer)
test_one_layer_d_rtrl_equals_bptt = pytest.mark.parametrize("kind", list(CELLS))(
    test_one_layer_d_rtrl_equals_bptt
)
test_one_layer_d_rtrl_equals_bptt_sweep = pytest.mark.parametrize("kind", list(CELLS))(
    test_one_layer_d_rtrl_equals_bptt_sweep
)


# -- two layers: the top one is exact, the bottom one is not -------------------------


def _check_two_layers(kind, n_in, n, seed, length):
    model, state, xs, ys = _build(TwoLayers, kind, n_in, n, seed, length)
    live = _unsaturated(_two_layer_cells, model, state, xs)
    note(f"unsaturated gate fraction {live}")
    assert live >= 0.8
    if kind == "elstm":
        # The bottom output gate reaches the top state only through its weights.
        with pytest.warns(etrace.EtraceWarning, match=r"l1\.output_gate\.weight"):
            learner, ts = etrace.compile(model, xs[0], state=state)
    else:
        learner, ts = etrace.compile(model, xs[0], state=state)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert not regime
    for path, exact in regime.params.items():
        assert exact == (not path.startswith("l1.")), path
    rows = et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params=["l2", "readout"]
    )
    # The bottom layer's signal misses the top layer's memory: it must differ
    # wherever BPTT's bottom gradient is not zero.
    assume(rows["l1.linear.weight" if kind != "elstm" else "l1.w_f"][3] > 1e-8)
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params="l1")


test_two_layers_top_exact_bottom_differs, test_two_layers_sweep = sweep(
    1,
    20,
    n_in=st.integers(1, 4),
    n=st.integers(2, 4),
    seed=st.integers(0, 10_000),
    length=st.integers(4, 8),
)(_check_two_layers)
test_two_layers_top_exact_bottom_differs = pytest.mark.parametrize("kind", list(CELLS))(
    test_two_layers_top_exact_bottom_differs
)
test_two_layers_sweep = pytest.mark.parametrize("kind", list(CELLS))(
    test_two_layers_sweep
)


@pytest.mark.parametrize("kind", ["rglru", "elstm"])
def test_batched_online_gradient_equals_bptt(kind):
    # A batched trace state: the gradient of the batch-mean loss, exactly.
    model = f64(OneLayer(kind, 3, 4, 2, jr.key(3)))
    xs, ys = data(3, 7, 3, 2, batch=3)
    learner, _ = etrace.compile(model, xs[0, 0], state=jnp.zeros(4))
    ts = learner.init(batch_size=3)
    rows = et.assert_matches_bptt(learner, mse, model, ts, xs, ys)
    assert rows["cell.input_gate.weight" if kind == "rglru" else "cell.w_f"][3] > 1e-8
    # Not the gradient of one example: the batch is not a copy of it.
    single, _ = etrace.bptt_grad(mse, model, jnp.zeros(4), xs[:, 0], ys[:, 0])
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    assert max(leaf_errors(online, single).values()) > 1e-3


class ELSTMBothStates(eqx.Module):
    """An eLSTM whose state is `(h, c)`, as for `eqx.nn.LSTMCell`."""

    cell: enn.ELSTM
    readout: eqx.nn.Linear

    def __init__(self, n_in, n, n_out, key):
        k1, k2 = jr.split(key)
        self.cell = enn.ELSTM(n_in, n, key=k1)
        self.readout = eqx.nn.Linear(n, n_out, key=k2)

    def __call__(self, x, state):
        h, c = self.cell(x, state)
        return self.readout(h), (h, c)


def test_elstm_with_h_in_the_state_is_approximate():
    # Stored as a state, h_t reads the c_t of every unit through W_o: a recurrent
    # weight for the diagonal traces. Same data as the exact case, which passes.
    model = f64(ELSTMBothStates(3, 4, 2, jr.key(0)))
    xs, ys = data(0, 8, 3, 2)
    state = (jnp.zeros(4), jnp.zeros(4))
    learner, ts = etrace.compile(model, xs[0], state=state)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert not regime and "cell.output_gate.weight" in str(regime)
    et.assert_differs_from_bptt(
        learner, mse, model, ts, xs, ys, params="cell.forget_gate", rtol=1e-4
    )
    one = f64(OneLayer("elstm", 3, 4, 2, jr.key(0)))
    assert one.cell.w_f.shape == model.cell.w_f.shape
    learner, ts = etrace.compile(one, xs[0], state=jnp.zeros(4))
    et.assert_matches_bptt(learner, mse, one, ts, xs, ys)


# -- the equations by hand ----------------------------------------------------------


def _sigmoid(u):
    return 1 / (1 + np.exp(-u))


def _lin(layer, x):
    return np.asarray(layer.weight) @ x + np.asarray(layer.bias)


def _by_hand(cell, x, h):
    x, h = np.asarray(x), np.asarray(h)
    if isinstance(cell, enn.RGLRU):
        r = _sigmoid(_lin(cell.recurrence_gate, x))
        i = _sigmoid(_lin(cell.input_gate, x))
        a = _sigmoid(np.asarray(cell.lam)) ** (cell.c * r)
        return a * h + np.sqrt(1 - a**2) * (i * _lin(cell.linear, x))
    if isinstance(cell, enn.MinGRU):
        z = _sigmoid(_lin(cell.gate, x))
        cand = _lin(cell.linear, x)
        if cell.positive:
            cand = np.where(cand >= 0, cand + 0.5, _sigmoid(cand))
        return (1 - z) * h + z * cand
    if isinstance(cell, enn.MinLSTM):
        f = _sigmoid(_lin(cell.forget_gate, x))
        i = _sigmoid(_lin(cell.input_gate, x))
        if cell.normalise:
            f, i = f / (f + i), i / (f + i)
        cand = _lin(cell.linear, x)
        if cell.positive:
            cand = np.where(cand >= 0, cand + 0.5, _sigmoid(cand))
        return f * h + i * cand
    f = _sigmoid(_lin(cell.forget_gate, x) + np.asarray(cell.w_f) * h)
    z = np.tanh(_lin(cell.candidate, x) + np.asarray(cell.w_z) * h)
    c = f * h + (1 - f) * z
    o = _sigmoid(_lin(cell.output_gate, np.concatenate([x, c])))
    return o * c, c


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_by_hand(kind):
    cell = CELLS[kind](3, 6, jr.key(1))
    # Inputs large enough that the candidate takes both signs (both branches of g).
    x = 2.0 * jr.normal(jr.key(2), (3,))
    h = jr.normal(jr.key(3), (6,))
    got = cell(x, h)
    want = _by_hand(cell, x, h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
    if kind == "elstm":
        # (h, c) like eqx.nn.LSTMCell: the previous h is not read.
        h2, c2 = cell(x, (jnp.full(6, 7.0), h))
        np.testing.assert_allclose(np.asarray(h2), want[0], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(c2), want[1], rtol=1e-12)
    if kind.endswith("positive"):
        pre = np.asarray(cell.linear(x))
        assert (pre > 0).any() and (pre < 0).any()


def test_rglru_initial_decays_and_normalisation():
    cell = enn.RGLRU(2, 2000, a_min=0.8, a_max=0.95, key=jr.key(0))
    a_c = np.asarray(jax.nn.sigmoid(cell.lam)) ** cell.c
    assert 0.8 <= a_c.min() < 0.81 and 0.94 < a_c.max() <= 0.95
    # sqrt(1 - a^2) keeps the variance of h at that of i * x~ for white input: with
    # the gates fixed (zero weights, r = i = 1/2 from zero biases) and a white
    # candidate, Var h -> Var(i x~) whatever a.
    cell = enn.RGLRU(1, 3, a_min=0.5, a_max=0.99, key=jr.key(1))

    def zero(lin):
        return eqx.tree_at(
            lambda m: (m.weight, m.bias), lin, (0 * lin.weight, 0 * lin.bias)
        )

    cell = eqx.tree_at(
        lambda c: (c.recurrence_gate, c.input_gate),
        cell,
        (zero(cell.recurrence_gate), zero(cell.input_gate)),
    )
    cell = eqx.tree_at(lambda c: c.linear.weight, cell, jnp.ones((3, 1)))
    cell = eqx.tree_at(lambda c: c.linear.bias, cell, jnp.zeros(3))
    xs = jr.normal(jr.key(2), (20_000, 1))

    def body(h, x):
        h = cell(x, h)
        return h, h

    _, hs = jax.lax.scan(body, jnp.zeros(3), xs)
    np.testing.assert_allclose(np.var(np.asarray(hs[1000:]), axis=0), 0.25, rtol=0.1)


# -- a deep model: blocks with norms and gated MLPs ---------------------------------


def _deep(kind, width, key):
    k = jr.split(key, 6)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(3, width, key=k[0]),
            enn.Block(CELLS[kind](width, width, k[1]), key=k[2]),
            enn.Block(CELLS[kind](width, width, k[3]), gated=False, key=k[4]),
            eqx.nn.LayerNorm(width, use_weight=False, use_bias=False),
            eqx.nn.Linear(width, 2, key=k[5]),
        ]
    )


def _roles(learner):
    """`{path: role}` as `learner.summary()` prints them."""
    row = re.compile(r"^\s+(\S+)\s+\([\d, ]*\)\s+(\S+)")
    return {m[1]: m[2] for line in str(learner).splitlines() if (m := row.match(line))}


@pytest.mark.parametrize(
    "kind", ["rglru", pytest.param("elstm", marks=pytest.mark.slow)]
)
def test_deep_model_top_block_exact_lower_blocks_approximate(kind):
    model, state = eqx.nn.make_with_state(_deep)(kind, 4, jr.key(0))
    model, state = f64(model), f64(state)
    xs, ys = data(0, 8, 3, 2)
    assert et.liveness(model, xs, state=state).live
    with pytest.warns(etrace.EtraceWarning, match=r"layers\[0\]\.weight"):
        learner, ts = etrace.compile(model, xs[0], state=state)
    roles = _roles(learner)
    assert set(roles) == set(learner.compiled.layout.paths)
    for path, role in roles.items():
        in_cell = path.startswith(("layers[1].cell.", "layers[2].cell."))
        if in_cell and ".output_gate." not in path:
            want = {"matrix", "elementwise"}  # traced: the recurrent layers
        elif path.startswith(("layers[0].", "layers[1].")):
            want = {"one-step*"}  # below a recurrent layer: no trace
        else:
            want = {"one-step"}  # above the top state: an ordinary gradient
        assert role in want, (path, role)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    for path, exact in regime.params.items():
        assert exact == path.startswith(("layers[2].", "layers[4].")), path
    rows = et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params=["layers[2]", "layers[4]"]
    )
    assert all(rows[p][3] > 1e-8 for p in rows if p.startswith("layers[2].cell"))
    et.assert_differs_from_bptt(
        learner, mse, model, ts, xs, ys, params="layers[1].cell", rtol=1e-4
    )


def test_deep_model_trains_online():
    # Online training (Adam on each sequence's online gradient) of a small deep
    # model on a delayed copy, which needs memory: the loss falls well below that
    # of predicting zero, the best memoryless prediction.
    model, state = eqx.nn.make_with_state(_deep)("mingru", 8, jr.key(0))
    xs = jr.normal(jr.key(1), (60, 3))
    ys = jnp.roll(xs[:, :2], 2, axis=0).at[:2].set(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        learner, _ = etrace.compile(model, xs[0], state=state)
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def epoch(model, opt_state):
        grads, _, losses = etrace.online_grad(
            learner, mse, model, learner.init(), xs, ys
        )
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, losses.mean()

    for _ in range(25):
        model, opt_state, loss = epoch(model, opt_state)
    zero = float(jnp.mean(jax.vmap(mse)(jnp.zeros_like(ys), ys)))
    assert float(loss) < 0.85 * zero


# -- argument errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: enn.RGLRU(2, 3, a_min=0.99, a_max=0.9, key=jr.key(0)),
            r"0 < a_min <= a_max < 1.*a_min=0.99",
        ),
        (
            lambda: enn.RGLRU(2, 3, a_max=1.0, key=jr.key(0)),
            r"0 < a_min <= a_max < 1",
        ),
        (lambda: enn.RGLRU(2, 3, c=0.0, key=jr.key(0)), r"`c` must be a number > 0"),
        (lambda: enn.MinGRU(0, 3, key=jr.key(0)), r"`input_size` must be an int"),
        (lambda: enn.MinLSTM(2, 0, key=jr.key(0)), r"`hidden_size` must be an int"),
        (lambda: enn.ELSTM(2, -1, key=jr.key(0)), r"`hidden_size` must be an int"),
        (
            lambda: enn.Block(enn.MinGRU(3, 4, key=jr.key(0)), key=jr.key(1)),
            r"`input_size == hidden_size`.*MinGRU with input_size=3, hidden_size=4",
        ),
        (
            lambda: enn.Block(eqx.nn.Linear(3, 3, key=jr.key(0)), key=jr.key(1)),
            r"`input_size == hidden_size`.*Linear",
        ),
        (
            lambda: enn.Block(
                enn.RGLRU(3, 3, key=jr.key(0)), expansion=0, key=jr.key(1)
            ),
            r"`expansion` must be an int >= 1",
        ),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(etrace.EtraceError, match=match):
        make()
