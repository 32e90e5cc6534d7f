"""The learner API: jit, vmap, grad, scan, serialisation, state handling."""

import io
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest

import etrace

from .helpers import (
    ALIFNet,
    all_eqns,
    build,
    data,
    f64,
    GRUNet,
    leaf_errors,
    LIFNet,
    LSTMNet,
    mse,
    per_step_grads,
    tree_allclose,
)


FAMILIES = [GRUNet, LSTMNet, ALIFNet]


@pytest.mark.parametrize("family", FAMILIES)
def test_online_grad_equals_loop_of_step_gradients(family):
    model, state = build(family, 3, 4, 2, seed=1)
    xs, ys = data(1, 6, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    scanned, ts_scan, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    looped, ts_loop = per_step_grads(learner, mse, model, ts, xs, ys)
    assert tree_allclose(scanned, looped)
    assert tree_allclose(ts_scan, ts_loop)
    # ... and the traces matter: resetting them every step changes the result.
    truncated, _ = per_step_grads(learner, mse, model, ts, xs, ys, reset_traces=True)
    assert not tree_allclose(scanned, truncated, rtol=1e-6)


class _ClipTraces(etrace.AbstractWrappedAlgorithm):
    """D-RTRL with its traces clipped: a wrapper that replaces the update, whose
    `init` keeps canonical (not turned) traces."""

    inner: etrace.AbstractAlgorithm

    def update(self, graph, traces, jac):
        new = self.inner.update(graph, traces, jac)
        return jax.tree.map(lambda t: jnp.clip(t, -1e3, 1e3), new)


@pytest.mark.parametrize(
    "algorithm",
    [
        etrace.ES_D_RTRL(decay=0.6),
        etrace.OTTT(decay=0.7),
        etrace.D_RTRL(),
        etrace.EProp(),
        _ClipTraces(etrace.D_RTRL()),
    ],
    ids=["es_d_rtrl", "ottt", "d_rtrl", "eprop", "clipped_d_rtrl"],
)
@pytest.mark.parametrize("batch", [None, 3])
def test_online_grad_sums_gradients_formed_transposed_as_transposes(algorithm, batch):
    # `online_grad` sums as its transpose the gradient of a matrix that the
    # read-out forms transposed (D-RTRL's, of a weight whose trace is stored
    # turned), and every other in the parameter's layout (an outer-product
    # read-out's too). The sum it hands back is the one of the step gradients in
    # the parameter's layout.
    from etrace._sequence import _turned_sums, _zeros_like_grads

    model, state = build(GRUNet, 3, 4, 2, seed=5)
    xs, ys = data(5, 6, 3, 2, batch=batch)
    x0 = xs[0] if batch is None else xs[0, 0]
    learner, _ = etrace.compile(model, x0, state=state, algorithm=algorithm)
    turned = _turned_sums(learner, _zeros_like_grads(model))
    outer = isinstance(algorithm, (etrace.ES_D_RTRL, etrace.OTTT))
    # weight_ih (12, 3) and weight_hh (12, 4) are tall; the readout (2, 4) is not.
    # D-RTRL (and e-prop without a filter, whose traces are D-RTRL's) stores the
    # trace of weight_ih turned (3 inputs, 12 >= 4 * 3 outputs), not weight_hh's
    # (12 < 4 * 4); the wrapper that replaces the update keeps both canonical.
    diagonal_turned = isinstance(algorithm, (etrace.D_RTRL, etrace.EProp))
    assert turned.cell.weight_ih is diagonal_turned
    assert turned.cell.weight_hh is False
    assert turned.readout.weight is False and turned.cell.bias is False
    (unit,) = [u for u in learner.graph.units if u.name.startswith("cell.weight_ih")]
    stored = learner.init().traces[unit.name]
    b, w, f, c = unit.shape
    if not outer:  # the turned sums follow the stored layout
        assert (
            any(eps is not None and eps.shape == (b, c, w, f) for eps in stored)
            is diagonal_turned
        )

    ts = learner.init(batch_size=batch)
    total, _ = per_step_grads(learner, mse, model, ts, xs, ys)
    scanned, _, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=batch), xs, ys
    )
    assert jtu.tree_structure(scanned) == jtu.tree_structure(total)
    assert tree_allclose(scanned, total)
    # ... and the comparison has something to compare: the turned sums are not zero.
    assert float(jnp.abs(scanned.cell.weight_ih).min()) > 0
    assert float(jnp.abs(scanned.cell.weight_hh).max()) > 0


