"""Weight operators beyond a dense matmul: convolutions, einsum/batched products,
embedding look-ups, masked and low-rank weights; and the refusals."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace
import etrace.testing as et

from ..helpers import mse, rel_err


def _live(model, state, xs):
    rate = et.liveness(model, xs, state=state)
    assert rate.live, rate


def _check_exact(model, state, xs, ys, algorithm=None, params=None):
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    return learner, et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params=params
    )


def _check_differs(model, state, xs, ys, algorithm=None, params=None):
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
    return et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params=params)


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


# --------------------------------------------------------------------------------
# Convolutions.


class ConvLIF(eqx.Module):
    """A convolutional layer of LIF neurons, one per channel and position, with a
    stateless readout: D-RTRL's exact regime."""

    conv: eqx.nn.Conv1d
    lif: etrace.nn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key, c_in=2, c_out=3, length=6):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv1d(c_in, c_out, 3, padding=1, key=k1)
        self.lif = etrace.nn.LIF(c_out * length, tau=4.0, threshold=0.4)
        self.readout = eqx.nn.Linear(c_out * length, 2, key=k2)

    def __call__(self, x, state):
        z, state = self.lif(self.conv(x).reshape(-1), state)
        return self.readout(z), state


class RecurrentConvLIF(ConvLIF):
    """As `ConvLIF`, but the convolution also reads the previous spikes."""

    def __call__(self, x, state):
        previous = self.lif.spikes(state).reshape(-1, x.shape[-1])
        z, state = self.lif(self.conv(x + previous[:2]).reshape(-1), state)
        return self.readout(z), state


def _conv_problem(cls, seed=0, length=7):
    model, state = eqx.nn.make_with_state(cls)(jax.random.key(seed))
    xs = _normal(seed + 1, (length, 2, 6), 1.5)
    ys = _normal(seed + 2, (length, 2))
    return model, state, xs, ys


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_lif_layer_d_rtrl_equals_bptt(seed):
    model, state, xs, ys = _conv_problem(ConvLIF, seed)
    _live(model, state, xs)
    learner, _ = _check_exact(model, state, xs, ys)
    (unit,) = [u for u in learner.graph.units if u.site.op == "conv_general_dilated"]
    # Weight sharing: the kernel (3 out, 2 in, width 3) is traced at every one of
    # the 6 positions: (B, Fw, Fx, C, K) = (1, 3, 6, 2 * 3, 2).
    assert unit.shape + (unit.k,) == (1, 3, 6, 6, 2)


def test_recurrent_conv_lif_layer_differs_from_bptt():
    model, state, xs, ys = _conv_problem(RecurrentConvLIF, 3)
    _live(model, state, xs)
    _check_differs(model, state, xs, ys, params="conv.weight")
    # RTRL keeps the paths through the recurrent convolution.
    _check_exact(model, state, xs, ys, algorithm=etrace.RTRL())


class LeakyConv2d(eqx.Module):
    conv: eqx.nn.Conv2d
    decay: jax.Array
    readout: eqx.nn.Linear

    def __init__(self, key, **kwargs):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(4, 6, 3, key=k1, **kwargs)
        self.decay = jnp.array(0.3)  # one decay shared by every neuron
        n = 6 * 3 * 3
        self.readout = eqx.nn.Linear(n, 2, key=k2)

    def __call__(self, x, h):
        h = jax.nn.sigmoid(self.decay) * h + jnp.tanh(self.conv(x))
        return self.readout(h.reshape(-1)), h


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=2, padding=1, groups=2),
        dict(padding=2, dilation=2, groups=1),
        dict(stride=(1, 2), padding=((1, 1), (0, 2)), groups=2),
    ],
)
def test_conv2d_strides_dilations_groups_equal_bptt(kwargs):
    model = LeakyConv2d(jax.random.key(1), **kwargs)
    xs = _normal(2, (5, 4, 5, 5))
    h0 = jnp.zeros(model.conv(xs[0]).shape)
    if h0.shape != (6, 3, 3):
        model = eqx.tree_at(
            lambda m: m.readout,
            model,
            eqx.nn.Linear(h0.size, 2, key=jax.random.key(3)),
        )
    ys = _normal(4, (5, 2))
    learner, _ = _check_exact(model, h0, xs, ys)
    (unit,) = [u for u in learner.graph.units if u.site.op == "conv_general_dilated"]
    groups = kwargs["groups"]
    assert (unit.site.b, unit.site.fw, unit.site.c) == (
        groups,
        6 // groups,
        36 // groups,
    )
    assert unit.site.fx == h0[0].size


