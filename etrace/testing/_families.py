"""Small recurrent and spiking model families, with their exact regimes.

Used by `etrace.testing.model_families` and by etrace's own tests. Each family is an
`eqx.Module` called as `model(x, state) -> (y, state)`; spiking families also have
`spikes(state)`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu


# -- spiking -----------------------------------------------------------------------


@jax.custom_jvp
def spike(x):
    return (x > 0).astype(x.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return spike(x), dx / (1.0 + 4.0 * jnp.abs(x)) ** 2


@jax.custom_vjp
def spike_vjp(x):
    return (x > 0).astype(x.dtype)


def _spike_fwd(x):
    return spike_vjp(x), x


def _spike_bwd(x, g):
    return (g * jnp.maximum(0.0, 1.0 - jnp.abs(x)),)


spike_vjp.defvjp(_spike_fwd, _spike_bwd)


# -- model families (each: (x, state) -> (y, state)) --------------------------------


class Leaky(eqx.Module):
    """Leaky linear layer with learnable decay: h = sigmoid(a) h + W x + b."""

    w: jax.Array
    b: jax.Array
    a: jax.Array
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.w = jr.normal(k1, (hidden, n_in)) / jnp.sqrt(n_in)
        self.b = 0.1 * jr.normal(k2, (hidden,))
        self.a = jr.normal(k3, (hidden,))
        self.readout = eqx.nn.Linear(hidden, n_out, key=k4)

    def __call__(self, x, h):
        h = jax.nn.sigmoid(self.a) * h + jnp.tanh(self.w @ x) + self.b
        return self.readout(h), h


class LIF(eqx.Module):
    """LIF layer, surrogate spikes, soft reset by the previous step's spike."""

    linear: eqx.nn.Linear
    tau: jax.Array
    thr: jax.Array
    use_vjp: bool = eqx.field(static=True)

    def __init__(self, n_in, hidden, key, use_vjp=False):
        k1, k2 = jr.split(key)
        self.linear = eqx.nn.Linear(n_in, hidden, key=k1)
        self.tau = 1.0 + 0.5 * jr.normal(k2, (hidden,))
        self.thr = jnp.full((hidden,), 0.6)
        self.use_vjp = use_vjp

    def fire(self, v):
        return (spike_vjp if self.use_vjp else spike)(v - self.thr)

    def __call__(self, x, v):
        reset = self.fire(v) * self.thr
        v = jax.nn.sigmoid(self.tau) * v + self.linear(x) - reset
        return self.fire(v), v


class LIFNet(eqx.Module):
    lif: LIF
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key, use_vjp=False):
        k1, k2 = jr.split(key)
        self.lif = LIF(n_in, hidden, k1, use_vjp)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)

    def __call__(self, x, v):
        s, v = self.lif(x, v)
        return self.readout(s), v

    def spikes(self, v):
        return self.lif.fire(v)


class ALIFNet(eqx.Module):
    """Two states per neuron: voltage and threshold adaptation (K = 2)."""

    linear: eqx.nn.Linear
    alpha: jax.Array
    rho: jax.Array
    beta: jax.Array
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2, k3 = jr.split(key, 3)
        self.linear = eqx.nn.Linear(n_in, hidden, key=k1)
        self.alpha = 1.0 + 0.3 * jr.normal(k2, (hidden,))
        self.rho = jnp.full((hidden,), 2.0)
        self.beta = jnp.full((hidden,), 0.3)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k3)

    def threshold(self, a):
        return 0.5 + self.beta * a

    def __call__(self, x, state):
        v, a = state
        z = spike(v - self.threshold(a))
        rho = jax.nn.sigmoid(self.rho)
        a = rho * a + (1 - rho) * z
        v = jax.nn.sigmoid(self.alpha) * v + self.linear(x) - z * self.threshold(a)
        return self.readout(spike(v - self.threshold(a))), (v, a)

    def spikes(self, state):
        v, a = state
        return spike(v - self.threshold(a))


class Stack(eqx.Module):
    """Two LIF layers and a readout; the step is wrapped in `eqx.filter_jit`."""

    l1: LIF
    l2: LIF
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2, k3 = jr.split(key, 3)
        self.l1 = LIF(n_in, hidden, k1)
        self.l2 = LIF(hidden, hidden + 1, k2)
        self.readout = eqx.nn.Linear(hidden + 1, n_out, key=k3)

    @eqx.filter_jit
    def __call__(self, x, state):
        v1, v2 = state
        s1, v1 = self.l1(x, v1)
        s2, v2 = self.l2(s1, v2)
        return self.readout(s2), (v1, v2)

    def spikes(self, state):
        return jnp.concatenate([self.l1.fire(state[0]), self.l2.fire(state[1])])


