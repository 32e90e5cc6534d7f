"""Complex hidden states: every algorithm runs on them, the exact ones equal BPTT.

The layer is the complex diagonal recurrence of an LRU,
`h = lam * h + B x` with `lam = exp(-exp(nu) + i exp(theta))`, written both ways a
user writes it: with a complex weight `(B_re + i B_im) @ x`, and as the paper does,
real products combined with `1j` and scaled by `exp(log_gamma)`. It is read out
through `Re(C h)`, so the loss's cotangent of `h` is complex.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etrace

from .helpers import ALGORITHMS, all_eqns, data, leaf_errors, modulators, mse


N, N_IN, N_OUT = 4, 3, 2
T = 9


class Diagonal(eqx.Module):
    nu: jax.Array
    theta: jax.Array
    b_re: jax.Array
    b_im: jax.Array
    log_gamma: jax.Array
    c_re: jax.Array
    c_im: jax.Array
    form: str = eqx.field(static=True)

    def __init__(self, key, form, n=N, n_in=N_IN, n_out=N_OUT):
        k = jax.random.split(key, 7)
        normal = jax.random.normal
        self.nu = jnp.log(-jnp.log(jax.random.uniform(k[0], (n,), minval=0.6)))
        self.theta = jnp.log(jax.random.uniform(k[1], (n,), minval=0.1, maxval=3.0))
        self.b_re = normal(k[2], (n, n_in)) / np.sqrt(n_in)
        self.b_im = normal(k[3], (n, n_in)) / np.sqrt(n_in)
        self.log_gamma = 0.3 * normal(k[4], (n,))
        self.c_re = normal(k[5], (n_out, n)) / np.sqrt(n)
        self.c_im = normal(k[6], (n_out, n)) / np.sqrt(n)
        self.form = form

    def lam(self):
        return jnp.exp(-jnp.exp(self.nu) + 1j * jnp.exp(self.theta))

    def drive(self, x, dtype):
        if self.form == "complex":
            return (self.b_re + 1j * self.b_im) @ x.astype(dtype)
        return (self.b_re @ x + 1j * (self.b_im @ x)) * jnp.exp(self.log_gamma)

    def __call__(self, x, h):
        h = self.lam() * h + self.drive(x, h.dtype)
        return jnp.real((self.c_re + 1j * self.c_im) @ h), h


class Mixed(eqx.Module):
    """A complex recurrence read out through its real part by a real leaky layer
    with state of its own: one complex and one real hidden group, stacked."""

    lru: Diagonal
    w: jax.Array
    leak: jax.Array
    readout: jax.Array

    def __init__(self, key, form="paper"):
        k = jax.random.split(key, 4)
        self.lru = Diagonal(k[0], form)
        self.w = jax.random.normal(k[1], (N, N)) / np.sqrt(N)
        self.leak = jax.random.normal(k[2], (N,))
        self.readout = jax.random.normal(k[3], (N_OUT, N)) / np.sqrt(N)

    def __call__(self, x, state):
        h, v = state
        _, h = self.lru(x, h)
        a = jax.nn.sigmoid(self.leak)
        v = a * v + (1 - a) * jnp.tanh(self.w @ jnp.real(h))
        return self.readout @ v, (h, v)


class MixedReal(Mixed):
    """The real layer takes the real part after its weight: its weight output is
    complex, and its trace too, of which the real part is the exact one."""

    def __call__(self, x, state):
        h, v = state
        _, h = self.lru(x, h)
        a = jax.nn.sigmoid(self.leak)
        v = a * v + (1 - a) * jnp.tanh(jnp.real(self.w @ h))
        return self.readout @ v, (h, v)


class ReadsRe(Diagonal):
    """One hidden group of a complex and a real state: the real state integrates
    the real part of the complex one, element-wise (no weight between them)."""

    def __call__(self, x, state):
        h, v = state
        h = self.lam() * h + self.drive(x, h.dtype)
        v = 0.7 * v + jnp.tanh(jnp.real(h) * jnp.exp(self.log_gamma))
        return self.c_re @ v + jnp.real((self.c_re + 1j * self.c_im) @ h), (h, v)


class FeedsComplex(Diagonal):
    """One hidden group: a real state that reads nothing complex drives the
    complex one."""

    def __call__(self, x, state):
        h, v = state
        v = 0.7 * v + jnp.tanh(self.b_re @ x)
        h = self.lam() * h + self.drive(x, h.dtype) + 0.3 * v * jnp.exp(self.log_gamma)
        return self.c_re @ v + jnp.real((self.c_re + 1j * self.c_im) @ h), (h, v)


class LoopsBack(Diagonal):
    """The complex state reads the previous real state, which reads the real
    part of the complex one: a loop that per-group algorithms refuse."""

    def __call__(self, x, state):
        h, v = state
        new = self.lam() * h + self.drive(x, h.dtype) + 0.3 * v
        v = 0.7 * v + jnp.tanh(jnp.real(h))
        return jnp.real((self.c_re + 1j * self.c_im) @ new), (new, v)


def _state(model):
    h = jnp.zeros(N, jnp.complex128)
    pair = (Mixed, ReadsRe, FeedsComplex, LoopsBack)
    return (h, jnp.zeros(N)) if isinstance(model, pair) else h


def _model(kind, seed=0):
    key = jax.random.key(seed)
    if kind == "mixed":
        return Mixed(key)
    if kind == "mixed_real":
        return MixedReal(key, "complex")
    if kind == "mixed_group":
        return ReadsRe(key, "complex")
    return Diagonal(key, kind)


def _online(model, algorithm, xs, ys):
    learner, ts = etrace.compile(model, xs[0], state=_state(model), algorithm=algorithm)
    ms = modulators(learner, xs)
    grads, _, losses = etrace.online_grad(
        learner, mse, model, ts, xs, ys, modulators=ms
    )
    return grads, losses


def _errors(model, algorithm, seed=1):
    xs, ys = data(seed, T, N_IN, N_OUT)
    grads, _ = _online(model, algorithm, xs, ys)
    exact, _ = etrace.bptt_grad(mse, model, _state(model), xs, ys)
    return leaf_errors(grads, exact), grads


EXACT = {"d_rtrl": etrace.D_RTRL(), "rtrl": etrace.RTRL(), "snap1": etrace.SnAp(1)}


@pytest.mark.parametrize("form", ["complex", "paper"])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_algorithms_equal_bptt_on_a_complex_diagonal_layer(form, name):
    model = _model(form)
    errors, grads = _errors(model, EXACT[name])
    assert max(errors.values()) <= 1e-9, errors
    # Real parameters get real gradients, and the comparison is not vacuous.
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float64
    assert all(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(grads)[:4])


@pytest.mark.parametrize("kind", ["mixed", "mixed_real"])
@pytest.mark.parametrize("name", ["rtrl", "snap3"])
def test_whole_state_algorithms_equal_bptt_on_a_mixed_stack(name, kind):
    algorithm = etrace.RTRL() if name == "rtrl" else etrace.SnAp(3)
    errors, _ = _errors(_model(kind), algorithm)
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("kind", ["mixed", "mixed_real"])
def test_d_rtrl_is_exact_on_the_top_layer_of_a_mixed_stack_only(kind):
    errors, _ = _errors(_model(kind), etrace.D_RTRL())
    top = {k: e for k, e in errors.items() if not k.startswith(".lru")}
    bottom = {k: e for k, e in errors.items() if k.startswith(".lru.")}
    assert set(top) == {".w", ".leak", ".readout"}
    assert max(top.values()) <= 1e-9, top
    # Negative control: the complex layer below is reached through the real layer
    # above it in the same step, which D-RTRL's diagonal traces leave out.
    traced = [".lru.nu", ".lru.theta", ".lru.b_re", ".lru.b_im"]
    assert min(bottom[k] for k in traced) > 1e-3, bottom


@pytest.mark.parametrize("cls", [ReadsRe, FeedsComplex])
@pytest.mark.parametrize("name", ["d_rtrl", "rtrl", "snap2"])
def test_exact_algorithms_equal_bptt_on_a_group_of_complex_and_real_states(cls, name):
    model = cls(jax.random.key(0), "paper")
    algorithm = EXACT.get(name, etrace.SnAp(2))
    learner, _ = etrace.compile(model, jnp.zeros(N_IN), state=_state(model))
    (group,) = learner.graph.groups
    assert group.k == 2 and group.dtype == jnp.complex128
    errors, _ = _errors(model, algorithm)
    assert max(errors.values()) <= 1e-9, errors


def test_per_group_algorithms_refuse_a_real_state_between_complex_ones():
    model = LoopsBack(jax.random.key(0), "paper")
    message = r"complex state `state\[0\]` reads the previous value of the real "
    with pytest.raises(etrace.EtraceError, match=message):
        etrace.compile(model, jnp.zeros(N_IN), state=_state(model))
    # What the refusal protects against: D-RTRL would be off by about 3e-2 here;
    # RTRL follows the parts apart and is exact.
    errors, _ = _errors(model, etrace.RTRL())
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("form", ["complex", "paper"])
def test_d_rtrl_traces_are_the_complex_recurrence(form):
    """The traces of `B_re` and `B_im` by hand: `e = lam e + df x`. With a complex
    weight both are the trace of `B_re + i B_im` (`df = 1`); with real products
    each product has its own, `df = exp(log_gamma) (1, i)`."""
    model = _model(form)
    xs, _ = data(2, T, N_IN, N_OUT)
    learner, ts = etrace.compile(model, xs[0], state=_state(model))
    step = eqx.filter_jit(learner.step)
    for x in xs:
        _, ts = step(model, ts, x)
    lam = model.lam()
    scale = jnp.ones(N) if form == "complex" else jnp.exp(model.log_gamma)
    by_hand = jnp.zeros((N, N_IN), jnp.complex128)
    for x in xs:
        by_hand = lam[:, None] * by_hand + scale[:, None] * x[None, :]
    dfs = (1.0, 1.0) if form == "complex" else (1.0, 1j)
    for where, df in zip([lambda m: m.b_re, lambda m: m.b_im], dfs):
        ((trace,),) = learner.trace_of(ts, where).values()
        trace = jnp.reshape(trace, (N, N_IN))
        assert jnp.iscomplexobj(trace)
        np.testing.assert_allclose(trace, df * by_hand, rtol=1e-12)
        # Negative control: the imaginary parts matter.
        assert np.abs(np.imag(trace)).max() > 0.1


class _DropImaginary(etrace.AbstractWrappedAlgorithm):
    inner: etrace.AbstractAlgorithm

    def update(self, graph, traces, jac):
        new = self.inner.update(graph, traces, jac)
        return jax.tree.map(lambda t: jnp.real(t).astype(t.dtype), new)


class _Conjugate(etrace.AbstractWrappedAlgorithm):
    inner: etrace.AbstractAlgorithm

    def update(self, graph, traces, jac):
        return jax.tree.map(jnp.conj, self.inner.update(graph, traces, jac))


class _ConjugateSignal(etrace.AbstractWrappedAlgorithm):
    """RTRL reading out with the cotangent of the imaginary parts negated: the
    conjugate of JAX's cotangent convention."""

    inner: etrace.AbstractAlgorithm

    def gradients(self, graph, traces, signal, jac):
        c = signal["hidden"]
        flipped = c.at[N:].multiply(-1)
        return self.inner.gradients(graph, traces, {"hidden": flipped}, jac)