class LinearConv(eqx.Module):
    conv: eqx.nn.Conv1d

    def __call__(self, x, h):
        h = 0.5 * h + self.conv(x)
        return h.sum(), h


def _hand_patches(x, width=3, pad=1):
    """`(P, C * width)` patches of a `(C, L)` signal, channel-major."""
    c, length = x.shape
    xp = np.pad(np.asarray(x), ((0, 0), (pad, pad)))
    return np.stack(
        [xp[:, p : p + width].reshape(-1) for p in range(length)]
    )  # (P, C*width)


def test_conv_traces_equal_the_equations_by_hand():
    conv = eqx.nn.Conv1d(2, 3, 3, padding=1, use_bias=False, key=jax.random.key(0))
    model, xs = LinearConv(conv), _normal(1, (4, 2, 5))
    h0 = jnp.zeros((3, 5))
    # D-RTRL: eps[o, p, c] = 0.5 eps + patch[p, c] (D = 0.5, Df = 1).
    learner, ts = etrace.compile(model, xs[0], state=h0)
    eps = np.zeros((5, 6))
    for x in xs:
        _, ts = learner.step(model, ts, x)
        eps = 0.5 * eps + _hand_patches(x)
    (got,) = learner.trace_of(ts, lambda m: m.conv.weight)["state"]  # K = 1
    assert got.shape == (1, 3, 5, 6)
    for o in range(3):
        np.testing.assert_allclose(got[0, o], eps, rtol=1e-12)
    assert np.abs(eps).max() > 0.1
    # ES-D-RTRL, factorised: ex = a ex + patches, ef = a D ef + (1 - a) Df.
    a = 0.4
    learner, ts = etrace.compile(
        model, xs[0], state=h0, algorithm=etrace.ES_D_RTRL(decay=a)
    )
    ex, ef = np.zeros((5, 6)), np.zeros((3, 5))
    for x in xs:
        _, ts = learner.step(model, ts, x)
        ex = a * ex + _hand_patches(x)
        ef = a * 0.5 * ef + (1 - a)
    got_x, got_f = ts.traces[learner.graph.units[0].name]
    np.testing.assert_allclose(got_x[0], ex, rtol=1e-12)
    np.testing.assert_allclose(got_f[0, :, :, 0], ef, rtol=1e-12)


def test_conv_es_d_rtrl_exact_when_memoryless():
    class Memoryless(eqx.Module):
        conv: eqx.nn.Conv1d

        def __call__(self, x, h):
            h = jnp.tanh(self.conv(x)) + 0 * h
            return h.sum(axis=1), h

    model = Memoryless(eqx.nn.Conv1d(2, 3, 3, padding=1, key=jax.random.key(0)))
    xs, ys, h0 = _normal(1, (5, 2, 6)), _normal(2, (5, 3)), jnp.zeros((3, 6))
    _check_exact(model, h0, xs, ys, algorithm=etrace.ES_D_RTRL(decay=0.0))
    _check_differs(model, h0, xs, ys, algorithm=etrace.ES_D_RTRL(decay=0.5))


# --------------------------------------------------------------------------------
# einsum / batched dot_general.


