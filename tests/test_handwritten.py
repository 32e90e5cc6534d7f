"""D-RTRL on stock `eqx.nn.GRUCell` / `eqx.nn.LSTMCell` against hand-written equations.

The online gradients that etrace computes are compared with a NumPy (float64)
implementation of the D-RTRL recursion whose diagonal Jacobians `D` and `Df` are
derived analytically from the gate equations of Equinox's cells (not obtained from
autodiff). "Close to BPTT" is not the criterion: the online gradient must equal the
D-RTRL equations themselves, and several deliberately wrong variants of the equations
(traces reset every step, a wrong 2x2 diagonal for the LSTM) as well as BPTT must fail
the same tolerance.

Notation (per example, one hidden group of H neurons with K states): a weight op
`y = W x` (W_ih: x the external input; W_hh: x the previous hidden h^{t-1}) has outputs
m = 0..cH-1 that belong to neuron n(m) = m mod H (Equinox splits the gate vector in
contiguous chunks of H).
    D[n, k, k'] = d h_k^t[n] / d h_k'^{t-1}[n]        (all weight outputs held fixed)
    Df[m, k]    = d h_k^t[n(m)] / d y^t[m]
    eps^t[m, i, k] = sum_k' D[n(m), k, k'] eps^{t-1}[m, i, k'] + Df[m, k] x^t[i]
    grad W[m, i]  += sum_k c_k^t[n(m)] eps^t[m, i, k],   c^t = dL^t / d h^t (this step)
Biases are element-wise parameters: the same with x = 1.

GRU (Equinox 0.13.8), gates r, z, n in that order:
    a_r = yi_r + b_r + yh_r,  r = sigmoid(a_r)
    a_z = yi_z + b_z + yh_z,  z = sigmoid(a_z)
    a_n = yi_n + b_n + r * (yh_n + bias_n),  n = tanh(a_n)
    h'  = n + z * (h - n)
  K = 1;  D = z;  with dn = (1 - z)(1 - n^2):
    Df(yi_r) = Df(yh_r) = Df(b_r) = dn (yh_n + bias_n) r (1 - r)
    Df(yi_z) = Df(yh_z) = Df(b_z) = (h - n) z (1 - z)
    Df(yi_n) = Df(b_n) = dn;   Df(yh_n) = Df(bias_n) = dn r

LSTM (Equinox 0.13.8), gates i, f, g, o in order, state (h, c), K = 2 (k=0: h, k=1: c):
    lin = yi + yh + b;  i, f, o = sigmoid;  g = tanh
    c' = f c + i g;   h' = o tanh(c')
  W_hh h^{t-1} is held fixed, so h^{t-1} reaches nothing else; s = o(1 - tanh(c')^2):
    D = [[dh'/dh, dh'/dc], [dc'/dh, dc'/dc]] = [[0, s f], [0, f]]
    Df_c: i -> g i(1-i),  f -> c f(1-f),  g -> i (1-g^2),  o -> 0
    Df_h: s * Df_c for i, f, g;  o -> tanh(c') o (1-o)
  The readout reads h only, so c^t = (W_ro^T (y - y*), 0).
"""

from __future__ import annotations

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import hypothesis.strategies as st  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402

import etrace  # noqa: E402

from .helpers import sweep  # noqa: E402


RTOL = 1e-9
# A negative control "fails" when its relative error exceeds this (far above RTOL, so a
# failing control is not a rounding accident).
FAIL = 1e-6

hyp = settings(max_examples=4, deadline=None)
sizes = dict(
    hidden=st.integers(2, 6),
    n_in=st.integers(1, 4),
    length=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
)


# --------------------------------------------------------------------------- models


