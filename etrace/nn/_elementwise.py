"""Gated recurrent layers with an element-wise recurrence whose weight matrices read
only the input: RG-LRU, minGRU, minLSTM and eLSTM, and a residual block to stack them.

On each of these one layer's D-RTRL is exact RTRL: the hidden-to-hidden Jacobian is
diagonal, so the diagonal traces drop nothing.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._errors import EtraceError
from ._cells import _check_sizes, _check_unit_range, _default_dtype


def _linear(input_size: int, hidden_size: int, dtype: Any, key: PRNGKeyArray):
    return eqx.nn.Linear(input_size, hidden_size, dtype=dtype, key=key)


def _g(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    r"""Feng et al.'s positive activation: $x + \frac12$ for $x \ge 0$,
    $\sigma(x)$ otherwise (continuous, positive everywhere)."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def _candidate(linear: eqx.nn.Linear, positive: bool, x: Array) -> Array:
    pre = linear(x)
    return _g(pre) if positive else pre


class RGLRU(eqx.Module):
    r"""The real-gated linear recurrent unit (RG-LRU) of Griffin (De et al. 2024,
    "Griffin: mixing gated linear recurrences with local attention for efficient
    language models", Section 2.4).

    $$r_t = \sigma(W_a x_t + b_a), \qquad i_t = \sigma(W_x x_t + b_x), \qquad
      \tilde x_t = W x_t + b,$$
    $$a_t = \sigma(\Lambda)^{c\, r_t}, \qquad
      h_t = a_t \odot h_{t-1} + \sqrt{1 - a_t^2} \odot (i_t \odot \tilde x_t).$$

    The recurrence gate $r_t$ and the input gate $i_t$ read only the input, so the
    recurrence is element-wise and D-RTRL is exact on one layer. $a_t$ is computed
    in log space, $\log a_t = -c\, r_t\, \operatorname{softplus}(-\Lambda)$, as in
    the paper. Griffin applies the RG-LRU to the output $\tilde x_t$ of a linear
    layer (and a short convolution, not included here) and computes its gates from
    $\tilde x_t$; here the gates read the cell's input $x_t$ directly (a class that
    contains Griffin's gates: $W_a \tilde x_t = (W_a W) x_t + W_a b$), so that every
    weight reads the input only and input and hidden sizes may differ.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of the hidden state $h$.
    - `c`: the fixed scalar $c$ (default 8, the paper's).
    - `a_min`, `a_max`: $\Lambda$ is initialised so that $a^c = \sigma(\Lambda)^c$ is
        uniform in `[a_min, a_max]` (default `[0.9, 0.999]`, the paper's), with
        $0 < a_{\min} \le a_{\max} < 1$.
    - `dtype`: dtype of the parameters; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    $W_a, W_x, W$ and their biases are `eqx.nn.Linear` layers (`recurrence_gate`,
    `input_gate`, `linear`) with Equinox's initialisation.

    Called as `cell(input, hidden) -> hidden`.
    """

    recurrence_gate: eqx.nn.Linear
    input_gate: eqx.nn.Linear
    linear: eqx.nn.Linear
    lam: Float[Array, " hidden"]
    c: float = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        c: float = 8.0,
        a_min: float = 0.9,
        a_max: float = 0.999,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        _check_unit_range(("a_min", "a_max"), a_min, a_max, "the initial a^c")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise EtraceError(f"`c` must be a number > 0 (default 8.0), got {c!r}.")
        dtype = _default_dtype(dtype)
        ka, kx, kl, kw = jr.split(key, 4)
        a_c = jr.uniform(ka, (hidden_size,), dtype, minval=a_min, maxval=a_max)
        a = a_c ** (1 / c)
        self.lam = jnp.log(a) - jnp.log1p(-a)  # the logit of a
        self.recurrence_gate = _linear(input_size, hidden_size, dtype, kx)
        self.input_gate = _linear(input_size, hidden_size, dtype, kl)
        self.linear = _linear(input_size, hidden_size, dtype, kw)
        self.c = float(c)
        self.input_size = input_size
        self.hidden_size = hidden_size

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
        r = jax.nn.sigmoid(self.recurrence_gate(input))
        i = jax.nn.sigmoid(self.input_gate(input))
        log_a = -self.c * r * jax.nn.softplus(-self.lam)
        a = jnp.exp(log_a)
        # sqrt(1 - a^2) without cancellation for a near 1.
        scale = jnp.sqrt(-jnp.expm1(2 * log_a))
        return a * hidden + scale * (i * self.linear(input))