class MultiHead(eqx.Module):
    """Per-head input weights `(H, D, Din)`; optionally block-diagonal recurrent
    weights `(H, D, D)`."""

    w_in: jax.Array
    w_rec: jax.Array | None
    decay: jax.Array

    def __call__(self, x, h):
        u = jnp.einsum("hij,hj->hi", self.w_in, x)
        if self.w_rec is not None:
            u = u + jnp.einsum("hij,hj->hi", self.w_rec, h)
        h = jax.nn.sigmoid(self.decay) * h + jnp.tanh(u)
        return h[:, 0], h


def _heads(recurrent, seed=0):
    w_rec = _normal(seed + 1, (3, 4, 4), 0.5) if recurrent else None
    model = MultiHead(_normal(seed, (3, 4, 2)), w_rec, _normal(seed + 2, (3, 4)))
    return model, jnp.zeros((3, 4)), _normal(seed + 3, (6, 3, 2)), _normal(4, (6, 3))


def test_einsum_heads_equal_bptt_and_trace_is_per_head():
    model, h0, xs, ys = _heads(recurrent=False)
    learner, _ = _check_exact(model, h0, xs, ys)
    (unit,) = [u for u in learner.graph.units if u.site.op == "dot_general"]
    assert unit.shape == (3, 4, 1, 2)  # heads are the batch dimension B


def test_block_diagonal_recurrent_einsum_rtrl_exact_d_rtrl_not():
    model, h0, xs, ys = _heads(recurrent=True)
    _check_differs(model, h0, xs, ys, params="w_rec")
    _check_exact(model, h0, xs, ys, algorithm=etrace.RTRL())


def test_einsum_trace_equals_the_equations_by_hand():
    class Linear(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = 0.5 * h + jnp.einsum("hij,hj->hi", self.w, x)
            return h.sum(), h

    model, xs = Linear(_normal(0, (3, 4, 2))), _normal(1, (5, 3, 2))
    learner, ts = etrace.compile(model, xs[0], state=jnp.zeros((3, 4)))
    eps = np.zeros((3, 2))
    for x in xs:
        _, ts = learner.step(model, ts, x)
        eps = 0.5 * eps + np.asarray(x)  # eps[h, w, j] = 0.5 eps + x[h, j]
    (got,) = learner.trace_of(ts, lambda m: m.w)["state"]  # K = 1
    assert got.shape == (3, 4, 1, 2)
    np.testing.assert_allclose(
        got[:, :, 0], np.broadcast_to(eps[:, None], (3, 4, 2)), rtol=1e-12
    )


def test_weight_shared_over_positions_equals_bptt():
    class Positions(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):  # x: (L, Din) -> h: (L, D)
            h = 0.6 * h + jnp.tanh(x @ self.w.T)
            return h.sum(axis=0), h

    model, xs = Positions(_normal(0, (3, 2))), _normal(1, (6, 5, 2))
    learner, _ = _check_exact(model, jnp.zeros((5, 3)), xs, _normal(2, (6, 3)))
    assert learner.graph.units[0].shape == (1, 3, 5, 2)  # Fx = 5 positions


# --------------------------------------------------------------------------------
# Embedding look-ups.


class EmbeddingLIF(eqx.Module):
    embedding: eqx.nn.Embedding
    lif: etrace.nn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key, vocab=9, n=5):
        k1, k2 = jax.random.split(key)
        self.embedding = eqx.nn.Embedding(vocab, n, key=k1)
        self.lif = etrace.nn.LIF(n, tau=3.0, threshold=0.3)
        self.readout = eqx.nn.Linear(n, 2, key=k2)

    def __call__(self, token, state):
        z, state = self.lif(2.0 * self.embedding(token), state)
        return self.readout(z), state


