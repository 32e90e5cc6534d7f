"""Simple recurrent cells in the convention of `eqx.nn.GRUCell`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import EtraceError


def _default_dtype(dtype: Any) -> Any:
    return jnp.zeros((), dtype).dtype if dtype is None else dtype


def _check_unit_range(names: tuple[str, str], low: Any, high: Any, what: str) -> None:
    """`0 < low <= high < 1` for an initialisation range, else an `EtraceError`
    naming both arguments and what they range over."""
    if not 0 < low <= high < 1:
        lo, hi = names
        raise EtraceError(
            f"`{lo}` and `{hi}` must satisfy 0 < {lo} <= {hi} < 1 (the range of "
            f"{what}), got {lo}={low!r}, {hi}={high!r}."
        )


def _check_sizes(input_size: Any, hidden_size: Any) -> None:
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EtraceError(f"`{name}` must be an int >= 1, got {value!r}.")


class ElmanCell(eqx.Module):
    r"""A single step of an Elman (vanilla) RNN.

    $$h' = \phi(W_{ih} x + W_{hh} h + b).$$

    Its hidden-to-hidden weight $W_{hh}$ couples neurons through time, so diagonal
    online algorithms (D-RTRL, e-prop) are approximations on it.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of the hidden state $h$.
    - `use_bias`: whether to add the bias $b$ (default `True`).
    - `activation`: $\phi$, default `jax.numpy.tanh`.
    - `dtype`: dtype of the weights; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    All weights and the bias are drawn uniformly from
    $[-1/\sqrt{\text{hidden}}, 1/\sqrt{\text{hidden}}]$, as in `eqx.nn.GRUCell`.

    Called as `cell(input, hidden) -> hidden`.
    """

    weight_ih: Float[Array, "hidden input"]
    weight_hh: Float[Array, "hidden hidden"]
    bias: Float[Array, " hidden"] | None
    activation: Callable[..., Any]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        use_bias: bool = True,
        activation: Callable[..., Any] = jnp.tanh,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        dtype = _default_dtype(dtype)
        kih, khh, kb = jr.split(key, 3)
        lim = 1 / math.sqrt(hidden_size)
        self.weight_ih = jr.uniform(
            kih, (hidden_size, input_size), dtype, minval=-lim, maxval=lim
        )
        self.weight_hh = jr.uniform(
            khh, (hidden_size, hidden_size), dtype, minval=-lim, maxval=lim
        )
        self.bias = (
            jr.uniform(kb, (hidden_size,), dtype, minval=-lim, maxval=lim)
            if use_bias
            else None
        )
        self.activation = activation
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.use_bias = use_bias

    def __call__(
        self,
        input: Float[Array, " input"],
        hidden: Float[Array, " hidden"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " hidden"]:
        """**Arguments:**

        - `input`: shape `(input_size,)`.
        - `hidden`: shape `(hidden_size,)`.
        - `key`: ignored.

        **Returns:**

        The new hidden state, shape `(hidden_size,)`.
        """
        del key
        pre = self.weight_ih @ input + self.weight_hh @ hidden
        if self.bias is not None:
            pre = pre + self.bias
        return self.activation(pre)


class DiagonalLinearCell(eqx.Module):
    r"""A real-valued linear recurrent unit with a diagonal recurrence (LRU-style;
    Orvieto et al. 2023).

    $$h' = a \odot h + \gamma \odot (B x), \qquad a = e^{-e^{\nu}}, \qquad
      \gamma = \sqrt{1 - a^2},$$

    with $\nu$ learnable per unit (so $0 < a < 1$ always) and $B$ a learnable matrix.
    The normalisation $\gamma$ keeps the state's variance independent of $a$ for white
    input. The recurrence is element-wise, so D-RTRL is exact on this cell.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of the hidden state $h$.
    - `r_min`, `r_max`: $a$ is initialised uniformly in `[r_min, r_max]`
        ($0 < r_{\min} \le r_{\max} < 1$); default `[0.4, 0.99]`.
    - `dtype`: dtype of the parameters; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    $B$ is drawn uniformly from $[-1/\sqrt{\text{input}}, 1/\sqrt{\text{input}}]$.

    Called as `cell(input, hidden) -> hidden`.
    """

    nu: Float[Array, " hidden"]
    weight: Float[Array, "hidden input"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        r_min: float = 0.4,
        r_max: float = 0.99,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        _check_unit_range(("r_min", "r_max"), r_min, r_max, "the initial decays")
        dtype = _default_dtype(dtype)
        ka, kb = jr.split(key)
        a = jr.uniform(ka, (hidden_size,), dtype, minval=r_min, maxval=r_max)
        self.nu = jnp.log(-jnp.log(a))
        lim = 1 / math.sqrt(input_size)
        self.weight = jr.uniform(
            kb, (hidden_size, input_size), dtype, minval=-lim, maxval=lim
        )
        self.input_size = input_size
        self.hidden_size = hidden_size

    def decay(self) -> Float[Array, " hidden"]:
        """The decays $a = e^{-e^\\nu}$."""
        return jnp.exp(-jnp.exp(self.nu))

    def __call__(
        self,
        input: Float[Array, " input"],
        hidden: Float[Array, " hidden"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " hidden"]:
        """**Arguments:**

        - `input`: shape `(input_size,)`.
        - `hidden`: shape `(hidden_size,)`.
        - `key`: ignored.

        **Returns:**

        The new hidden state, shape `(hidden_size,)`.
        """
        del key
        a = self.decay()
        gamma = jnp.sqrt(1 - a**2)
        return a * hidden + gamma * (self.weight @ input)