@pytest.mark.parametrize(
    "w, c, turned",
    [(24, 3, True), (12, 12, False), (5, 9, False), (64, 16, True), (63, 16, False)],
)
def test_outer_product_sum_equals_the_plain_product(w, c, turned):
    # On the CPU the batch sum of outer products is formed turned and transposed
    # (a short last axis) or with its left operand transposed first (any other):
    # both equal the plain sum of per-example outer products, in the parameter's
    # layout, and `turned=True` gives the transpose.
    from etrace import _kernels

    a = jr.normal(jr.key(2), (7, 1, w, 2))
    b = jr.normal(jr.key(3), (7, 1, 2, c))
    plain = jnp.einsum("nbwf,nbfc->bwc", a, b)
    assert (c <= _kernels.TURNED_INPUTS and w >= 4 * c) is turned
    for f in (_kernels.outer_product_sum, jax.jit(_kernels.outer_product_sum)):
        assert tree_allclose(f(a, b), plain)
    turned_sum = _kernels.outer_product_sum(a, b, turned=True)
    assert tree_allclose(turned_sum, jnp.swapaxes(plain, 1, 2))
    # A negative control: the sum left without its second factor's column order.
    assert not tree_allclose(plain, jnp.einsum("nbwf,nbfc->bwc", a, b[..., ::-1]))