def test_embedding_into_lif_layer_equals_bptt_on_looked_up_rows_only():
    model, state = eqx.nn.make_with_state(EmbeddingLIF)(jax.random.key(0))
    tokens = jnp.array([1, 4, 4, 7, -1, 1, 2, 4])  # -1 is the last row, as in jnp
    ys = _normal(1, (8, 2))
    _live(model, state, tokens)
    learner, _ = _check_exact(model, state, tokens, ys)
    (unit,) = [u for u in learner.graph.units if u.site.op == "dynamic_slice"]
    assert unit.shape == (1, 5, 1, 9)  # (B, row size, one look-up, rows)
    _, ts = etrace.compile(model, tokens[0], state=state)
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, tokens, ys)
    rows = np.abs(np.asarray(grads.embedding.weight)).sum(axis=1)
    used = {1, 2, 4, 7, 8}
    assert all(rows[r] > 0 for r in used)
    assert all(rows[r] == 0 for r in range(9) if r not in used)


class Bag(eqx.Module):
    """Several tokens per step, each row through a non-linearity, summed."""

    table: jax.Array
    mode: str = eqx.field(static=True, default="clip")

    def __call__(self, tokens, h):
        rows = self.table.at[tokens].get(mode=self.mode, fill_value=0.0)
        h = 0.7 * h + jnp.tanh(rows).sum(axis=0)
        return h[:2], h


@pytest.mark.parametrize("mode", ["clip", "fill", "promise_in_bounds"])
def test_gathered_bag_of_tokens_equals_bptt(mode):
    model = Bag(_normal(0, (10, 4)), mode)
    high = 13 if mode != "promise_in_bounds" else 10  # some out of bounds
    tokens = jax.random.randint(jax.random.key(1), (6, 3), 0, high)
    ys = _normal(2, (6, 2))
    learner, _ = _check_exact(model, jnp.zeros(4), tokens, ys)
    (unit,) = learner.graph.units
    assert unit.site.op == "gather" and unit.shape == (1, 4, 3, 10)
    if mode == "fill":
        # Out-of-bounds look-ups read the fill value and train no row.
        _, ts = etrace.compile(model, tokens[0], state=jnp.zeros(4))
        g, _, _ = etrace.online_grad(learner, mse, model, ts, tokens, ys)
        seen = set(np.asarray(tokens).ravel().tolist())
        for r in range(10):
            assert (np.abs(g.table[r]).sum() > 0) == (r in seen)


class EmbeddingGRU(eqx.Module):
    embedding: eqx.nn.Embedding
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = eqx.nn.Embedding(8, 3, key=k1)
        self.cell = eqx.nn.GRUCell(3, 4, key=k2)
        self.readout = eqx.nn.Linear(4, 2, key=k3)

    def __call__(self, token, h):
        h = self.cell(self.embedding(token), h)
        return self.readout(h), h


