"""Spiking neurons and a leaky readout that keep their own state in `eqx.nn.State`."""

from __future__ import annotations

import abc
import math
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import EtraceError
from ._surrogate import AbstractSurrogate, FastSigmoid


_RESETS = ("soft", "hard", "detached")


def _check_size(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EtraceError(
            f"`n`, the number of neurons, must be an int >= 1, got {n!r}."
        )
    return n


def _check_number(name: str, value: Any, *, positive: bool, hint: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > 0 or not positive)
    if not ok:
        need = "a finite number > 0" if positive else "a finite number"
        raise EtraceError(f"`{name}` must be {need}, got {value!r}. {hint}")
    return value


def _check_reset(reset: Any) -> str:
    if reset not in _RESETS:
        raise EtraceError(
            f"`reset` must be one of {', '.join(repr(r) for r in _RESETS)}, got "
            f"{reset!r}: 'soft' subtracts the threshold after a spike, 'hard' sets the "
            "membrane to 0, 'detached' is 'soft' with no gradient through the reset."
        )
    return reset


def _check_surrogate(surrogate: Any) -> AbstractSurrogate:
    if not isinstance(surrogate, AbstractSurrogate):
        raise EtraceError(
            "`surrogate` must be an instance of an `etrace.nn.AbstractSurrogate` such "
            f"as `etrace.nn.FastSigmoid()`, got {surrogate!r}."
        )
    return surrogate


_TAU_HINT = (
    "It is a time constant in steps (the decay per step is exp(-1/tau)); use e.g. "
    "`tau=20.0`."
)


def _maybe_learnt(value: float, learn: bool, n: int, dtype: Any):
    """A per-neuron parameter array if `learn`, else the Python float (no parameter)."""
    return jnp.full((n,), value, dtype) if learn else value


def _decay(tau: float | Array) -> float | Array:
    if isinstance(tau, float):
        return math.exp(-1 / tau)
    return jnp.exp(-1 / tau)


def _reset(
    v: Float[Array, " n"],
    z: Float[Array, " n"],
    threshold: float | Float[Array, " n"],
    mode: str,
) -> Float[Array, " n"]:
    if mode == "soft":
        return v - threshold * z
    if mode == "hard":
        return v * (1 - z)
    return v - threshold * lax.stop_gradient(z)


def _zeros(n: int, dtype: Any) -> eqx.nn.StateIndex:
    return eqx.nn.StateIndex(jnp.zeros((n,), dtype))


class AbstractSpikingNeuron(eqx.nn.StatefulLayer):
    """A layer of `n` spiking neurons that holds its state in an `eqx.nn.State`.

    Called as `neuron(current, state) -> (spikes, state)`, with `current` the input
    current of shape `(n,)` (computed by the caller, e.g. with `eqx.nn.Linear`).
    Every per-neuron quantity is its own `(n,)` state leaf, the spikes of the step
    included: the returned `spikes` *are* the new spike leaf, so a later layer reads a
    state of this neuron. Online algorithms rely on this (e-prop's filtered spikes,
    OTPE): the value the next layer sees must be one they keep a trace of.

    A subclass of `eqx.nn.StatefulLayer`, so it slots into `eqx.nn.Sequential`.
    """

    n: eqx.AbstractVar[int]
    z: eqx.AbstractVar[eqx.nn.StateIndex]

    def spikes(self, state: eqx.nn.State) -> Float[Array, " n"]:
        """The spikes of the previous step (zeros before the first), for recurrent
        connections: `W @ concatenate([x, neuron.spikes(state)])`."""
        return state.get(self.z)

    @abc.abstractmethod
    def __call__(
        self,
        current: Float[Array, " n"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], eqx.nn.State]:
        """**Arguments:**

        - `current`: the input current, shape `(n,)`.
        - `state`: the `eqx.nn.State` holding this neuron's leaves.
        - `key`: ignored; accepted for `eqx.nn.Sequential`.

        **Returns:**

        `(spikes, state)`: the spikes of this step (0 or 1, shape `(n,)`, equal to the
        new spike leaf) and the updated state.
        """


class IF(AbstractSpikingNeuron):
    r"""Integrate-and-fire neurons (no leak).

    $$v' = v + I, \qquad z = H(v' - \vartheta), \qquad
      v \leftarrow \operatorname{reset}(v', z),$$

    with $H$ the `surrogate` spike function and the reset as for `LIF`.

    **State leaves** (each `(n,)`): `v` (membrane, after reset) and `z` (spikes of
    the step).

    **Arguments:**

    - `n`: number of neurons.
    - `threshold`: $\vartheta$, default 1.
    - `reset`: `"soft"` (default), `"hard"` or `"detached"`, as for `LIF`.
    - `surrogate`: an `AbstractSurrogate`, default `FastSigmoid()`.
    - `learn_threshold`: if `True`, $\vartheta$ is a trainable `(n,)` array;
        otherwise a Python float (not a parameter).
    - `dtype`: dtype of the initial state (and trainable threshold); default JAX's
        default float dtype (float64 under `jax_enable_x64`).

    **Raises:**

    `EtraceError` for a bad `n`, `threshold`, `reset` or `surrogate`.
    """

    n: int = eqx.field(static=True)
    threshold: float | Float[Array, " n"]
    reset: str = eqx.field(static=True)
    surrogate: AbstractSurrogate
    v: eqx.nn.StateIndex
    z: eqx.nn.StateIndex

    def __init__(
        self,
        n: int,
        *,
        threshold: float | int = 1.0,
        reset: str = "soft",
        surrogate: AbstractSurrogate = FastSigmoid(),
        learn_threshold: bool = False,
        dtype: Any = None,
    ):
        self.n = _check_size(n)
        threshold = _check_number(
            "threshold", threshold, positive=False, hint="Use e.g. `threshold=1.0`."
        )
        self.threshold = _maybe_learnt(threshold, learn_threshold, n, dtype)
        self.reset = _check_reset(reset)
        self.surrogate = _check_surrogate(surrogate)
        self.v = _zeros(n, dtype)
        self.z = _zeros(n, dtype)

    def __call__(
        self,
        current: Float[Array, " n"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], eqx.nn.State]:
        del key
        v = state.get(self.v) + current
        z = self.surrogate(v - self.threshold)
        v = _reset(v, z, self.threshold, self.reset)
        return z, state.set(self.v, v).set(self.z, z)


class LIF(AbstractSpikingNeuron):
    r"""Leaky integrate-and-fire neurons, with an optional refractory period.

    With $\alpha = e^{-1/\tau}$ ($\tau$ in steps):

    $$v' = \alpha v + I, \qquad z = H(v' - \vartheta),$$

    and the reset

    - `"soft"`: $v \leftarrow v' - \vartheta z$ (subtract the threshold);
    - `"hard"`: $v \leftarrow v' (1 - z)$ (to 0);
    - `"detached"`: $v \leftarrow v' - \vartheta\,\mathrm{sg}(z)$, the soft reset
        with no gradient through the reset term (`jax.lax.stop_gradient`).

    With `refractory=r > 0`, a counter $c$ (a float state leaf) makes the neuron
    silent for $r$ steps after a spike:

    $$o = [c \le 0], \quad z = o\, H(v' - \vartheta), \quad
      v \leftarrow o \operatorname{reset}(v', z), \quad
      c \leftarrow \begin{cases} r & z = 1 \\ \max(c - 1, 0) & z = 0. \end{cases}$$

    While $c > 0$ the neuron cannot spike, its membrane is held at 0 and its input is
    ignored.

    **State leaves** (each `(n,)`): `v` (membrane, after reset), `z` (spikes of the
    step) and, with `refractory > 0`, `counter`.

    **Arguments:**

    - `n`: number of neurons.
    - `tau`: membrane time constant $\tau > 0$ in steps, default 20.
    - `threshold`: $\vartheta$, default 1.
    - `reset`: `"soft"` (default), `"hard"` or `"detached"`.
    - `refractory`: $r \ge 0$ steps of refractoriness after a spike, default 0.
    - `surrogate`: an `AbstractSurrogate`, default `FastSigmoid()`.
    - `learn_tau`: if `True`, $\tau$ is a trainable `(n,)` array and
        $\alpha = e^{-1/\tau}$ is computed in the call (an element-wise parameter of
        the recurrence); otherwise a Python float (not a parameter).
    - `learn_threshold`: if `True`, $\vartheta$ is a trainable `(n,)` array.
    - `dtype`: dtype of the initial state and trainable arrays; default JAX's default
        float dtype (float64 under `jax_enable_x64`).

    **Raises:**

    `EtraceError` for a bad `n`, `tau`, `threshold`, `reset`, `refractory` or
    `surrogate`.
    """

    n: int = eqx.field(static=True)
    tau: float | Float[Array, " n"]
    threshold: float | Float[Array, " n"]
    reset: str = eqx.field(static=True)
    refractory: int = eqx.field(static=True)
    surrogate: AbstractSurrogate
    v: eqx.nn.StateIndex
    z: eqx.nn.StateIndex
    counter: eqx.nn.StateIndex | None

    def __init__(
        self,
        n: int,
        *,
        tau: float | int = 20.0,
        threshold: float | int = 1.0,
        reset: str = "soft",
        refractory: int = 0,
        surrogate: AbstractSurrogate = FastSigmoid(),
        learn_tau: bool = False,
        learn_threshold: bool = False,
        dtype: Any = None,
    ):
        self.n = _check_size(n)
        tau = _check_number("tau", tau, positive=True, hint=_TAU_HINT)
        threshold = _check_number(
            "threshold", threshold, positive=False, hint="Use e.g. `threshold=1.0`."
        )
        if isinstance(refractory, bool) or not isinstance(refractory, int):
            raise EtraceError(
                f"`refractory` must be an int number of steps >= 0, got {refractory!r}."
            )
        if refractory < 0:
            raise EtraceError(
                f"`refractory` must be >= 0 steps, got {refractory}. Use 0 for no "
                "refractory period."
            )
        self.tau = _maybe_learnt(tau, learn_tau, n, dtype)
        self.threshold = _maybe_learnt(threshold, learn_threshold, n, dtype)
        self.reset = _check_reset(reset)
        self.refractory = refractory
        self.surrogate = _check_surrogate(surrogate)
        self.v = _zeros(n, dtype)
        self.z = _zeros(n, dtype)
        self.counter = _zeros(n, dtype) if refractory > 0 else None

    def __call__(
        self,
        current: Float[Array, " n"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], eqx.nn.State]:
        del key
        v = _decay(self.tau) * state.get(self.v) + current
        z = self.surrogate(v - self.threshold)
        if self.counter is None:
            v = _reset(v, z, self.threshold, self.reset)
            return z, state.set(self.v, v).set(self.z, z)
        counter = state.get(self.counter)
        # A constant mask: refractoriness has no gradient of its own.
        open_ = (counter <= 0).astype(v.dtype)
        z = open_ * z
        v = open_ * _reset(v, z, self.threshold, self.reset)
        counter = jnp.where(z > 0, float(self.refractory), jnp.maximum(counter - 1, 0))
        state = state.set(self.v, v).set(self.z, z).set(self.counter, counter)
        return z, state


class ALIF(AbstractSpikingNeuron):
    r"""Adaptive leaky integrate-and-fire neurons (Bellec et al. 2018, 2020).

    Each neuron's threshold rises after its spikes and relaxes back. With
    $\alpha = e^{-1/\tau}$, $\rho = e^{-1/\tau_a}$ and $z_{\text{prev}}$ the spike
    leaf of the previous step:

    $$a' = \rho a + (1 - \rho) z_{\text{prev}}, \qquad
      A = \vartheta + \beta a',$$
    $$v' = \alpha v + I, \qquad z = H(v' - A), \qquad
      v \leftarrow v' - A z \ (\text{soft}).$$

    `"hard"` resets to $v'(1 - z)$ and `"detached"` uses $\mathrm{sg}(z)$ in the
    soft reset, as for `LIF`. The adaptation $a$ is a low-pass filter of the spike
    train (in spikes per step), the convention of the LSNN code where the defaults
    $\beta = 1.8$, $\tau_a = 200$ come from; Bellec et al. (2020, Methods) write
    $a' = \rho a + z$, which is this with $\beta$ replaced by $\beta / (1 - \rho)$.

    **State leaves** (each `(n,)`): `v` (membrane, after reset), `a` (adaptation)
    and `z` (spikes of the step). `z` is read back as $z_{\text{prev}}$ on the next
    step, so the three form one group of three states per neuron.

    **Arguments:**

    - `n`: number of neurons.
    - `tau`: membrane time constant in steps, default 20.
    - `tau_adapt`: adaptation time constant $\tau_a$ in steps, default 200.
    - `beta`: adaptation strength $\beta \ge 0$, default 1.8.
    - `threshold`: baseline threshold $\vartheta$, default 1.
    - `reset`: `"soft"` (default), `"hard"` or `"detached"`.
    - `surrogate`: an `AbstractSurrogate`, default `FastSigmoid()`.
    - `learn_tau`: if `True`, $\tau$ is a trainable `(n,)` array.
    - `learn_threshold`: if `True`, $\vartheta$ is a trainable `(n,)` array.
    - `dtype`: dtype of the initial state and trainable arrays; default JAX's default
        float dtype.

    **Raises:**

    `EtraceError` for a bad `n`, time constant, `beta`, `threshold`, `reset` or
    `surrogate`.
    """

    n: int = eqx.field(static=True)
    tau: float | Float[Array, " n"]
    tau_adapt: float = eqx.field(static=True)
    beta: float = eqx.field(static=True)
    threshold: float | Float[Array, " n"]
    reset: str = eqx.field(static=True)
    surrogate: AbstractSurrogate
    v: eqx.nn.StateIndex
    a: eqx.nn.StateIndex
    z: eqx.nn.StateIndex

    def __init__(
        self,
        n: int,
        *,
        tau: float | int = 20.0,
        tau_adapt: float | int = 200.0,
        beta: float | int = 1.8,
        threshold: float | int = 1.0,
        reset: str = "soft",
        surrogate: AbstractSurrogate = FastSigmoid(),
        learn_tau: bool = False,
        learn_threshold: bool = False,
        dtype: Any = None,
    ):
        self.n = _check_size(n)
        tau = _check_number("tau", tau, positive=True, hint=_TAU_HINT)
        self.tau_adapt = _check_number(
            "tau_adapt",
            tau_adapt,
            positive=True,
            hint="It is the adaptation time constant in steps; use e.g. 200.0.",
        )
        beta = _check_number("beta", beta, positive=False, hint="Use e.g. 1.8.")
        if beta < 0:
            raise EtraceError(
                f"`beta` must be >= 0 (the threshold rises after a spike), got {beta}."
            )
        self.beta = beta
        threshold = _check_number(
            "threshold", threshold, positive=False, hint="Use e.g. `threshold=1.0`."
        )
        self.tau = _maybe_learnt(tau, learn_tau, n, dtype)
        self.threshold = _maybe_learnt(threshold, learn_threshold, n, dtype)
        self.reset = _check_reset(reset)
        self.surrogate = _check_surrogate(surrogate)
        self.v = _zeros(n, dtype)
        self.a = _zeros(n, dtype)
        self.z = _zeros(n, dtype)

    def __call__(
        self,
        current: Float[Array, " n"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], eqx.nn.State]:
        del key
        rho = math.exp(-1 / self.tau_adapt)
        a = rho * state.get(self.a) + (1 - rho) * state.get(self.z)
        adaptive = self.threshold + self.beta * a
        v = _decay(self.tau) * state.get(self.v) + current
        z = self.surrogate(v - adaptive)
        v = _reset(v, z, adaptive, self.reset)
        return z, state.set(self.v, v).set(self.a, a).set(self.z, z)


class LeakyRateReadout(eqx.nn.StatefulLayer):
    r"""A leaky integrator: the usual readout of a spiking network (e-prop's output
    neurons).

    $$y' = \kappa y + I, \qquad \kappa = e^{-1/\tau}.$$

    **State leaf** (`(n,)`): `y`.

    **Arguments:**

    - `n`: number of units.
    - `tau`: time constant $\tau > 0$ in steps (default 20); or
    - `kappa`: the decay $\kappa \in (0, 1)$ itself, stored as
        $\tau = -1 / \log\kappa$. Give at most one of the two.
    - `learn_tau`: if `True`, $\tau$ is a trainable `(n,)` array; otherwise a Python
        float (not a parameter).
    - `dtype`: dtype of the initial state and trainable arrays; default JAX's default
        float dtype.

    Called as `readout(current, state) -> (y', state)`.

    **Raises:**

    `EtraceError` for a bad `n`, `tau` or `kappa`, or both `tau` and `kappa`.
    """

    n: int = eqx.field(static=True)
    tau: float | Float[Array, " n"]
    y: eqx.nn.StateIndex

    def __init__(
        self,
        n: int,
        *,
        tau: float | int | None = None,
        kappa: float | int | None = None,
        learn_tau: bool = False,
        dtype: Any = None,
    ):
        self.n = _check_size(n)
        if tau is not None and kappa is not None:
            raise EtraceError(
                "Give at most one of `tau` (a time constant in steps) and `kappa` (the "
                f"decay per step, exp(-1/tau)), got tau={tau!r} and kappa={kappa!r}."
            )
        if kappa is not None:
            kappa = _check_number("kappa", kappa, positive=True, hint="")
            if not kappa < 1:
                raise EtraceError(
                    f"`kappa` must lie in (0, 1), got {kappa!r}: it is the decay per "
                    "step exp(-1/tau)."
                )
            tau = -1 / math.log(kappa)
        tau = _check_number(
            "tau", 20.0 if tau is None else tau, positive=True, hint=_TAU_HINT
        )
        self.tau = _maybe_learnt(tau, learn_tau, n, dtype)
        self.y = _zeros(n, dtype)

    def __call__(
        self,
        current: Float[Array, " n"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " n"], eqx.nn.State]:
        """**Arguments:**

        - `current`: the input, shape `(n,)`.
        - `state`: the `eqx.nn.State` holding the leaf `y`.
        - `key`: ignored; accepted for `eqx.nn.Sequential`.

        **Returns:**

        `(y', state)`.
        """
        del key
        y = _decay(self.tau) * state.get(self.y) + current
        return y, state.set(self.y, y)
