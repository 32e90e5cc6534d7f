"""Surrogate spike functions: a step forwards, a smooth derivative backwards."""

from __future__ import annotations

import abc
import functools as ft
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._errors import EtraceError


def _as_float(value):
    # Ints become floats (so `slope=5` is fine and the field hashes consistently);
    # anything else is left for `__check_init__` to refuse with a clear message.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# The surrogate itself is the non-differentiable argument: its fields are all static
# hyper-parameters, so the derivative it computes is part of the rule, not an input.
# Not annotated: the target of a `custom_jvp` stays plain (shared/STYLE.md).
@ft.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _heaviside(surrogate, x):
    return (x > 0).astype(x.dtype)


@_heaviside.defjvp
def _heaviside_jvp(surrogate, primals, tangents):
    (x,), (dx,) = primals, tangents
    return _heaviside(surrogate, x), surrogate.derivative(x) * dx


class AbstractSurrogate(eqx.Module):
    r"""A spike function with a surrogate gradient.

    Called on the distance to threshold $x$ (for a neuron, $v - \vartheta$), it
    returns the Heaviside step $H(x) = [x > 0]$ in the dtype of $x$: spikes are
    exactly 0 or 1. Its derivative, in forward and reverse mode alike, is replaced by
    a smooth pseudo-derivative $\sigma'(x)$ defined by `derivative` (through
    `jax.custom_jvp`, with the surrogate as a non-differentiable argument). It works
    under `jax.jit`, `jax.vmap`, `jax.grad` and `jax.vjp`.

    Subclasses set `slope`, the inverse width of the pseudo-derivative (larger is
    sharper), and implement `derivative`. The shipped ones are normalised so that
    their default `slope` gives a peak near 1, the derivative of a unit-slope ramp.

    **Arguments:**

    - `x`: any floating-point array.

    **Returns:**

    `H(x)`, same shape and dtype as `x`.
    """

    slope: eqx.AbstractVar[float]

    def __check_init__(self):
        if not (isinstance(self.slope, float) and math.isfinite(self.slope)) or (
            self.slope <= 0
        ):
            raise EtraceError(
                f"`slope` of `{type(self).__name__}` must be a finite number > 0, "
                f"got {self.slope!r}. It is the inverse width of the surrogate "
                "derivative; try the default."
            )

    @abc.abstractmethod
    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The pseudo-derivative $\\sigma'(x)$ that replaces $H'(x)$."""

    def __call__(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return _heaviside(self, x)


class Sigmoid(AbstractSurrogate):
    r"""Derivative of a logistic sigmoid (Zenke & Vogels 2021).

    $$\sigma'(x) = k\, s(kx)\,(1 - s(kx)), \qquad s(u) = 1 / (1 + e^{-u}),$$

    with $k$ the `slope`: the derivative of $s(kx)$, which integrates to 1 and peaks
    at $k / 4$.

    **Arguments:**

    - `slope`: $k > 0$, default 4 (peak 1).
    """

    slope: float = eqx.field(default=4.0, static=True, converter=_as_float)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        s = jax.nn.sigmoid(self.slope * x)
        return self.slope * s * (1 - s)


class FastSigmoid(AbstractSurrogate):
    r"""SuperSpike's fast sigmoid (Zenke & Ganguli 2018, eq. 3).

    $$\sigma'(x) = \frac{1}{(1 + k |x|)^2},$$

    with $k$ the `slope`: peak 1 at $x = 0$ whatever $k$, integral $2 / k$.

    **Arguments:**

    - `slope`: $k > 0$, default 10 (the SuperSpike paper's $\beta$).
    """

    slope: float = eqx.field(default=10.0, static=True, converter=_as_float)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return 1 / (1 + self.slope * jnp.abs(x)) ** 2


class Triangle(AbstractSurrogate):
    r"""Piecewise-linear ("triangle", "ReLU-grad") pseudo-derivative (Bellec et al.
    2018, 2020, with the dampening factor absorbed).

    $$\sigma'(x) = k \max(0,\, 1 - k |x|),$$

    with $k$ the `slope`: support $|x| < 1/k$, peak $k$, integral 1. Bellec et al.'s
    $\gamma \max(0, 1 - |x|)$ is this with $k = 1$, times $\gamma$.

    **Arguments:**

    - `slope`: $k > 0$, default 1 (peak 1, support $|x| < 1$).
    """

    slope: float = eqx.field(default=1.0, static=True, converter=_as_float)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return self.slope * jnp.maximum(0, 1 - self.slope * jnp.abs(x))


class Arctan(AbstractSurrogate):
    r"""Derivative of a scaled arctangent (the `ATan` of SpikingJelly; Fang et al.
    2021).

    $$\sigma'(x) = \frac{k / 2}{1 + (\pi k x / 2)^2},$$

    the derivative of $\tfrac{1}{\pi}\arctan(\tfrac{\pi}{2} k x) + \tfrac12$, with $k$
    the `slope`: integral 1, peak $k / 2$.

    **Arguments:**

    - `slope`: $k > 0$, default 2 (peak 1).
    """

    slope: float = eqx.field(default=2.0, static=True, converter=_as_float)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return (self.slope / 2) / (1 + (math.pi * self.slope * x / 2) ** 2)


class Gaussian(AbstractSurrogate):
    r"""Gaussian pseudo-derivative (Yin et al. 2021).

    $$\sigma'(x) = \frac{k}{\sqrt{2\pi}}\, e^{-(k x)^2 / 2},$$

    the normal density with standard deviation $1/k$, $k$ the `slope`: integral 1,
    peak $k / \sqrt{2\pi}$.

    **Arguments:**

    - `slope`: $k > 0$, default 2.5 (peak 0.997).
    """

    slope: float = eqx.field(default=2.5, static=True, converter=_as_float)

    def derivative(self, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        return (
            self.slope / math.sqrt(2 * math.pi) * jnp.exp(-((self.slope * x) ** 2) / 2)
        )
