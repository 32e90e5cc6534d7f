"""Unbiased online recurrent optimisation."""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
import jax.random as jr

from .._graph import Graph
from .base import AbstractAlgorithm


def _norm(tree: dict[str, Any]) -> Any:
    return jnp.sqrt(sum(jnp.sum(a**2) for a in tree.values()))


class UORO(AbstractAlgorithm):
    r"""UORO (Tallec & Ollivier, "Unbiased online recurrent optimization", ICLR
    2018, Algorithm 1): a rank-one, unbiased estimate of RTRL's sensitivity.

    Keeps $\tilde s \in \mathbb{R}^H$ and $\tilde\theta$ (shaped like the
    parameters) with $\mathbb{E}[\tilde s \tilde\theta^\top] = M = \partial h /
    \partial\theta$. With fresh random signs $\nu \in \{\pm 1\}^H$ every step,

    $$\tilde s \leftarrow \rho_0 J \tilde s + \rho_1 \nu, \qquad
      \tilde\theta \leftarrow \tilde\theta / \rho_0 + \nu^\top I / \rho_1,$$

    with $\rho_0 = \sqrt{\|\tilde\theta\| / \|J\tilde s\|}$ and
    $\rho_1 = \sqrt{\|\nu^\top I\| / \|\nu\|}$ (variance-minimising), and the
    gradient is $(c^\top \tilde s)\,\tilde\theta$.

    The random signs come from a key kept in the traces (`traces["key"]`), so a run
    is pure and reproducible; give each example of a batch its own key for
    independent noise. Traces take $O(H + |\theta|)$ memory, and a step costs a
    few passes over the model's step: $J\tilde s$ and $\nu^\top I$ are a
    Jacobian-vector and a vector-Jacobian product (`jac.jvp`, `jac.vjp`); neither
    Jacobian is formed.

    **Arguments:**

    - `seed`: the seed of the initial key.
    - `eps`: keeps $\rho_0, \rho_1$ finite when a norm is zero.
    """

    seed: int = 0
    eps: float = 1e-7
    routing: ClassVar[str] = "joint"
    dense_jacobians: ClassVar[bool] = False

    def init(self, graph: Graph):
        # The whole-state hidden vector is real (complex values by their parts).
        dtype = jnp.finfo(
            jnp.result_type(*(g.dtype for g in graph.groups)) if graph.groups else float
        ).dtype
        return {
            "key": jr.key_data(jr.key(self.seed)),
            "s": jnp.zeros((graph.hidden_size,), dtype),
            "theta": {path: jnp.zeros(shape, dt) for path, shape, dt in graph.params},
        }

    def update(self, graph, traces, jac):
        del graph
        key, sub = jr.split(jr.wrap_key_data(traces["key"]))
        s = traces["s"]
        # Random signs from random bits: `jr.rademacher` draws uniforms in the
        # default float dtype, float64 under `jax_enable_x64`.
        bits = jr.bits(sub, s.shape, jnp.uint32) & 1
        nu = 2 * bits.astype(s.dtype) - 1
        js = jac.jvp(s)
        _, nu_i = jac.vjp(nu)
        rho0 = jnp.sqrt(
            (_norm(traces["theta"]) + self.eps) / (jnp.linalg.norm(js) + self.eps)
        )
        rho1 = jnp.sqrt((_norm(nu_i) + self.eps) / (jnp.linalg.norm(nu) + self.eps))
        return {
            "key": jr.key_data(key),
            "s": rho0 * js + rho1 * nu,
            "theta": {p: t / rho0 + nu_i[p] / rho1 for p, t in traces["theta"].items()},
        }

    def gradients(self, graph, traces, signal, jac):
        del graph, jac
        scale = jnp.dot(signal["hidden"], traces["s"])
        return {p: scale * t for p, t in traces["theta"].items()}

    def summed_gradients(self, graph, traces, signal, jac):
        # One product over the batch per parameter.
        del graph, jac
        scale = jnp.sum(signal["hidden"] * traces["s"], axis=1)
        return {p: jnp.tensordot(scale, t, axes=1) for p, t in traces["theta"].items()}

    def trace_of(self, graph, traces, path):
        del graph
        if path not in traces["theta"]:
            return {}
        return {"hidden": (traces["s"], traces["theta"][path])}

    def stored_traces(self, graph, traces, path):
        del graph
        return {path: traces["theta"][path]} if path in traces["theta"] else {}