def test_embedding_before_a_gru_cell_is_one_step_for_d_rtrl_exact_for_rtrl():
    model = EmbeddingGRU(jax.random.key(0))
    tokens, ys = jnp.array([0, 3, 3, 5, 1, 3]), _normal(1, (6, 2))
    with pytest.warns(etrace.EtraceWarning, match="embedding.weight"):
        learner, ts = etrace.compile(model, tokens[0], state=jnp.zeros(4))
    roles = dict(zip(learner.compiled.layout.paths, learner.compiled.roles))
    assert roles["embedding.weight"][0] == "one-step*"
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, tokens, ys)
    rows = np.abs(np.asarray(grads.embedding.weight)).sum(axis=1)
    assert set(np.nonzero(rows)[0].tolist()) == {0, 1, 3, 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        _check_exact(model, jnp.zeros(4), tokens, ys, algorithm=etrace.RTRL())


# --------------------------------------------------------------------------------
# Fixed-mask sparse weights.

MASK = np.array(jax.random.bernoulli(jax.random.key(7), 0.4, (6, 3)))


class MaskedLIF(eqx.Module):
    """LIF neurons whose input (and optionally recurrent) weights are masked."""

    w_in: jax.Array
    w_rec: jax.Array | None
    mask: jax.Array | None
    lif: etrace.nn.LIF
    readout: eqx.nn.Linear

    def __init__(self, key, *, as_leaf, recurrent=False):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w_in = jax.random.normal(k1, (6, 3))
        self.w_rec = jax.random.normal(k2, (6, 6)) * 0.3 if recurrent else None
        self.mask = jnp.asarray(MASK) if as_leaf else None
        self.lif = etrace.nn.LIF(6, tau=4.0, threshold=0.5)
        self.readout = eqx.nn.Linear(6, 2, key=k3)

    def __call__(self, x, state):
        if self.mask is None:
            w = MASK * self.w_in  # a constant mask, baked into the step
        else:
            w = jnp.where(self.mask, self.w_in, 0.0)  # a boolean array of the model
        current = w @ x
        if self.w_rec is not None:
            current = current + (np.tril(np.ones((6, 6))) * self.w_rec) @ (
                self.lif.spikes(state)
            )
        z, state = self.lif(current, state)
        return self.readout(z), state


@pytest.mark.parametrize("as_leaf", [False, True])
def test_masked_weights_sparse_traces_equal_bptt(as_leaf):
    model, state = eqx.nn.make_with_state(MaskedLIF)(jax.random.key(0), as_leaf=as_leaf)
    xs, ys = _normal(1, (8, 3), 1.5), _normal(2, (8, 2))
    _live(model, state, xs)
    for algorithm in (etrace.D_RTRL(), etrace.D_RTRL(sparse=False)):
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        et.assert_matches_bptt(learner, mse, model, ts, xs, ys)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        assert np.all(np.asarray(grads.w_in)[~MASK] == 0)
        assert np.all(np.abs(np.asarray(grads.w_in))[MASK] > 0)
        (trace,) = learner.trace_of(ts, lambda m: m.w_in).values()
        # One array per state, except the spike's (read by no update: `None`).
        group = learner.graph.groups[0]
        (spike,) = [j for j in range(group.k) if not group.couples(0, j)]
        assert group.leaf_names[spike] == "lif.z" and trace[spike] is None
        shapes = [eps.shape for eps in trace if eps is not None]
        k = learner.graph.groups[0].k
        if algorithm.sparse:
            assert shapes == [(MASK.sum(), 1)] * (k - 1)  # the mask's non-zeros only
        else:
            assert shapes == [(1, 6, 1, 3)] * (k - 1)


def test_masked_recurrent_weights_sparse_equals_dense_and_differs_from_bptt():
    model, state = eqx.nn.make_with_state(MaskedLIF)(
        jax.random.key(1), as_leaf=True, recurrent=True
    )
    xs, ys = _normal(1, (8, 3), 1.5), _normal(2, (8, 2))
    _live(model, state, xs)
    got = []
    for algorithm in (etrace.D_RTRL(), etrace.D_RTRL(sparse=False)):
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        got.append(grads)
        lower = np.tril(np.ones((6, 6))) > 0
        assert np.all(np.asarray(grads.w_rec)[~lower] == 0)
    for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])):
        assert rel_err(a, b) < 1e-12
    learner, ts = etrace.compile(model, xs[0], state=state)
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params="w_rec")


def test_a_mask_that_grows_after_compile_is_refused():
    model, state = eqx.nn.make_with_state(MaskedLIF)(jax.random.key(0), as_leaf=True)
    learner, ts = etrace.compile(model, jnp.zeros(3), state=state)
    shrunk = eqx.tree_at(lambda m: m.mask, model, model.mask & False)
    learner.step(shrunk, ts, jnp.ones(3))  # removing entries is fine
    grown = eqx.tree_at(lambda m: m.mask, model, jnp.ones_like(model.mask))
    with pytest.raises(etrace.EtraceError, match="The mask `mask` is non-zero"):
        learner.step(grown, ts, jnp.ones(3))
    with pytest.raises(Exception, match="The mask `mask` is non-zero"):
        eqx.filter_jit(learner.step)(grown, ts, jnp.ones(3))


# --------------------------------------------------------------------------------
# Low-rank weights.