class MinGRU(eqx.Module):
    r"""minGRU (Feng et al. 2024, "Were RNNs all we needed?", Section 3.1), in its
    sequential form.

    $$z_t = \sigma(W_z x_t + b_z), \qquad \tilde h_t = W_h x_t + b_h, \qquad
      h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t.$$

    The update gate and the candidate read only the input: the recurrence is
    element-wise and D-RTRL is exact on one layer. With `positive=True` the
    candidate is $\tilde h_t = g(W_h x_t + b_h)$ with the paper's
    $g(x) = x + \frac12$ for $x \ge 0$, $\sigma(x)$ otherwise,
    which keeps the state positive (the paper's log-space version, Appendix B, whose
    parallel scan needs it); the default is the plain sequential minGRU.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of the hidden state $h$.
    - `positive`: apply $g$ to the candidate (default `False`).
    - `dtype`: dtype of the parameters; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    $W_z$ and $W_h$ with their biases are `eqx.nn.Linear` layers (`gate`, `linear`).

    Called as `cell(input, hidden) -> hidden`.
    """

    gate: eqx.nn.Linear
    linear: eqx.nn.Linear
    positive: bool = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        positive: bool = False,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        dtype = _default_dtype(dtype)
        kz, kh = jr.split(key)
        self.gate = _linear(input_size, hidden_size, dtype, kz)
        self.linear = _linear(input_size, hidden_size, dtype, kh)
        self.positive = positive
        self.input_size = input_size
        self.hidden_size = hidden_size

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
        z = jax.nn.sigmoid(self.gate(input))
        candidate = _candidate(self.linear, self.positive, input)
        return (1 - z) * hidden + z * candidate


class MinLSTM(eqx.Module):
    r"""minLSTM (Feng et al. 2024, "Were RNNs all we needed?", Section 3.2), in its
    sequential form.

    $$f_t = \sigma(W_f x_t + b_f), \qquad i_t = \sigma(W_i x_t + b_i), \qquad
      \tilde h_t = W_h x_t + b_h,$$
    $$f'_t = \frac{f_t}{f_t + i_t}, \qquad i'_t = \frac{i_t}{f_t + i_t}, \qquad
      h_t = f'_t \odot h_{t-1} + i'_t \odot \tilde h_t.$$

    The normalisation of the gates (the paper's, which makes the scale of $h_t$
    independent of time) is on by default; `normalise=False` gives
    $h_t = f_t \odot h_{t-1} + i_t \odot \tilde h_t$. `positive=True` applies the
    paper's $g$ to the candidate as in `MinGRU`. All gates read only the input: the
    recurrence is element-wise and D-RTRL is exact on one layer.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of the hidden state $h$.
    - `normalise`: normalise the gates to sum to 1 (default `True`).
    - `positive`: apply $g$ to the candidate (default `False`).
    - `dtype`: dtype of the parameters; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    $W_f, W_i, W_h$ with their biases are `eqx.nn.Linear` layers (`forget_gate`,
    `input_gate`, `linear`).

    Called as `cell(input, hidden) -> hidden`.
    """

    forget_gate: eqx.nn.Linear
    input_gate: eqx.nn.Linear
    linear: eqx.nn.Linear
    normalise: bool = eqx.field(static=True)
    positive: bool = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        normalise: bool = True,
        positive: bool = False,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        dtype = _default_dtype(dtype)
        kf, ki, kh = jr.split(key, 3)
        self.forget_gate = _linear(input_size, hidden_size, dtype, kf)
        self.input_gate = _linear(input_size, hidden_size, dtype, ki)
        self.linear = _linear(input_size, hidden_size, dtype, kh)
        self.normalise = normalise
        self.positive = positive
        self.input_size = input_size
        self.hidden_size = hidden_size

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
        f = jax.nn.sigmoid(self.forget_gate(input))
        i = jax.nn.sigmoid(self.input_gate(input))
        if self.normalise:
            total = f + i
            f, i = f / total, i / total
        candidate = _candidate(self.linear, self.positive, input)
        return f * hidden + i * candidate