@pytest.mark.parametrize("form", ["complex", "paper"])
@pytest.mark.parametrize(
    "wrong",
    [
        _DropImaginary(etrace.D_RTRL()),
        _Conjugate(etrace.D_RTRL()),
        _ConjugateSignal(etrace.RTRL()),
    ],
    ids=["drop_imaginary", "conjugate_traces", "conjugate_signal"],
)
def test_the_comparison_catches_a_wrong_complex_convention(form, wrong):
    errors, _ = _errors(_model(form), wrong)
    traced = [".b_re", ".b_im", ".nu", ".theta"]
    assert max(errors[k] for k in traced) > 1e-2, errors


# Defined for real hidden states only, and refuse complex ones when compiling.
REAL_ONLY = {"kf_rtrl": "KF_RTRL", "dni": "DNI"}


@pytest.mark.parametrize("kind", ["mixed", "mixed_group"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_on_complex_hidden_states(kind, name):
    model = _model(kind)
    xs, ys = data(3, 5, N_IN, N_OUT)
    if name in REAL_ONLY:
        match = (
            rf"{REAL_ONLY[name]} is defined for real hidden states, but hidden group"
        )
        with pytest.raises(etrace.EtraceError, match=match):
            _online(model, ALGORITHMS[name], xs, ys)
        return
    grads, losses = _online(model, ALGORITHMS[name], xs, ys)
    assert jax.tree.structure(grads) == jax.tree.structure(model)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(model)):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert bool(jnp.all(jnp.isfinite(g)))
    assert bool(jnp.all(jnp.isfinite(losses)))


@pytest.mark.parametrize("name", ["d_rtrl", "rtrl"])
def test_batched_complex_traces_equal_a_loop_over_examples(name):
    model = _model("paper")
    xs, ys = data(4, 6, N_IN, N_OUT, batch=3)
    algorithm = EXACT[name]
    learner, _ = etrace.compile(
        model, xs[0, 0], state=_state(model), algorithm=algorithm
    )
    batched, _, _ = etrace.online_grad(
        learner, mse, model, learner.init(batch_size=3), xs, ys
    )
    loop = [
        etrace.online_grad(learner, mse, model, learner.init(), xs[:, b], ys[:, b])[0]
        for b in range(3)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / 3, *loop)
    assert max(leaf_errors(batched, mean).values()) <= 1e-9


class _Conjugated(Diagonal):
    """`h = lam h + B x + 0.3 conj(h)`: element-wise, but not holomorphic in `h`."""

    def __call__(self, x, h):
        h = self.lam() * h + self.drive(x, h.dtype) + 0.3 * jnp.conj(h)
        return jnp.real((self.c_re + 1j * self.c_im) @ h), h


class _Modulus(Diagonal):
    """An update that reads the modulus of the state it updates."""

    def __call__(self, x, h):
        h = self.lam() * h / (1 + jnp.abs(h)) + self.drive(x, h.dtype)
        return jnp.real((self.c_re + 1j * self.c_im) @ h), h


@pytest.mark.parametrize(
    "cls, match", [(_Conjugated, "`conj`"), (_Modulus, "`abs`")], ids=["conj", "abs"]
)
def test_per_group_algorithms_refuse_a_complex_update_that_is_not_holomorphic(
    cls, match
):
    model = cls(jax.random.key(0), "paper")
    x0 = jnp.zeros(N_IN)
    for algorithm in (etrace.D_RTRL(), etrace.ES_D_RTRL(decay=0.5), etrace.EProp()):
        with pytest.raises(
            etrace.EtraceError, match=f"group `state` is not holo.*{match}"
        ):
            etrace.compile(model, x0, state=_state(model), algorithm=algorithm)


@pytest.mark.parametrize("cls", [_Conjugated, _Modulus], ids=["conj", "abs"])
def test_rtrl_follows_real_and_imaginary_parts_through_any_update(cls):
    # What the refusal protects against: D-RTRL's complex derivative would be
    # wrong here (relative error about 1 on `_Conjugated`).
    errors, _ = _errors(cls(jax.random.key(0), "paper"), etrace.RTRL())
    assert max(errors.values()) <= 1e-9, errors


@pytest.mark.parametrize("kind", ["complex", "paper", "mixed_group"])
def test_chunks_of_complex_traces_equal_bptt(kind):
    model = _model(kind)
    xs, ys = data(1, T, N_IN, N_OUT)
    learner, ts = etrace.compile(model, xs[0], state=_state(model))
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys, chunk=4)
    exact, _ = etrace.bptt_grad(mse, model, _state(model), xs, ys)
    assert max(leaf_errors(grads, exact).values()) <= 1e-9


