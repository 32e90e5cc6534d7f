"""The linear recurrent unit (LRU) of Orvieto et al. (2023)."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from .._errors import EtraceError
from ._cells import _check_sizes, _check_unit_range, _default_dtype


def _check_ring(r_min: Any, r_max: Any, max_phase: Any) -> None:
    what = "the ring of the initial eigenvalues' moduli"
    _check_unit_range(("r_min", "r_max"), r_min, r_max, what)
    if not 0 < max_phase <= 2 * math.pi:
        raise EtraceError(
            "`max_phase` must be in (0, 2 pi] (the initial eigenvalues' phases are "
            f"drawn uniformly in (0, max_phase]), got {max_phase!r}."
        )


class LRU(eqx.Module):
    r"""One step of a linear recurrent unit (LRU), a complex diagonal recurrence
    (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long
    Sequences", ICML, Section 3: the complex diagonal recurrence, its stable
    exponential parametrisation and the normalisation $\gamma$).

    $$h' = \lambda \odot h + \gamma \odot (B x), \qquad
      \lambda = e^{-e^{\nu} + i e^{\theta}}, \qquad
      \gamma = e^{\gamma_{\log}},$$

    $$y = \mathrm{Re}(C h') + D \odot x,$$

    with $h \in \mathbb{C}^N$ the hidden state, $x \in \mathbb{R}^H$ the input and
    $y \in \mathbb{R}^H$ the output (`LRU.output`). $\nu, \theta, \gamma_{\log} \in
    \mathbb{R}^N$, $B = B_{re} + i B_{im} \in \mathbb{C}^{N \times H}$,
    $C = C_{re} + i C_{im} \in \mathbb{C}^{H \times N}$ and $D \in \mathbb{R}^H$ are
    learnable, every one kept as real arrays. The exponential parametrisation keeps
    $|\lambda| = e^{-e^\nu} < 1$ (stable) for every $\nu$; the normalisation
    $\gamma$ starts at $\sqrt{1 - |\lambda|^2}$, which keeps the state's variance
    independent of $|\lambda|$ for white input, and is learnt from there (in its
    logarithm, as in the paper).

    The output follows the paper: a real read-out of the new state plus a skip
    connection, so it has the input's size (an LRU block maps $H$ features to $H$).
    The paper's surrounding block (normalisation, a non-linearity, a residual
    connection) is left to the model.

    **Initialisation** (as in the paper's reference code): $\lambda$ uniform on the ring
    $r_{\min} \le |\lambda| \le r_{\max}$ (uniform in area) with phase uniform in
    $(0, \phi_{\max}]$ ($\phi_{\max}$ is `max_phase`);
    $B_{re}, B_{im} \sim \mathcal{N}(0, 1 / (2H))$;
    $C_{re}, C_{im} \sim \mathcal{N}(0, 1 / N)$; $D \sim \mathcal{N}(0, 1)$.

    **Online learning.** The recurrence is element-wise and holomorphic in $h$, so
    on one LRU layer fed by the input D-RTRL equals BPTT: $\nu$ and $\theta$
    share an element-wise trace (of $\lambda$), $B_{re}$, $B_{im}$ and
    $\gamma_{\log}$ one complex matrix trace (of the weight
    $\gamma \odot (B_{re} + i B_{im})$ of one product), and $C$, $D$ the
    gradient of the step (they reach no hidden state).

    **Arguments:**

    - `input_size`: $H$, the size of the input and of the output.
    - `hidden_size`: $N$, the number of complex hidden units.
    - `r_min`, `r_max`: the ring of the initial moduli, `0 < r_min <= r_max < 1`;
        default `[0.4, 0.99]` (the paper uses up to `[0.9, 0.999]` for long memory).
    - `max_phase`: the largest initial phase, in `(0, 2 pi]`; default `2 pi`.
    - `dtype`: the dtype of the (real) parameters; default JAX's default float
        dtype. The hidden state is the matching complex dtype (`LRU.initial_hidden`).
    - `key`: a `jax.random` key for initialisation (keyword only).

    Called as `lru(input, hidden) -> hidden`, as `eqx.nn.GRUCell`; the output is
    `lru.output(input, hidden)`.

    **Raises:**

    `EtraceError` if a size is not a positive int, or the ring or phase is out of
    range.

    !!! Example

        ```python
        class Net(eqx.Module):
            lru: etrace.nn.LRU
            h: eqx.nn.StateIndex

            def __init__(self, key):
                self.lru = etrace.nn.LRU(4, 16, key=key)
                self.h = eqx.nn.StateIndex(self.lru.initial_hidden())

            def __call__(self, x, state):
                h = self.lru(x, state.get(self.h))
                return self.lru.output(x, h), state.set(self.h, h)
        ```
    """

    nu: Float[Array, " hidden"]
    theta: Float[Array, " hidden"]
    gamma_log: Float[Array, " hidden"]
    b_re: Float[Array, "hidden input"]
    b_im: Float[Array, "hidden input"]
    c_re: Float[Array, "input hidden"]
    c_im: Float[Array, "input hidden"]
    d: Float[Array, " input"]
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        r_min: float = 0.4,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        _check_sizes(input_size, hidden_size)
        _check_ring(r_min, r_max, max_phase)
        dtype = _default_dtype(dtype)
        k = jr.split(key, 7)
        # Uniform on the ring in area: |lambda|^2 uniform in [r_min^2, r_max^2].
        u = jr.uniform(k[0], (hidden_size,), dtype)
        modulus_sq = r_min**2 + u * (r_max**2 - r_min**2)
        self.nu = jnp.log(-0.5 * jnp.log(modulus_sq))
        # Phases in (0, max_phase]: a phase of exactly 0 has no logarithm.
        phase = max_phase * (1 - jr.uniform(k[1], (hidden_size,), dtype))
        self.theta = jnp.log(phase)
        self.gamma_log = 0.5 * jnp.log1p(-modulus_sq)
        shape_b, shape_c = (hidden_size, input_size), (input_size, hidden_size)
        scale_b = 1 / math.sqrt(2 * input_size)
        self.b_re = scale_b * jr.normal(k[2], shape_b, dtype)
        self.b_im = scale_b * jr.normal(k[3], shape_b, dtype)
        scale_c = 1 / math.sqrt(hidden_size)
        self.c_re = scale_c * jr.normal(k[4], shape_c, dtype)
        self.c_im = scale_c * jr.normal(k[5], shape_c, dtype)
        self.d = jr.normal(k[6], (input_size,), dtype)
        self.input_size = input_size
        self.hidden_size = hidden_size

    @property
    def complex_dtype(self) -> Any:
        """The dtype of the hidden state: complex, of the parameters' precision."""
        return jnp.result_type(self.nu.dtype, jnp.complex64)

    def initial_hidden(self) -> Complex[Array, " hidden"]:
        """Zeros of the hidden state's shape and complex dtype."""
        return jnp.zeros(self.hidden_size, self.complex_dtype)

    def eigenvalues(self) -> Complex[Array, " hidden"]:
        r"""The diagonal recurrence $\lambda = e^{-e^\nu + i e^\theta}$."""
        return jnp.exp(-jnp.exp(self.nu) + 1j * jnp.exp(self.theta))

    def __call__(
        self,
        input: Float[Array, " input"],
        hidden: Complex[Array, " hidden"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Complex[Array, " hidden"]:
        """**Arguments:**

        - `input`: shape `(input_size,)`, real.
        - `hidden`: shape `(hidden_size,)`, complex.
        - `key`: ignored.

        **Returns:**

        The new hidden state, shape `(hidden_size,)`, complex.
        """
        del key
        gamma = jnp.exp(self.gamma_log)
        # One complex product: one matrix trace for B_re and B_im together.
        b = (self.b_re + 1j * self.b_im) * gamma[:, None]
        return self.eigenvalues() * hidden + b @ input.astype(b.dtype)

    def output(
        self, input: Float[Array, " input"], hidden: Complex[Array, " hidden"]
    ) -> Float[Array, " input"]:
        r"""The read-out $y = \mathrm{Re}(C h) + D \odot x$ of a hidden state.

        **Arguments:**

        - `input`: the step's input, shape `(input_size,)`.
        - `hidden`: the new hidden state, shape `(hidden_size,)`.

        **Returns:**

        The output, shape `(input_size,)`, real.
        """
        return jnp.real((self.c_re + 1j * self.c_im) @ hidden) + self.d * input