class GRUNet(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __call__(self, x, state):
        h = self.cell(x, state)
        return self.readout(h), h


class LSTMNet(eqx.Module):
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear

    def __call__(self, x, state):
        h, c = self.cell(x, state)
        return self.readout(h), (h, c)


N_OUT = 3


def loss_fn(y, target):
    return 0.5 * jnp.sum((y - target) ** 2)


def make_problem(family, hidden, n_in, length, seed):
    """Model (float64), nonzero initial state, inputs and targets."""
    k_cell, k_ro, k_h, k_c, k_x, k_y = jr.split(jr.key(seed), 6)
    if family == "gru":
        cell = eqx.nn.GRUCell(n_in, hidden, key=k_cell)
        h0 = 0.5 * jr.normal(k_h, (hidden,))
        model = GRUNet(cell, eqx.nn.Linear(hidden, N_OUT, key=k_ro))
    else:
        cell = eqx.nn.LSTMCell(n_in, hidden, key=k_cell)
        h0 = (0.5 * jr.normal(k_h, (hidden,)), 0.5 * jr.normal(k_c, (hidden,)))
        model = LSTMNet(cell, eqx.nn.Linear(hidden, N_OUT, key=k_ro))
    # Scale weights up a little so that the gates are well away from linear.
    model = eqx.tree_at(
        lambda m: (m.cell.weight_ih, m.cell.weight_hh),
        model,
        (2.0 * model.cell.weight_ih, 2.0 * model.cell.weight_hh),
    )
    xs = jr.normal(k_x, (length, n_in))
    targets = jr.normal(k_y, (length, N_OUT))
    for leaf in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)):
        assert leaf.dtype == jnp.float64
    return model, h0, xs, targets


def npy(a):
    return np.asarray(a, dtype=np.float64)


def rel_err(a, b) -> float:
    a = npy(a).ravel()
    b = npy(b).ravel()
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def sig(a):
    return 1.0 / (1.0 + np.exp(-a))


# ------------------------------------------------------- hand-written D and Df (NumPy)


def gru_tail_hand(yi, yh, b, bn, h):
    """Forward of the GRU tail and its analytic diagonal Jacobians.

    Returns `h', D (H,), Df_ih (3H,), Df_hh (3H,), Df_b (3H,), Df_bn (H,)`.
    """
    H = h.shape[0]
    ir, iz, in_ = np.split(yi + b, 3)
    hr, hz, hn = np.split(yh, 3)
    r = sig(ir + hr)
    z = sig(iz + hz)
    n = np.tanh(in_ + r * (hn + bn))
    h_new = n + z * (h - n)
    D = z
    dn = (1.0 - z) * (1.0 - n**2)
    df_r = dn * (hn + bn) * r * (1.0 - r)
    df_z = (h - n) * z * (1.0 - z)
    df_ih = np.concatenate([df_r, df_z, dn])
    df_hh = np.concatenate([df_r, df_z, dn * r])
    df_b = df_ih.copy()
    df_bn = dn * r
    assert D.shape == (H,) and df_ih.shape == (3 * H,)
    return h_new, D, df_ih, df_hh, df_b, df_bn


def lstm_tail_hand(yi, yh, b, h, c):
    """Forward of the LSTM tail and its analytic diagonal Jacobians (k=0: h, k=1: c).

    Returns `h', c', D (H, 2, 2), Df (4H, 2)` (Df is the same for W_ih, W_hh, bias).
    """
    del h  # h^{t-1} reaches the tail only through W_hh h, which is held fixed
    H = c.shape[0]
    ai, af, ag, ao = np.split(yi + yh + b, 4)
    i, f, g, o = sig(ai), sig(af), np.tanh(ag), sig(ao)
    c_new = f * c + i * g
    tc = np.tanh(c_new)
    h_new = o * tc
    s = o * (1.0 - tc**2)  # dh'/dc'
    D = np.zeros((H, 2, 2))
    D[:, 0, 1] = s * f  # dh'/dc
    D[:, 1, 1] = f  # dc'/dc
    dc = np.concatenate([g * i * (1 - i), c * f * (1 - f), i * (1 - g**2), 0.0 * o])
    dh = np.concatenate([np.tile(s, 3) * dc[: 3 * H], tc * o * (1 - o)])
    Df = np.stack([dh, dc], axis=-1)
    return h_new, c_new, D, Df