class LowRank(eqx.Module):
    w: jax.Array
    a: jax.Array
    b: jax.Array
    form: str = eqx.field(static=True)

    def __call__(self, x, h):
        if self.form == "product":
            u = (self.w + self.a @ self.b) @ x
        elif self.form == "chain":
            u = self.w @ x + self.a @ (self.b @ x)
        else:  # the projection is also read by the output: not re-associated
            z = self.b @ x
            u = self.w @ x + self.a @ z
            h = 0.6 * h + jnp.tanh(u)
            return h[:2] + z.sum(), h
        h = 0.6 * h + jnp.tanh(u)
        return h[:2], h


def _low_rank(form):
    model = LowRank(_normal(0, (5, 4)), _normal(1, (5, 2)), _normal(2, (2, 4)), form)
    return model, jnp.zeros(5), _normal(3, (7, 4)), _normal(4, (7, 2))


@pytest.mark.parametrize("form", ["product", "chain"])
def test_low_rank_factors_are_traced_exactly(form):
    model, h0, xs, ys = _low_rank(form)
    with warnings.catch_warnings():
        warnings.simplefilter("error", etrace.EtraceWarning)
        learner, _ = _check_exact(model, h0, xs, ys)
    roles = dict(zip(learner.compiled.layout.paths, learner.compiled.roles))
    assert roles["a"][0] == roles["b"][0] == "matrix"


def test_low_rank_projection_read_elsewhere_is_one_step():
    model, h0, xs, ys = _low_rank("shared")
    with pytest.warns(etrace.EtraceWarning, match="'b'"):
        learner, ts = etrace.compile(model, xs[0], state=h0)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, params=["w", "a"])
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params="b")


def test_recurrent_low_rank_rtrl_exact_d_rtrl_not():
    class RecurrentLowRank(eqx.Module):
        a: jax.Array
        b: jax.Array
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(self.a @ (self.b @ h) + self.w @ x)
            return h[:2], h

    model = RecurrentLowRank(_normal(0, (5, 2)), _normal(1, (2, 5)), _normal(2, (5, 3)))
    xs, ys, h0 = _normal(3, (6, 3)), _normal(4, (6, 2)), jnp.zeros(5)
    _check_differs(model, h0, xs, ys, params=["a", "b"])
    _check_exact(model, h0, xs, ys, algorithm=etrace.RTRL())


# --------------------------------------------------------------------------------
# Shared element-wise parameters.


def test_scalar_decay_shared_by_all_neurons_equals_bptt():
    class Shared(eqx.Module):
        decay: jax.Array
        w: jax.Array

        def __call__(self, x, h):
            h = jax.nn.sigmoid(self.decay) * h + jnp.tanh(self.w @ x)
            return h[:2], h

    model = Shared(jnp.array(0.2), _normal(0, (4, 3)))
    learner, _ = _check_exact(
        model, jnp.zeros(4), _normal(1, (6, 3)), _normal(2, (6, 2))
    )
    (unit,) = [u for u in learner.graph.units if u.site.kind == "elementwise"]
    assert unit.shape == (1, 4, 1, 1)  # one trace per neuron, summed on read-out


# --------------------------------------------------------------------------------
# Batches and transformations on the new operators.