class ELSTM(eqx.Module):
    r"""The element-wise LSTM (eLSTM) of Irie, Gopalakrishnan and Schmidhuber (2023,
    "Exploring the promise and limits of real-time recurrent learning",
    arXiv:2305.19044, ICLR 2024).

    $$f_t = \sigma(F x_t + w_f \odot c_{t-1} + b_f), \qquad
      z_t = \tanh(Z x_t + w_z \odot c_{t-1} + b_z),$$
    $$c_t = f_t \odot c_{t-1} + (1 - f_t) \odot z_t,$$
    $$o_t = \sigma(O x_t + W_o c_t + b_o), \qquad h_t = o_t \odot c_t.$$

    The cell state $c$ recurs only through the element-wise (vector) weights $w_f$
    and $w_z$; the output gate reads the *new* cell state $c_t$ through a full
    matrix $W_o$, which does not enter the recurrence. RTRL on $c$ is therefore
    exact with traces of the size of the parameters, which is what the paper
    exploits; etrace's D-RTRL is exactly that RTRL.

    **Arguments:**

    - `input_size`: size of the input $x$.
    - `hidden_size`: size of $h$ and $c$.
    - `dtype`: dtype of the parameters; default JAX's default float dtype.
    - `key`: a `jax.random` key for initialisation (keyword only).

    $F, Z$ and their biases are `eqx.nn.Linear` layers (`forget_gate`,
    `candidate`); $[O\ W_o]$ and $b_o$ are one `eqx.nn.Linear` (`output_gate`) on
    $[x_t; c_t]$, as in the paper's code. $w_f$ and $w_z$ (`w_f`, `w_z`) are drawn
    uniformly from $[-1/\sqrt{\text{hidden}}, 1/\sqrt{\text{hidden}}]$.

    Called as `cell(input, (h, c)) -> (h, c)`, like `eqx.nn.LSTMCell`, or as
    `cell(input, c) -> (h, c)`. The previous $h$ is not read. **Keep only $c$ as
    the state** for D-RTRL to be exact: $h_t$ is then an output of the step, and
    the output gate is learned with the ordinary gradient of the step (it reaches
    no state). Stored as a state too, $h_t$ depends on the $c_t$ of every unit
    through $W_o$, which etrace (rightly) treats as a recurrent weight: D-RTRL
    becomes an approximation.
    """

    forget_gate: eqx.nn.Linear
    candidate: eqx.nn.Linear
    output_gate: eqx.nn.Linear
    w_f: Float[Array, " hidden"]
    w_z: Float[Array, " hidden"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        dtype = _default_dtype(dtype)
        kf, kz, ko, kwf, kwz = jr.split(key, 5)
        self.forget_gate = _linear(input_size, hidden_size, dtype, kf)
        self.candidate = _linear(input_size, hidden_size, dtype, kz)
        self.output_gate = _linear(input_size + hidden_size, hidden_size, dtype, ko)
        lim = 1 / math.sqrt(hidden_size)
        self.w_f = jr.uniform(kwf, (hidden_size,), dtype, minval=-lim, maxval=lim)
        self.w_z = jr.uniform(kwz, (hidden_size,), dtype, minval=-lim, maxval=lim)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self,
        input: Float[Array, " input"],
        hidden: Float[Array, " hidden"]
        | tuple[Float[Array, " hidden"], Float[Array, " hidden"]],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " hidden"], Float[Array, " hidden"]]:
        """**Arguments:**

        - `input`: shape `(input_size,)`.
        - `hidden`: `(h, c)`, each of shape `(hidden_size,)`, or `c` alone.
        - `key`: ignored.

        **Returns:**

        The new `(h, c)`.
        """
        del key
        c = hidden[1] if isinstance(hidden, tuple) else hidden
        f = jax.nn.sigmoid(self.forget_gate(input) + self.w_f * c)
        z = jnp.tanh(self.candidate(input) + self.w_z * c)
        c = f * c + (1 - f) * z
        o = jax.nn.sigmoid(self.output_gate(jnp.concatenate([input, c])))
        return o * c, c