def test_weight_turned_for_the_product_gives_the_same_product():
    # `W @ x` with `W` contracted on its last axis is evaluated with `W` turned,
    # `(i, m)`, contracted on its first; other products are left alone.
    from etrace import _ir, _kernels

    w = jr.normal(jr.key(0), (5, 3))
    x = jr.normal(jr.key(1), (3,))
    for fn, args, w_pos in [
        (lambda w, x: w @ x, (w, x), 0),
        (lambda x, w: jax.lax.dot_general(x, w, (((0,), (1,)), ((), ()))), (x, w), 1),
    ]:
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
        (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
        ir = _ir.Eqn(eqn.primitive, (), (), dict(eqn.params), "")
        turned, operands = _kernels.with_weight_turned(ir, list(args), w_pos)
        assert operands[w_pos].shape == (3, 5)  # stored turned
        want = _ir.bind(ir, *args)[0]
        got = _ir.bind(turned, *operands)[0]
        assert jnp.allclose(got, want, rtol=1e-6)
        # Negative control: the turned weight does not fit the old contraction.
        with pytest.raises(TypeError):
            _ir.bind(ir, *operands)
    # Contracted on its first axis already (`x @ W`): unchanged.
    jaxpr = jax.make_jaxpr(lambda x, w: x @ w)(jnp.ones(5), w).jaxpr
    (eqn,) = jaxpr.eqns
    ir = _ir.Eqn(eqn.primitive, (), (), dict(eqn.params), "")
    same, operands = _kernels.with_weight_turned(ir, [jnp.ones(5), w], 1)
    assert same is ir and operands[1] is w


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU only; else identity")
def test_fused_is_exact_and_kept_by_xla():
    from etrace._kernels import fused

    x = jnp.array([1.5, -0.0, jnp.inf, -jnp.inf, jnp.nan, 5e-324, -3.25])
    got = jax.jit(fused)(x)
    # Bit for bit the same (the NaN included), as a multiply by one must be.
    assert bool(
        jnp.all(
            jax.lax.bitcast_convert_type(got, jnp.int64)
            == jax.lax.bitcast_convert_type(x, jnp.int64)
        )
    )

    # XLA keeps the multiply: the one comes out of a barrier, not a constant it
    # could fold away. (Negative control: a plain `x * 1.0` leaves no multiply.)
    def multiplies(fn, a):
        text = jax.jit(fn).lower(a).compile().as_text()
        return text.count(" multiply(")

    assert multiplies(lambda a: fused(a) + a, x) >= 1
    assert multiplies(lambda a: a * 1.0 + a, x) == 0


def test_fused_multiplies_on_cpu_only():
    # The platform is chosen when the program is lowered: exported for a GPU
    # (which needs none here), `fused` is `a` itself, for the CPU a multiply.
    from jax import export

    from etrace._kernels import fused

    def multiplies(platform: str) -> int:
        fn = jax.jit(lambda a: fused(a) + a)
        text = export.export(fn, platforms=[platform])(jnp.ones(3)).mlir_module()
        return text.count("stablehlo.multiply")

    assert multiplies("cpu") == 1
    assert multiplies("cuda") == 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's kernels")
def test_online_grad_sums_gradients_in_kernels_of_more_than_one_add():
    # Each running sum of `online_grad` is fused with a multiply by a kept one:
    # XLA on CPU runs a kernel of one lone add several times slower. The compiled
    # loop then has no `wrapped_add` kernel of a weight's shape (negative control:
    # the same sum without `fused` compiles to one).
    model, state = build(GRUNet, 3, 6, 2, seed=1)
    xs, ys = data(1, 4, 3, 2, batch=5)
    algorithm = etrace.ES_D_RTRL(decay=0.5)
    learner, _ = etrace.compile(model, xs[0, 0], state=state, algorithm=algorithm)
    ts = learner.init(batch_size=5)
    compiled = jax.jit(lambda m: etrace.online_grad(learner, mse, m, ts, xs, ys)[0])
    weights = {"f64[18,6]", "f64[6,18]", "f64[18,3]", "f64[3,18]", "f64[2,6]"}

    def lone_adds(text: str) -> list[str]:  # result shapes of `wrapped_add` kernels
        return re.findall(r"%wrapped_add[\w.]* = (\w+\[[\d,]*\])", text)

    assert not weights & set(lone_adds(compiled.lower(model).compile().as_text()))

    def plain(total, g):
        return jax.lax.scan(lambda s, x: (s + x.T @ x, None), total, g)[0]

    text = jax.jit(plain).lower(jnp.zeros((18, 18)), jnp.ones((3, 6, 18))).compile()
    assert "f64[18,18]" in lone_adds(text.as_text())


def _turned_weights(fn, *args) -> int:
    """How many matrices `fn`'s program passes through an `optimization_barrier`
    (a weight turned, which XLA hoists out of a loop; the scalar ones that keep
    element-wise kernels fused are not counted)."""
    return sum(
        sum(jnp.ndim(v.aval) >= 2 for v in e.invars)
        for e in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
        if e.primitive.name == "optimization_barrier"
    )


def test_both_paths_turn_the_weights_they_multiply_cut():
    # The step turns each weight it multiplies cut from the gradient, whichever
    # driver runs it: `online_grad`'s scan and `learner.step` alone run the same
    # step (the fast path is the public one).
    model, state = build(GRUNet, 3, 4, 2, seed=3)
    xs, ys = data(3, 5, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)

    def scanned(model, ts, xs, ys):
        return etrace.online_grad(learner, mse, model, ts, xs, ys)[0]

    def stepped(model, ts, x):
        return learner.step(model, ts, x)[0]

    assert _turned_weights(scanned, model, ts, xs, ys) == 2  # weight_ih, weight_hh
    assert _turned_weights(stepped, model, ts, xs[0]) == 2

    # The turn is made for the CPU only, where it was measured faster: lowered
    # for a GPU (exported; no GPU needed), no matrix passes through a barrier.
    from jax import export

    def lowered_turns(platform: str) -> int:
        fn = jax.jit(lambda m: scanned(m, ts, xs, ys))
        text = export.export(fn, platforms=[platform])(model).mlir_module()
        return len(re.findall(r"optimization_barrier[^\n]*tensor<\d+x\d+x", text))

    assert lowered_turns("cpu") == 2
    assert lowered_turns("cuda") == 0


class _PreActivationOut(eqx.Module):
    """A recurrent layer whose output can also read its pre-activation, a
    same-step path around the state through the weight."""

    w: jax.Array
    read_pre: bool = eqx.field(static=True)

    def __call__(self, x, h):
        pre = self.w @ jnp.concatenate([x, h])
        h = jnp.tanh(pre)
        return (pre[:2] + h[:2]) if self.read_pre else h[:2], h


@pytest.mark.parametrize("read_pre", [False, True])
def test_a_product_also_read_live_is_not_turned(read_pre):
    # The product of a site whose output is also read with the weight live stays
    # as written (XLA then computes it once for both reads); the gradients are
    # the per-step loop's either way.
    model = _PreActivationOut(0.5 * jr.normal(jr.key(0), (4, 7)), read_pre)
    xs, ys = data(4, 6, 3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner, ts = etrace.compile(model, xs[0], state=jnp.zeros(4))
    turned = _turned_weights(
        lambda m: etrace.online_grad(learner, mse, m, ts, xs, ys)[0], model
    )
    assert turned == (0 if read_pre else 1)
    scanned, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    looped, _ = per_step_grads(learner, mse, model, ts, xs, ys)
    assert tree_allclose(scanned, looped)
    assert float(jnp.abs(scanned.w).max()) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_vmap_equals_per_example_loop(family):
    batch = 3
    model, state = build(family, 3, 4, 2, seed=2)
    xs, ys = data(2, 5, 3, 2, batch=batch)
    learner, _ = etrace.compile(model, xs[0, 0], state=state)
    grads, ts_b, losses = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=batch), xs, ys
    )
    total = None
    for b in range(batch):
        g, ts, _ = etrace.online_grad(
            learner, mse, model, learner.init(), xs[:, b], ys[:, b]
        )
        total = g if total is None else jtu.tree_map(jnp.add, total, g)
        assert tree_allclose(jtu.tree_map(lambda a: a[b], ts_b), ts)
    assert tree_allclose(grads, jtu.tree_map(lambda a: a / batch, total))
    assert losses.shape == (5,)