@pytest.mark.parametrize("case", ["conv", "embedding", "masked", "low_rank"])
def test_batched_online_gradient_is_the_mean_of_examples(case):
    if case == "conv":
        model, state, xs, ys = _conv_problem(ConvLIF)
        xs = jnp.stack([xs, 0.8 * xs, 1.2 * xs], axis=1)
    elif case == "embedding":
        model, state = eqx.nn.make_with_state(EmbeddingLIF)(jax.random.key(0))
        xs = jax.random.randint(jax.random.key(1), (6, 3), 0, 9)
    elif case == "masked":
        model, state = eqx.nn.make_with_state(MaskedLIF)(
            jax.random.key(0), as_leaf=True
        )
        xs = _normal(1, (6, 3, 3), 1.5)
    else:
        model, state, xs, _ = _low_rank("chain")
        xs = jnp.stack([xs, -xs, 0.5 * xs], axis=1)
    ys = _normal(9, (xs.shape[0], 3, 2))
    learner, _ = etrace.compile(model, xs[0, 0], state=state)
    batched, _, _ = eqx.filter_jit(etrace.online_grad)(
        learner, mse, model, learner.init(batch_size=3), xs, ys
    )
    singles = [
        etrace.online_grad(learner, mse, model, learner.init(), xs[:, b], ys[:, b])[0]
        for b in range(3)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *singles)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(mean)):
        assert rel_err(a, b) < 1e-12


# --------------------------------------------------------------------------------
# Refusals: weight uses the compiler cannot trace.


class InCond(eqx.Module):
    w: jax.Array

    def __call__(self, x, h):
        h = jax.lax.cond(x[0] > 0, lambda: jnp.tanh(self.w @ h), lambda: h)
        return h.sum(), h


class InScan(eqx.Module):
    w: jax.Array

    def __call__(self, x, h):
        def body(c, _):
            return jnp.tanh(self.w @ c + x), None

        h, _ = jax.lax.scan(body, h, None, length=2)
        return h.sum(), h


class InWhile(eqx.Module):
    w: jax.Array

    def __call__(self, x, h):
        n = (x[0] > 0).astype(jnp.int32) + 1
        h = jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(self.w @ c), h)
        return h.sum(), h


@pytest.mark.parametrize(
    "cls, prim", [(InCond, "cond"), (InScan, "scan"), (InWhile, "while")]
)
def test_weights_inside_control_flow_are_refused_by_name(cls, prim):
    with pytest.raises(
        etrace.EtraceError, match=rf"primitive `{prim}`.*uses parameter\(s\) `w`"
    ):
        etrace.compile(cls(jnp.eye(3)), jnp.ones(3), state=jnp.zeros(3))


def test_control_flow_without_weights_is_refused():
    class Reset(eqx.Module):
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(self.w @ x) + jax.lax.cond(x[0] > 0, lambda: h, lambda: 0 * h)
            return h.sum(), h

    with pytest.raises(
        etrace.EtraceError, match=r"(?s)primitive `cond`.*the state in it"
    ):
        etrace.compile(Reset(jnp.eye(3)), jnp.ones(3), state=jnp.zeros(3))


def test_partial_slice_of_a_weight_is_refused_by_name():
    class TwoRows(eqx.Module):
        table: jax.Array

        def __call__(self, i, h):
            rows = jax.lax.dynamic_slice(self.table, (i, 0), (2, 3))
            h = 0.5 * h + rows.sum(axis=0)
            return h.sum(), h

    with pytest.raises(
        etrace.EtraceError, match=r"(?s)parameter `table`.*`dynamic_slice`.*whole rows"
    ):
        etrace.compile(TwoRows(jnp.ones((5, 3))), jnp.array(1), state=jnp.zeros(3))


def test_weight_as_convolution_input_is_refused_by_name():
    class KernelFromInput(eqx.Module):
        image: jax.Array

        def __call__(self, x, h):  # the parameter is the convolved signal
            y = jax.lax.conv_general_dilated(
                self.image[None, None], x[None, None], (1,), "SAME"
            )
            h = 0.5 * h + y[0, 0]
            return h.sum(), h

    with pytest.raises(
        etrace.EtraceError, match=r"(?s)`image`.*`conv_general_dilated`.*kernel"
    ):
        etrace.compile(KernelFromInput(jnp.ones(6)), jnp.ones(3), state=jnp.zeros(6))


# --------------------------------------------------------------------------------
# Whole-state and spiking algorithms on the new operators.


