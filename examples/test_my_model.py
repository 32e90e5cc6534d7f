"""Checks etrace's online gradients on a model of your own, against BPTT.

Copy this file into your test suite and replace `SpikingNet` with your model. It needs
pytest and hypothesis, and runs in well under a minute:

    python -m pytest -q test_my_model.py

Every test runs in float64 (the `x64` fixture), where an exact online gradient agrees
with BPTT to 1e-9 relative.
"""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import assume, given, settings

import etrace
import etrace.testing as et
from etrace.testing import x64  # noqa: F401  (a fixture: importing it makes it usable)


pytestmark = pytest.mark.usefixtures("x64")

N_IN, HIDDEN, N_OUT = 3, 5, 2
THRESHOLD = 1.0


@jax.custom_jvp
def spike(v):
    """A Heaviside step whose derivative is replaced by a fast-sigmoid surrogate."""
    return (v > 0).astype(v.dtype)


@spike.defjvp
def _spike_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    return spike(v), dv / (1.0 + 5.0 * jnp.abs(v)) ** 2


class SpikingNet(eqx.Module):
    """Leaky integrate-and-fire neurons with a learnable decay each, a soft reset, and
    a linear readout of their spikes.

    With `recurrent=True` the previous step's spikes also feed back through a weight
    matrix, so the neurons' memories mix and D-RTRL becomes an approximation.
    """

    encoder: eqx.nn.Linear
    decay: jax.Array
    recurrent: eqx.nn.Linear | None
    readout: eqx.nn.Linear

    def __init__(self, n_in, hidden, n_out, *, recurrent=False, key):
        k1, k2, k3, k4 = jr.split(key, 4)
        self.encoder = eqx.nn.Linear(n_in, hidden, key=k1)
        self.decay = 1.0 + 0.5 * jr.normal(k2, (hidden,))
        self.recurrent = (
            eqx.nn.Linear(hidden, hidden, use_bias=False, key=k3) if recurrent else None
        )
        self.readout = eqx.nn.Linear(hidden, n_out, key=k4)

    def __call__(self, x, v):
        z = spike(v - THRESHOLD)  # the previous step's spikes
        current = self.encoder(x)
        if self.recurrent is not None:
            current = current + self.recurrent(z)
        v = jax.nn.sigmoid(self.decay) * v + current - THRESHOLD * z
        # Read the stored state, not a value from before the reset: that path would
        # only get a one-step gradient.
        return self.readout(spike(v - THRESHOLD)), v


def mse(y, target):
    return 0.5 * jnp.sum((y - target) ** 2)


def setup(seed, *, recurrent=False, length=8, scale=2.0):
    """A float64 model, its zero state and one sequence (built inside the fixture)."""
    model = SpikingNet(N_IN, HIDDEN, N_OUT, recurrent=recurrent, key=jr.key(seed))
    v0 = jnp.zeros(HIDDEN)
    kx, ky = jr.split(jr.key(seed + 1))
    xs = scale * jr.normal(kx, (length, N_IN))
    targets = jr.normal(ky, (length, N_OUT))
    return model, v0, xs, targets


def test_online_gradient_equals_bptt():
    model, v0, xs, targets = setup(seed=0)
    assert xs.dtype == jnp.float64 and model.decay.dtype == jnp.float64
    # A network that never (or always) spikes has zero surrogate gradients almost
    # everywhere and would pass any comparison.
    report = et.liveness(model, xs, state=v0)
    assert report.live, f"the comparison would be vacuous:\n{report}"

    learner, trace_state = etrace.compile(model, xs[0], state=v0)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert regime, str(regime)
    et.assert_matches_bptt(learner, mse, model, trace_state, xs, targets)


def test_recurrent_weight_is_an_approximation():
    model, v0, xs, targets = setup(seed=0, recurrent=True)
    learner, trace_state = etrace.compile(model, xs[0], state=v0)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert not regime and not regime.params["recurrent.weight"]
    assert regime.params["readout.weight"]

    # The readout learns from each step's output alone, which is exact ...
    et.assert_matches_bptt(
        learner, mse, model, trace_state, xs, targets, params="readout"
    )
    # ... while the diagonal traces drop the paths through the recurrent weight. If
    # this starts to agree with BPTT, the model no longer exercises the approximation.
    et.assert_differs_from_bptt(
        learner, mse, model, trace_state, xs, targets, params="recurrent", rtol=1e-4
    )


# NumPy samples are float64 even before the fixture turns float64 on; the sequences
# themselves are drawn inside the test, where it is on.
@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    seq=et.sequences(np.zeros(N_IN), targets=np.zeros(N_OUT), length=(2, 10)),
)
def test_online_gradient_equals_bptt_for_any_seed_and_length(seed, seq):
    model = SpikingNet(N_IN, HIDDEN, N_OUT, key=jr.key(seed))
    v0 = jnp.zeros(HIDDEN)
    assume(et.liveness(model, seq.xs, state=v0).live)
    learner, trace_state = etrace.compile(model, seq.xs[0], state=v0)
    et.assert_matches_bptt(learner, mse, model, trace_state, seq.xs, seq.targets)