def test_jit_equals_eager():
    model, state = build(GRUNet, 3, 4, 2, seed=3)
    xs, ys = data(3, 2, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)

    def loss(m, ts, x, y):
        out, ts = learner.step(m, ts, x)
        return mse(out, y), ts

    grad = eqx.filter_grad(loss, has_aux=True)
    eager = grad(model, ts, xs[0], ys[0])
    jitted = eqx.filter_jit(grad)(model, ts, xs[0], ys[0])
    assert tree_allclose(eager, jitted)


def test_no_recompile_across_steps_and_parameter_values():
    model, state = build(GRUNet, 3, 4, 2, seed=4)
    xs, ys = data(4, 4, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def train_step(m, ts, x, y):
        def loss(m):
            out, ts2 = learner.step(m, ts, x)
            return mse(out, y), ts2

        g, ts = eqx.filter_grad(loss, has_aux=True)(m)
        return eqx.apply_updates(m, jtu.tree_map(lambda a: -0.1 * a, g)), ts

    for x, y in zip(xs, ys):
        model, ts = train_step(model, ts, x, y)
    assert int(ts.t) == 4


def test_chunked_run_equals_one_run():
    model, state = build(ALIFNet, 3, 5, 2, seed=5)
    xs, ys = data(5, 8, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    whole, ts_whole, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    first, ts_mid, _ = etrace.online_grad(learner, mse, model, ts, xs[:3], ys[:3])
    second, ts_end, _ = etrace.online_grad(learner, mse, model, ts_mid, xs[3:], ys[3:])
    assert tree_allclose(whole, jtu.tree_map(jnp.add, first, second))
    assert tree_allclose(ts_whole, ts_end)


def test_serialise_and_resume():
    model, state = build(GRUNet, 3, 4, 2, seed=6)
    xs, ys = data(6, 6, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    _, ts_mid, _ = etrace.online_grad(learner, mse, model, ts, xs[:3], ys[:3])
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, ts_mid)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, learner.init())
    a = etrace.online_grad(learner, mse, model, ts_mid, xs[3:], ys[3:])
    b = etrace.online_grad(learner, mse, model, restored, xs[3:], ys[3:])
    assert jtu.tree_all(jtu.tree_map(lambda x, y: bool(jnp.all(x == y)), a, b))


def test_zero_mask_gives_zero_gradients_but_advances_state():
    model, state = build(LIFNet, 3, 5, 2, seed=7)
    xs, ys = data(7, 5, 3, 2, scale=3.0)
    learner, ts = etrace.compile(model, xs[0], state=state)
    grads, ts_end, _ = etrace.online_grad(
        learner, mse, model, ts, xs, ys, mask=jnp.zeros(5)
    )
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jtu.tree_leaves(grads))
    assert int(ts_end.t) == 5
    assert float(jnp.max(jnp.abs(ts_end.state))) > 0
    warm = jnp.array([0.0, 0.0, 1.0, 1.0, 1.0])
    masked, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, mask=warm)
    exact, _ = etrace.bptt_grad(mse, model, state, xs, ys, mask=warm)
    assert max(leaf_errors(masked, exact).values()) <= 1e-9