class Block(eqx.nn.StatefulLayer):
    r"""A residual block of a deep online model: a normalised element-wise recurrent
    layer, then a normalised gated MLP, each on a residual branch. This is Griffin's
    residual block (De et al. 2024, Section 2.1) with the recurrent layer in place of
    its temporal-mixing block (whose convolution and output gate are left out) and
    layer norms in place of its RMS norms.

    $$u_t = x_t + \operatorname{rnn}(\operatorname{LN}(x_t), s_{t-1}), \qquad
      y_t = u_t + W_{\text{down}}\bigl(\operatorname{GeLU}(W_1 v_t) \odot W_2 v_t\bigr),
      \quad v_t = \operatorname{LN}(u_t),$$

    where $\operatorname{rnn}$ is the cell's output ($h_t$; for `ELSTM` the state
    $s$ is $c$ and the output $h_t = o_t \odot c_t$) and $[W_1; W_2]$ is the layer
    `up` (bias included). With `gated=False` the MLP is
    $W_{\text{down}} \operatorname{GeLU}(W_{\text{up}} v_t)$.

    Both layer norms are `eqx.nn.LayerNorm` **without** a learnable scale and shift:
    each is followed by linear layers, which absorb them, and parameters in front
    of a recurrent layer would reach its state only through its weights, where
    etrace learns them one-step. In a stack of blocks read out at the top, D-RTRL is
    then exact for every parameter of the top block; the blocks below get an
    approximation (their signal misses the memory of the layers above).

    **Arguments:**

    - `cell`: the recurrent layer, `RGLRU`, `MinGRU`, `MinLSTM`, `ELSTM` or any
        cell with `input_size == hidden_size` called as `cell(x, s) -> h` with the
        new state `h`, or `cell(x, s) -> (h, s)` like `ELSTM`, where the state `s`
        is one array of shape `(hidden_size,)` (so not `eqx.nn.LSTMCell`).
    - `expansion`: the MLP's hidden width as a multiple of the cell's width
        (default 2).
    - `gated`: a gated MLP (GLU with GeLU, default) or a plain one.
    - `dtype`: dtype of the MLP's parameters and of the initial state; default
        JAX's default float dtype.
    - `key`: a `jax.random` key for the MLP's initialisation (keyword only).

    Called as `block(x, state) -> (y, state)` with an `eqx.nn.State`; build it (or
    an `eqx.nn.Sequential` of blocks) with `eqx.nn.make_with_state`.
    """

    cell: eqx.Module
    norm: eqx.nn.LayerNorm
    mlp_norm: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    index: eqx.nn.StateIndex
    gated: bool = eqx.field(static=True)

    def __init__(
        self,
        cell: eqx.Module,
        *,
        expansion: int = 2,
        gated: bool = True,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        width = getattr(cell, "hidden_size", None)
        if width is None or getattr(cell, "input_size", None) != width:
            raise EtraceError(
                "The cell of a `Block` must have `input_size == hidden_size` (the "
                "block adds its output to its input), got "
                f"{type(cell).__name__} with input_size="
                f"{getattr(cell, 'input_size', None)!r}, hidden_size={width!r}. "
                "Build the cell as `Cell(width, width, ...)`; change the width "
                "between blocks with an `eqx.nn.Linear`."
            )
        if (
            isinstance(expansion, bool)
            or not isinstance(expansion, int)
            or (expansion < 1)
        ):
            raise EtraceError(
                f"`expansion` must be an int >= 1 (default 2), got {expansion!r}."
            )
        dtype = _default_dtype(dtype)
        k_up, k_down = jr.split(key)
        hidden = expansion * width
        self.cell = cell
        self.norm = eqx.nn.LayerNorm(width, use_weight=False, use_bias=False)
        self.mlp_norm = eqx.nn.LayerNorm(width, use_weight=False, use_bias=False)
        self.up = _linear(width, (2 if gated else 1) * hidden, dtype, k_up)
        self.down = _linear(hidden, width, dtype, k_down)
        self.index = eqx.nn.StateIndex(jnp.zeros(width, dtype))
        self.gated = gated

    def __call__(
        self,
        x: Float[Array, " width"],
        state: eqx.nn.State,
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, " width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: shape `(width,)`.
        - `state`: an `eqx.nn.State` holding the cell's state.
        - `key`: ignored.

        **Returns:**

        `(y, state)`: the block's output, shape `(width,)`, and the new state.
        """
        del key
        out = self.cell(self.norm(x), state.get(self.index))
        h, s = out if isinstance(out, tuple) else (out, out)
        u = x + h
        v = self.up(self.mlp_norm(u))
        if self.gated:
            a, b = jnp.split(v, 2)
            v = jax.nn.gelu(a) * b
        else:
            v = jax.nn.gelu(v)
        return u + self.down(v), state.set(self.index, s)