def _operator_model(case):
    if case == "conv":
        model, state, xs, ys = _conv_problem(ConvLIF)
        return model, state, xs[:5], ys[:5]
    if case == "embedding":
        model, state = eqx.nn.make_with_state(EmbeddingLIF)(jax.random.key(0))
        return model, state, jnp.array([1, 4, 4, 7, 2]), _normal(1, (5, 2))
    model, state = eqx.nn.make_with_state(MaskedLIF)(jax.random.key(0), as_leaf=True)
    return model, state, _normal(1, (5, 3), 1.5), _normal(2, (5, 2))


@pytest.mark.parametrize("case", ["conv", "embedding", "masked"])
def test_rtrl_equals_bptt_on_every_operator(case):
    model, state, xs, ys = _operator_model(case)
    _live(model, state, xs)
    _check_exact(model, state, xs, ys, algorithm=etrace.RTRL())


def test_every_algorithm_runs_on_a_masked_spiking_layer():
    model, state, xs, ys = _operator_model("masked")
    algorithms = [
        etrace.ES_D_RTRL(decay=0.5),
        etrace.SnAp(1),
        etrace.UORO(),
        etrace.EProp(),
        etrace.OSTLRecurrent(),
        etrace.OTTT(decay=0.75),
        etrace.OTPE(decay=0.75),
        etrace.OSTTP(),
    ]
    for algorithm in algorithms:
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
        assert np.all(np.isfinite(np.asarray(grads.w_in)))
        assert np.all(np.asarray(grads.w_in)[~MASK] == 0), type(algorithm).__name__


def test_exact_regime_verdicts_on_the_new_operators():
    verdicts = {}
    for name, cls, x0 in [
        ("conv", ConvLIF, jnp.zeros((2, 6))),
        ("recurrent conv", RecurrentConvLIF, jnp.zeros((2, 6))),
        ("embedding", EmbeddingLIF, jnp.array(1)),
    ]:
        model, state = eqx.nn.make_with_state(cls)(jax.random.key(0))
        learner, _ = etrace.compile(model, x0, state=state)
        verdicts[name] = et.exact_regime(etrace.D_RTRL(), learner)
    for form in ("chain", "shared"):
        model, h0, xs, _ = _low_rank(form)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", etrace.EtraceWarning)
            learner, _ = etrace.compile(model, xs[0], state=h0)
        verdicts[form] = et.exact_regime(etrace.D_RTRL(), learner)
    assert verdicts["conv"] and verdicts["embedding"] and verdicts["chain"]
    assert not verdicts["recurrent conv"] and not verdicts["shared"]
    assert "conv.weight * x" in str(verdicts["recurrent conv"])
    assert "`b`" in str(verdicts["shared"])


def test_low_rank_readout_is_left_as_written():
    class FactorisedReadout(eqx.Module):
        a: jax.Array
        b: jax.Array
        w: jax.Array

        def __call__(self, x, h):
            h = jnp.tanh(self.w @ x + 0.5 * h)
            return self.a @ (self.b @ h), h  # (50, 2) @ (2, 4): cheaper unfused

    model = FactorisedReadout(
        _normal(0, (50, 2)), _normal(1, (2, 4)), _normal(2, (4, 3))
    )
    learner, _ = etrace.compile(model, jnp.ones(3), state=jnp.zeros(4))
    products = [e for e in learner.compiled.program.eqns if e.name == "dot_general"]
    shapes = sorted(
        tuple(learner.compiled.program.aval(e.outs[0]).shape) for e in products
    )
    assert shapes == [(2,), (4,), (50,)]  # no (50, 4) product of the factors


def test_bad_flags_are_refused():
    with pytest.raises(etrace.EtraceError, match=r"D_RTRL\(sparse=...\)` must be"):
        etrace.D_RTRL(sparse="no")  # pyright: ignore
    model, h0, xs, _ = _low_rank("chain")
    with pytest.raises(etrace.EtraceError, match="`check_finite` must be True or"):
        etrace.compile(model, xs[0], state=h0, check_finite=1)  # pyright: ignore