# ------------------------------------------------- hand-written D-RTRL loops (NumPy)


def gru_hand(model, h0, xs, targets, *, mode="drtrl"):
    """D-RTRL for GRUNet, by hand. `mode`: "drtrl", or "reset" (eps = Df x each step).

    Returns `(total grads dict, list of per-step grads dicts, losses)`.
    """
    cell = model.cell
    Wih, Whh = npy(cell.weight_ih), npy(cell.weight_hh)
    b, bn = npy(cell.bias), npy(cell.bias_n)
    Wro, bro = npy(model.readout.weight), npy(model.readout.bias)
    xs, targets, h = npy(xs), npy(targets), npy(h0)
    H = h.shape[0]
    eps_ih = np.zeros(Wih.shape)
    eps_hh = np.zeros(Whh.shape)
    eps_b = np.zeros(b.shape)
    eps_bn = np.zeros(bn.shape)
    steps, losses = [], []
    for x, tgt in zip(xs, targets):
        h_new, D, df_ih, df_hh, df_b, df_bn = gru_tail_hand(Wih @ x, Whh @ h, b, bn, h)
        if mode == "reset":
            D = np.zeros_like(D)
        else:
            assert mode == "drtrl"
        Dm = np.tile(D, 3)  # D[n(m)], n(m) = m mod H
        eps_ih = Dm[:, None] * eps_ih + df_ih[:, None] * x[None, :]
        eps_hh = Dm[:, None] * eps_hh + df_hh[:, None] * h[None, :]
        eps_b = Dm * eps_b + df_b
        eps_bn = D * eps_bn + df_bn
        y = Wro @ h_new + bro
        err = y - tgt
        losses.append(0.5 * np.sum(err**2))
        csig = Wro.T @ err  # dL^t/dh^t
        cm = np.tile(csig, 3)
        assert cm.shape == (3 * H,)
        steps.append(
            {
                "weight_ih": cm[:, None] * eps_ih,
                "weight_hh": cm[:, None] * eps_hh,
                "bias": cm * eps_b,
                "bias_n": csig * eps_bn,
                "readout.weight": np.outer(err, h_new),
                "readout.bias": err,
            }
        )
        h = h_new
    total = {k: sum(s[k] for s in steps) for k in steps[0]}
    return total, steps, np.array(losses)


def lstm_hand(model, state0, xs, targets, *, mode="drtrl"):
    """D-RTRL for LSTMNet, by hand.

    `mode`: "drtrl"; "reset" (eps = Df x each step); "transposed" (D[k,k'] read as
    D[k',k]; since the loss reads h only, this happens to give the "reset" gradient);
    "swapped" (the states h and c exchanged: D[1-k,1-k']); "ones" (D all ones).
    """
    cell = model.cell
    Wih, Whh, b = npy(cell.weight_ih), npy(cell.weight_hh), npy(cell.bias)
    Wro, bro = npy(model.readout.weight), npy(model.readout.bias)
    xs, targets = npy(xs), npy(targets)
    h, c = npy(state0[0]), npy(state0[1])
    H = h.shape[0]
    eps_ih = np.zeros(Wih.shape + (2,))
    eps_hh = np.zeros(Whh.shape + (2,))
    eps_b = np.zeros(b.shape + (2,))
    steps, losses = [], []
    for x, tgt in zip(xs, targets):
        h_new, c_new, D, Df = lstm_tail_hand(Wih @ x, Whh @ h, b, h, c)
        if mode == "reset":
            D = np.zeros_like(D)
        elif mode == "transposed":
            D = np.swapaxes(D, 1, 2)
        elif mode == "swapped":
            D = D[:, ::-1, ::-1]  # the roles of h and c exchanged
        elif mode == "ones":
            D = np.ones_like(D)
        else:
            assert mode == "drtrl"
        Dm = np.tile(D, (4, 1, 1))  # D[n(m)]
        eps_ih = (
            np.einsum("mkl,mil->mik", Dm, eps_ih) + Df[:, None, :] * x[None, :, None]
        )
        eps_hh = (
            np.einsum("mkl,mil->mik", Dm, eps_hh) + Df[:, None, :] * h[None, :, None]
        )
        eps_b = np.einsum("mkl,ml->mk", Dm, eps_b) + Df
        y = Wro @ h_new + bro
        err = y - tgt
        losses.append(0.5 * np.sum(err**2))
        c_h = Wro.T @ err  # dL^t/dh^t
        csig = np.stack([c_h, np.zeros(H)], axis=-1)  # (H, 2): the loss reads h only
        cm = np.tile(csig, (4, 1))  # c_k[n(m)]
        steps.append(
            {
                "weight_ih": np.einsum("mk,mik->mi", cm, eps_ih),
                "weight_hh": np.einsum("mk,mik->mi", cm, eps_hh),
                "bias": np.einsum("mk,mk->m", cm, eps_b),
                "readout.weight": np.outer(err, h_new),
                "readout.bias": err,
            }
        )
        h, c = h_new, c_new
    total = {k: sum(s[k] for s in steps) for k in steps[0]}
    return total, steps, np.array(losses)


