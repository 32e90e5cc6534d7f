"""Small building blocks the algorithms share: trace filters, a fixed random
feedback matrix, and the refusal of complex hidden states."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._errors import EtraceError


def refuse_complex(graph: Any, name: str) -> None:
    """An `EtraceError` naming the first complex hidden group of `graph`, for an
    algorithm (`name`) whose traces are defined for real hidden states only."""
    for group in graph.groups:
        if jnp.issubdtype(group.dtype, jnp.complexfloating):
            raise EtraceError(
                f"{name} is defined for real hidden states, but hidden group "
                f"`{group.name}` is {jnp.dtype(group.dtype).name}. Use etrace.RTRL(), "
                "etrace.SnAp(n), etrace.UORO() or a per-group algorithm "
                "(etrace.D_RTRL(), ...) for complex hidden states."
            )


def _decay(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EtraceError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise EtraceError(
            f"`{name}` must lie in [0, 1) (a per-step leak, e.g. exp(-1/tau)), "
            f"got {value!r}."
        )
    return float(value)


class KappaFilter(eqx.Module):
    r"""A leaky filter of eligibility traces, $\bar e^t = \kappa \bar e^{t-1} + e^t$.

    e-prop (and OTPE) apply it to the traces of a hidden group whose output a
    *downstream* hidden group integrates with leak $\kappa$ (a leaky readout with
    state of its own, the next spiking layer): the learning signal at step $t$ then
    meets every earlier step's eligibility weighted by $\kappa^{t-s}$, which is
    exactly how the downstream state remembers it.

    **Arguments:**

    - `kappa`: the leak, in $[0, 1)$; equal to the downstream layer's leak (e.g.
        `exp(-1 / tau_out)`) for the exact gradient.
    """

    kappa: float = eqx.field(static=True)

    def __init__(self, kappa: Any):
        self.kappa = _decay("kappa", kappa)

    def __call__(self, filtered: PyTree[Array], e: PyTree[Array]) -> PyTree[Array]:
        """One step: `kappa * filtered + e`, leaf by leaf."""
        return jtu.tree_map(lambda f, v: self.kappa * f + v, filtered, e)


class PresynapticTrace(eqx.Module):
    r"""The presynaptic trace $\hat a^t = \lambda \hat a^{t-1} + x^t$ of OTTT (and of
    F-OTPE's input factor): a leaky sum of a weight op's inputs.

    **Arguments:**

    - `decay`: $\lambda$ in $[0, 1)$; the membrane leak of the neurons the weight
        feeds for OTTT to be exact on one layer.
    """

    decay: float = eqx.field(static=True)

    def __init__(self, decay: Any):
        self.decay = _decay("decay", decay)

    def __call__(self, a: Array, x: Array) -> Array:
        """One step: `decay * a + x`."""
        return self.decay * a + x


class FixedRandomFeedback(eqx.Module):
    r"""A frozen random feedback matrix $B$ per hidden group (Lillicrap et al. 2016;
    e-prop's random e-prop; the target projection of OSTTP).

    The learning signal of a group's neurons becomes $B\,v$, with $v$ the flattened
    gradient of the loss with respect to the model's output (e-prop) or the
    flattened target (OSTTP), instead of the signal back-propagated through the
    readout weights. $B$ has one row per neuron and one column per element of $v$,
    so any readout width works; its entries are drawn once from
    $\mathcal N(0, \mathrm{scale}^2 / \dim v)$ with a key made from `seed` and the
    group's position, and are identical at every step and for every example.

    **Arguments:**

    - `seed`: an int; different seeds give independent matrices.
    - `scale`: the standard deviation of $B v$ for a unit-norm $v$.
    """

    seed: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)

    def __init__(self, seed: Any = 0, scale: Any = 1.0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EtraceError(f"`seed` must be an int, got {seed!r}.")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
            raise EtraceError(f"`scale` must be a positive float, got {scale!r}.")
        self.seed = seed
        self.scale = float(scale)

    def matrix(self, index: int, n: int, width: int, dtype: Any) -> Array:
        """The `(n, width)` matrix of the `index`-th hidden group."""
        key = jr.fold_in(jr.key(self.seed), index)
        std = self.scale / math.sqrt(max(width, 1))
        return std * jr.normal(key, (n, width), dtype)

    def project(self, index: int, v: Array, n: int) -> Array:
        """`B v` for the `index`-th hidden group of `n` neurons."""
        dtype = jnp.result_type(v) if v.size else jnp.float32
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(float)
            v = v.astype(dtype)
        return self.matrix(index, n, v.shape[0], dtype) @ v