def test_complex_trace_state_round_trips_through_serialisation(tmp_path):
    model = _model("mixed_group")
    xs, _ = data(5, 4, N_IN, N_OUT)
    learner, ts = etrace.compile(model, xs[0], state=_state(model))
    for x in xs:
        _, ts = learner.step(model, ts, x)
    path = tmp_path / "ts.eqx"
    eqx.tree_serialise_leaves(path, ts)
    back = eqx.tree_deserialise_leaves(path, learner.init())
    leaves = jax.tree.leaves(ts)
    assert any(jnp.iscomplexobj(a) and bool(jnp.any(jnp.imag(a) != 0)) for a in leaves)
    for a, b in zip(leaves, jax.tree.leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["d_rtrl", "rtrl"])
def test_a_complex64_model_computes_in_single_precision(name):
    # Under `jax_enable_x64` a float32 / complex64 model must not be promoted.
    model = jax.tree.map(
        lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a,
        _model("mixed_group"),
    )
    state = (jnp.zeros(N, jnp.complex64), jnp.zeros(N, jnp.float32))
    xs, ys = jax.tree.map(lambda a: a.astype(jnp.float32), data(1, 4, N_IN, N_OUT))
    learner, ts = etrace.compile(model, xs[0], state=state, algorithm=EXACT[name])
    closed = jax.make_jaxpr(
        lambda ts, xs, ys: etrace.online_grad(learner, mse, model, ts, xs, ys)
    )(ts, xs, ys)
    wide = (jnp.float64, jnp.complex128)
    found = [
        e.primitive.name
        for e in all_eqns(closed.jaxpr)
        if any(getattr(v.aval, "dtype", None) in wide for v in e.outvars)
    ]
    assert not found, found