HAND = {"gru": gru_hand, "lstm": lstm_hand}


def as_dict(family, grads):
    """The gradient leaves of a model-shaped pytree, keyed like the hand dicts."""
    out = {
        "weight_ih": grads.cell.weight_ih,
        "weight_hh": grads.cell.weight_hh,
        "bias": grads.cell.bias,
        "readout.weight": grads.readout.weight,
        "readout.bias": grads.readout.bias,
    }
    if family == "gru":
        out["bias_n"] = grads.cell.bias_n
    return {k: npy(v) for k, v in out.items()}


TRACED = {
    "gru": ("weight_ih", "weight_hh", "bias", "bias_n"),
    "lstm": ("weight_ih", "weight_hh", "bias"),
}


def errors(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: rel_err(a[k], b[k]) for k in b}


def my_bptt(model, state0, xs, targets):
    """Plain BPTT: jax.grad through an unrolled Python loop (independent of etrace)."""

    def total_loss(m):
        s, total = state0, 0.0
        for x, tgt in zip(xs, targets):
            y, s = m(x, s)
            total = total + loss_fn(y, tgt)
        return total

    # Compiled as one program: eagerly, each primitive of the unrolled loop and
    # of its transpose would compile apart.
    return eqx.filter_jit(eqx.filter_grad(total_loss))(model)


# ----------------------------------------- self-checks of the hand formulas (no etrace)


def _gru_tail_jnp(yi, yh, b, bn, h):
    # Transcription of eqx.nn.GRUCell.__call__ (0.13.8) after the two matmuls.
    igates = jnp.split(yi + b, 3)
    hgates = jnp.split(yh, 3)
    reset = jax.nn.sigmoid(igates[0] + hgates[0])
    inp = jax.nn.sigmoid(igates[1] + hgates[1])
    new = jnp.tanh(igates[2] + reset * (hgates[2] + bn))
    return new + inp * (h - new)


def _lstm_tail_jnp(yi, yh, b, h, c):
    # Transcription of eqx.nn.LSTMCell.__call__ (0.13.8) after the two matmuls.
    del h
    lin = yi + yh + b
    i, f, g, o = jnp.split(lin, 4)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c + i * g
    return o * jnp.tanh(c), c


def _diag_block(J, H, c):
    """For J of shape (H, c*H): (values J[n(m), m], off-diagonal part)."""
    m = np.arange(c * H)
    on = J[m % H, m]
    off = J.copy()
    off[m % H, m] = 0.0
    return on, off