def test_eqx_state_is_not_invalidated():
    model, state = build(GRUNet, 3, 4, 2, seed=8)
    x = jnp.ones(3)
    learner, ts = etrace.compile(model, x, state=state)
    learner.step(model, ts, x)
    etrace.bptt_grad(mse, model, state, x[None], jnp.ones((1, 2)))
    model(x, state)  # still usable: raises if `state` had been invalidated


def test_default_state_from_model_with_state_index():
    class Net(eqx.Module):
        cell: eqx.nn.GRUCell
        h: eqx.nn.StateIndex

        def __init__(self, key):
            self.cell = eqx.nn.GRUCell(2, 3, key=key)
            self.h = eqx.nn.StateIndex(jnp.zeros(3))

        def __call__(self, x, state):
            h = self.cell(x, state.get(self.h))
            return h, state.set(self.h, h)

    model = f64(Net(jr.key(0)))
    model = eqx.tree_at(lambda m: m.h, model, eqx.nn.StateIndex(jnp.zeros(3)))
    learner, ts = etrace.compile(model, jnp.zeros(2))
    assert [g.name for g in learner.graph.groups] == ["h"]
    y, ts = learner.step(model, ts, jnp.ones(2))
    assert y.shape == (3,)
    # StateIndex initial values are never parameters.
    (line,) = [ln for ln in learner.summary().splitlines() if "h.init" in ln]
    assert "state init" in line and "matrix" not in line