class VanillaRNN(eqx.Module):
    """h = tanh(W x + U h + b): a recurrent weight, so D-RTRL is not exact."""

    cell: eqx.nn.Linear
    rec: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2, k3 = jr.split(key, 3)
        self.cell = eqx.nn.Linear(n_in, hidden, key=k1)
        self.rec = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k2)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k3)

    def __call__(self, x, h):
        h = jnp.tanh(self.cell(x) + 2.0 * self.rec(h))
        return self.readout(h), h


class GRUNet(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.GRUCell(n_in, hidden, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden))

    def __call__(self, x, state):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


class LSTMNet(eqx.Module):
    cell: eqx.nn.LSTMCell
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, key):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.LSTMCell(n_in, hidden, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)

    def __call__(self, x, state):
        h, c = self.cell(x, state)
        return self.readout(h), (h, c)


def zeros_state(family, hidden):
    if family in (ALIFNet, LSTMNet):
        return (jnp.zeros(hidden), jnp.zeros(hidden))
    if family is Stack:
        return (jnp.zeros(hidden), jnp.zeros(hidden + 1))
    return jnp.zeros(hidden)


def build(family, n_in, hidden, n_out, seed, **kwargs):
    """A float64 model of one of etrace's small model families, and its zero state.

    **Arguments:**

    - `family`: a name in `FAMILIES` (`"leaky"`, `"lif"`, `"alif"`, `"stack"`,
        `"rnn"`, `"gru"`, `"lstm"`) or one of its classes.
    - `n_in`, `hidden`, `n_out`: input, hidden and output sizes.
    - `seed`: the seed of the parameters.
    - `**kwargs`: passed to the family's constructor.

    **Returns:**

    `(model, state)`, both in float64 (call it with float64 enabled): the model is
    called as `model(x, state) -> (y, state)`; the state is an array, a tuple of
    arrays, or an `eqx.nn.State` for the GRU.
    """
    family = FAMILIES.get(family, family)
    key = jr.key(seed)
    if family is GRUNet:
        model, state = eqx.nn.make_with_state(family)(n_in, hidden, n_out, key)
        return f64(model), f64(state)
    return f64(family(n_in, hidden, n_out, key, **kwargs)), f64(
        zeros_state(family, hidden)
    )


def data(seed, length, n_in, n_out, scale=1.5, batch=None):
    k1, k2 = jr.split(jr.key(seed + 1000))
    lead = (length,) if batch is None else (length, batch)
    xs = scale * jr.normal(k1, lead + (n_in,), jnp.float64)
    ys = jr.normal(k2, lead + (n_out,), jnp.float64)
    return xs, ys


def firing_rate(model, state, xs) -> float:
    """Mean spike rate of a spiking model over a sequence."""

    def body(s, x):
        _, s = model(x, s)
        return s, model.spikes(s)

    _, spikes = jax.lax.scan(body, state, xs)
    return float(jnp.mean(spikes))


def f64(tree):
    """Casts every floating-point array of a pytree to float64.

    **Arguments:**

    - `tree`: any pytree, e.g. a model built before float64 was enabled or loaded
        from disk. Needs float64 enabled (`etrace.testing.float64`).

    **Returns:**

    The same pytree with every floating-point array in float64; other leaves are
    unchanged.
    """
    return jtu.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree
    )


FAMILIES = {
    "leaky": Leaky,
    "lif": LIFNet,
    "alif": ALIFNet,
    "stack": Stack,
    "rnn": VanillaRNN,
    "gru": GRUNet,
    "lstm": LSTMNet,
}
"""etrace's small model families by name, each an `eqx.Module` called as
`model(x, state) -> (y, state)`: `"leaky"` (a leaky linear layer with a learnable
decay), `"lif"` (LIF neurons with surrogate spikes and a soft reset), `"alif"`
(adaptive LIF, two states per neuron), `"stack"` (two LIF layers), `"rnn"` (a tanh
RNN with a recurrent weight), `"gru"` and `"lstm"` (stock Equinox cells). Build one
with `etrace.testing.build`."""