@hyp
@given(hidden=sizes["hidden"], n_in=sizes["n_in"], seed=sizes["seed"])
def test_gru_hand_jacobians_match_autodiff(hidden, n_in, seed):
    model, h0, xs, _ = make_problem("gru", hidden, n_in, 2, seed)
    cell = model.cell
    x = xs[0]
    args = (cell.weight_ih @ x, cell.weight_hh @ h0, cell.bias, cell.bias_n, h0)
    # The transcribed tail is Equinox's cell.
    np.testing.assert_allclose(
        _gru_tail_jnp(*args), cell(x, h0), rtol=1e-13, atol=1e-14
    )
    h_new, D, df_ih, df_hh, df_b, df_bn = gru_tail_hand(*map(npy, args))
    np.testing.assert_allclose(h_new, cell(x, h0), rtol=1e-13, atol=1e-14)
    J = jax.jit(jax.jacfwd(_gru_tail_jnp, argnums=(0, 1, 2, 3, 4)))(*args)
    J = [npy(j) for j in J]
    for Jx, hand, c in ((J[0], df_ih, 3), (J[1], df_hh, 3), (J[2], df_b, 3)):
        on, off = _diag_block(Jx, hidden, c)
        np.testing.assert_allclose(on, hand, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(off, 0.0)  # neuron-local
    on, off = _diag_block(J[3], hidden, 1)
    np.testing.assert_allclose(on, df_bn, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(off, 0.0)
    on, off = _diag_block(J[4], hidden, 1)
    np.testing.assert_allclose(on, D, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(off, 0.0)


@hyp
@given(hidden=sizes["hidden"], n_in=sizes["n_in"], seed=sizes["seed"])
def test_lstm_hand_jacobians_match_autodiff(hidden, n_in, seed):
    model, (h0, c0), xs, _ = make_problem("lstm", hidden, n_in, 2, seed)
    cell = model.cell
    x = xs[0]
    args = (cell.weight_ih @ x, cell.weight_hh @ h0, cell.bias, h0, c0)
    ref_h, ref_c = cell(x, (h0, c0))
    got_h, got_c = _lstm_tail_jnp(*args)
    np.testing.assert_allclose(got_h, ref_h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(got_c, ref_c, rtol=1e-13, atol=1e-14)
    h_new, c_new, D, Df = lstm_tail_hand(*map(npy, args))
    np.testing.assert_allclose(h_new, ref_h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(c_new, ref_c, rtol=1e-13, atol=1e-14)
    J = jax.jit(jax.jacfwd(_lstm_tail_jnp, argnums=(0, 1, 2, 3, 4)))(*args)  # [k][arg]
    for k in range(2):
        for a in range(3):  # yi, yh, bias: all enter as the same sum
            on, off = _diag_block(npy(J[k][a]), hidden, 4)
            np.testing.assert_allclose(on, Df[:, k], rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(off, 0.0)
        for kp in range(2):  # previous h (arg 3), previous c (arg 4)
            on, off = _diag_block(npy(J[k][3 + kp]), hidden, 1)
            np.testing.assert_allclose(on, D[:, k, kp], rtol=1e-12, atol=1e-14)
            np.testing.assert_array_equal(off, 0.0)


def _check_hand_drtrl_exact(hidden, n_in, length, seed):
    """With W_hh = 0 the recurrence is element-wise, so hand D-RTRL must equal BPTT
    (computed here by jax.grad, independently of etrace) for every parameter, W_hh
    included; with W_hh != 0 it must not. This checks the hand loops, not etrace."""
    for family in ("gru", "lstm"):
        model, state0, xs, targets = make_problem(family, hidden, n_in, length, seed)
        zeroed = eqx.tree_at(
            lambda m: m.cell.weight_hh, model, jnp.zeros_like(model.cell.weight_hh)
        )
        hand, _, losses = HAND[family](zeroed, state0, xs, targets)
        bptt = as_dict(family, my_bptt(zeroed, state0, xs, targets))
        errs = errors(hand, bptt)
        assert max(errs.values()) <= RTOL, (family, errs)

        hand, _, _ = HAND[family](model, state0, xs, targets)
        bptt = as_dict(family, my_bptt(model, state0, xs, targets))
        errs = errors(hand, bptt)
        assert errs["weight_hh"] > FAIL and errs["weight_ih"] > FAIL, (family, errs)


(
    test_hand_drtrl_is_exact_without_recurrent_weights,
    test_hand_drtrl_is_exact_without_recurrent_weights_sweep,
) = sweep(3, 30, **sizes)(_check_hand_drtrl_exact)


# ---------------------------------------------------------------- etrace vs the hand


def etrace_online(model, state0, xs, targets):
    learner, ts = etrace.compile(model, xs[0], state=state0)
    grads, _, losses = etrace.online_grad(learner, loss_fn, model, ts, xs, targets)
    return learner, ts, grads, losses


def etrace_per_step(learner, ts, model, xs, targets):
    @eqx.filter_jit
    def step_grad(model, ts, x, tgt):
        def f(m):
            y, ts2 = learner.step(m, ts, x)
            return loss_fn(y, tgt), ts2

        (loss, ts2), g = eqx.filter_value_and_grad(f, has_aux=True)(model)
        return g, ts2, loss

    out = []
    for x, tgt in zip(xs, targets):
        g, ts, _ = step_grad(model, ts, x, tgt)
        out.append(g)
    return out


def check_against_hand(family, hidden, n_in, length, seed):
    model, state0, xs, targets = make_problem(family, hidden, n_in, length, seed)
    hand, hand_steps, hand_losses = HAND[family](model, state0, xs, targets)

    learner, ts, grads, losses = etrace_online(model, state0, xs, targets)
    np.testing.assert_allclose(losses, hand_losses, rtol=1e-12)
    got = as_dict(family, grads)
    errs = errors(got, hand)
    assert max(errs.values()) <= RTOL, f"etrace online_grad vs hand D-RTRL: {errs}"

    # Per step, through learner.step (no compensating errors across steps).
    for t, g in enumerate(etrace_per_step(learner, ts, model, xs, targets)):
        errs = errors(as_dict(family, g), hand_steps[t])
        assert max(errs.values()) <= RTOL, f"step {t}: {errs}"

    # Negative controls: wrong variants of the hand equations must fail the tolerance.
    controls = ["reset"] + (
        ["transposed", "swapped", "ones"] if family == "lstm" else []
    )
    for mode in controls:
        wrong, _, _ = HAND[family](model, state0, xs, targets, mode=mode)
        errs = errors(got, wrong)
        for k in TRACED[family]:
            assert errs[k] > FAIL, f"control {mode!r} not detected on {k}: {errs}"

    # BPTT: etrace's oracle equals plain jax.grad BPTT, and differs from D-RTRL (these
    # cells have recurrent weights).
    bptt, bptt_losses = etrace.bptt_grad(loss_fn, model, state0, xs, targets)
    bptt = as_dict(family, bptt)
    np.testing.assert_allclose(bptt_losses, hand_losses, rtol=1e-12)
    mine = as_dict(family, my_bptt(model, state0, xs, targets))
    errs = errors(bptt, mine)
    assert max(errs.values()) <= RTOL, f"etrace.bptt_grad vs jax.grad: {errs}"
    errs = errors(got, bptt)
    for k in TRACED[family]:
        assert errs[k] > FAIL, f"D-RTRL equals BPTT on {k}: {errs}"
    # The readout's gradient is the ordinary one: identical in both.
    assert errs["readout.weight"] <= RTOL and errs["readout.bias"] <= RTOL, errs


def _check_gru(hidden, n_in, length, seed):
    check_against_hand("gru", hidden, n_in, length, seed)


def _check_lstm(hidden, n_in, length, seed):
    check_against_hand("lstm", hidden, n_in, length, seed)


test_gru_drtrl_equals_hand, test_gru_drtrl_equals_hand_sweep = sweep(3, 30, **sizes)(
    _check_gru
)
test_lstm_drtrl_equals_hand, test_lstm_drtrl_equals_hand_sweep = sweep(3, 30, **sizes)(
    _check_lstm
)