def test_init_reset_and_trace_of():
    model, state = build(LSTMNet, 3, 4, 2, seed=9)
    xs, ys = data(9, 3, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    _, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    traces = learner.trace_of(ts, lambda m: m.cell.weight_hh)
    ((group, trace),) = traces.items()
    assert group == "state[0]+state[1]"
    # One (B, Fw, Fx, C) array per state of the LSTM's neurons (h and c), but
    # none for h: its previous value reaches the cell only through `weight_hh`,
    # so no state's own update reads it.
    h, c = trace
    assert h is None and c.shape == (1, 16, 1, 4)
    assert float(jnp.max(jnp.abs(c))) > 0
    assert "no trace kept for state[0]: the update reads its previous value" in (
        learner.summary()
    )
    fresh = learner.reset(ts)
    assert int(fresh.t) == 0
    assert all(float(jnp.max(jnp.abs(a))) == 0 for a in jtu.tree_leaves(fresh.traces))
    batched = learner.init(batch_size=2)
    assert batched.t.shape == (2,)
    assert learner.reset(batched).t.shape == (2,)
    assert jtu.tree_structure(learner.reset(batched)) == jtu.tree_structure(batched)


def test_summary_lists_roles_and_groups():
    model, state = build(GRUNet, 3, 4, 2, seed=10)
    learner, _ = etrace.compile(model, jnp.zeros(3), state=state)
    text = str(learner)
    for needle in (
        "cell.weight_ih",
        "matrix",
        "elementwise",
        "readout.weight",
        "one-step",
        "h: N=4 neurons, K=1",
        "bytes/example",
    ):
        assert needle in text


class Encoded(eqx.Module):
    """An MLP encoder before a leaky recurrent layer: the encoder is one-step."""

    encoder: eqx.nn.MLP
    w: eqx.nn.Linear
    decay: jax.Array
    readout: eqx.nn.MLP

    def __init__(self, key):
        k = jr.split(key, 4)
        self.encoder = eqx.nn.MLP(3, 4, 5, 1, key=k[0])
        self.w = eqx.nn.Linear(4, 5, key=k[1])
        self.decay = jr.normal(k[2], (5,))
        self.readout = eqx.nn.MLP(5, 2, 6, 1, key=k[3])

    def __call__(self, x, h):
        h = jax.nn.sigmoid(self.decay) * h + self.w(self.encoder(x))
        return self.readout(h), h


def test_weights_behind_another_weight_are_one_step_with_warning():
    model = f64(Encoded(jr.key(11)))
    with pytest.warns(etrace.EtraceWarning, match="encoder.layers\\[0\\].weight"):
        learner, ts = etrace.compile(model, jnp.zeros(3), state=jnp.zeros(5))
    text = learner.summary()
    assert "one-step*" in text and "only through another weight op" in text
    xs, ys = data(11, 6, 3, 2)
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    exact, _ = etrace.bptt_grad(mse, model, jnp.zeros(5), xs, ys)
    errors = leaf_errors(online, exact)
    # The recurrent layer and the MLP readout are exact; the encoder is one-step.
    for name in (".w.weight", ".w.bias", ".decay", ".readout.layers[0].weight"):
        assert errors[name] <= 1e-9, (name, errors)
    assert errors[".encoder.layers[0].weight"] > 1e-6


def test_one_step_gradient_of_encoder_is_the_same_step_gradient():
    model = f64(Encoded(jr.key(12)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        learner, ts = etrace.compile(model, jnp.zeros(3), state=jnp.zeros(5))
    xs, ys = data(12, 1, 3, 2)
    online, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    exact, _ = etrace.bptt_grad(mse, model, jnp.zeros(5), xs, ys)
    # With one step there is no history: every parameter is exact.
    assert max(leaf_errors(online, exact).values()) <= 1e-9


def test_gradients_are_model_shaped_and_work_with_optax():
    optax = pytest.importorskip("optax")
    model, state = build(GRUNet, 3, 4, 2, seed=13)
    xs, ys = data(13, 4, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    grads, _, losses = etrace.online_grad(learner, mse, model, ts, xs, ys)
    params = eqx.filter(model, eqx.is_inexact_array)
    assert jtu.tree_structure(grads) == jtu.tree_structure(params)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    updates, _ = opt.update(grads, opt_state, params)
    new = eqx.apply_updates(model, updates)
    after, _, losses2 = etrace.online_grad(learner, mse, new, ts, xs, ys)
    assert float(losses2.sum()) < float(losses.sum())


def test_pytree_input_and_output():
    class Two(eqx.Module):
        a: eqx.nn.Linear
        b: eqx.nn.Linear

        def __call__(self, x, h):
            h = 0.5 * h + self.a(x["u"]) + self.b(x["v"])
            return {"h": h, "sum": jnp.sum(h)}, h

    model = f64(
        Two(eqx.nn.Linear(2, 3, key=jr.key(0)), eqx.nn.Linear(1, 3, key=jr.key(1)))
    )
    x0 = {"u": jnp.zeros(2), "v": jnp.zeros(1)}
    learner, ts = etrace.compile(model, x0, state=jnp.zeros(3))
    xs = {"u": jr.normal(jr.key(2), (5, 2)), "v": jr.normal(jr.key(3), (5, 1))}
    ys = jr.normal(jr.key(4), (5,))

    def loss(y, t):
        return (y["sum"] - t) ** 2 + jnp.sum(y["h"] ** 2)

    online, _, _ = etrace.online_grad(learner, loss, model, ts, xs, ys)
    exact, _ = etrace.bptt_grad(loss, model, jnp.zeros(3), xs, ys)
    assert max(leaf_errors(online, exact).values()) <= 1e-9


def test_compare_reports_per_parameter():
    model, state = build(GRUNet, 3, 4, 2, seed=14)
    xs, ys = data(14, 5, 3, 2)
    learner, ts = etrace.compile(model, xs[0], state=state)
    result = etrace.compare(learner, mse, model, ts, xs, ys)
    err, cos, _, _ = result.rows["readout.weight"]
    assert err <= 1e-9 and abs(cos - 1) <= 1e-9
    err, cos, _, _ = result.rows["cell.weight_hh"]
    assert err > 1e-6 and 0.5 < cos < 1
    assert "cell.weight_hh" in str(result)
