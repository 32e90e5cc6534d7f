"""Kronecker-factored RTRL."""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.random as jr

from .._errors import EtraceError
from .._graph import Graph, Site
from .base import AbstractAlgorithm
from .helpers import refuse_complex


_NOT_FACTORED = (
    "KF_RTRL(fallback=False) cannot factor the parameter `{path}`: {why}. Its "
    "Kronecker factors need a parameter that enters the hidden state only as the "
    "unchanged weight of one dense product `W @ x` (or as an element-wise value "
    "itself, such as a bias). Use `KF_RTRL(fallback=True)` (the default), which "
    "estimates such parameters with UORO's rank-one factors, or `etrace.RTRL()`."
)


def _norm(tree: Any) -> Any:
    return jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(tree)))


def _signs(key: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    # From random bits: `jr.rademacher` draws uniforms in the default float dtype.
    return 2 * (jr.bits(key, shape, jnp.uint32) & 1).astype(dtype) - 1


def _why_not(graph: Graph, path: str, site: Site | None) -> str | None:
    """Why `path` has no Kronecker factors, or `None` where it has."""
    if site is None:
        sites = sorted({u.site.name for u in graph.units_of(path)})
        if not sites:
            return "it reaches the hidden state only through another weight op"
        return (
            f"it enters the hidden state through {sites}, not as one site's "
            "unchanged weight (a computed, masked or shared weight)"
        )
    if site.kind == "matrix" and (site.b != 1 or site.fx != 1):
        return (
            f"`{site.name}` applies it at {site.b * site.fx} input positions (a "
            "convolution or batched product), so its immediate Jacobian is a sum "
            "of outer products"
        )
    return None


def _site(graph: Graph, path: str) -> Site | None:
    """The site whose weight `path` is, unchanged (`graph.direct_sites`)."""
    name = graph.direct_sites.get(path)
    return next((u.site for u in graph.units if u.site.name == name), None)


def _plan(graph: Graph) -> tuple[dict[str, Site], dict[str, Site], tuple[str, ...]]:
    """The parameters with Kronecker factors (a dense product's weight), those with
    an exact trace (an element-wise value: its input is the constant 1), and the
    others (UORO's factors), each with its site."""
    kron, exact, other = {}, {}, []
    for path, _, _ in graph.params:
        site = _site(graph, path)
        if site is None or _why_not(graph, path, site) is not None:
            other.append(path)
        elif site.kind == "matrix":
            kron[path] = site
        else:
            exact[path] = site
    return kron, exact, tuple(other)


class KF_RTRL(AbstractAlgorithm):
    r"""KF-RTRL (Mujika, Meier & Steger, "Approximating real-time recurrent
    learning with random Kronecker factors", NeurIPS 2018): an
    unbiased estimate of RTRL's sensitivity as a Kronecker product.

    For a weight $W$ of shape $(M, C)$ in one dense product $y = W x$, the
    immediate Jacobian of the whole hidden state is an outer product,
    $I^t = x^t \otimes D^t$ with $D^t = \partial h^t / \partial y^t$ of shape
    $(H, M)$, and RTRL's $G = \partial h / \partial W$ is kept as $u \otimes A$
    with $u \in \mathbb{R}^C$, $A \in \mathbb{R}^{H \times M}$ and
    $\mathbb{E}[u \otimes A] = G$. With two fresh random signs $c_1, c_2$ per
    weight and step,

    $$u \leftarrow c_1 \rho_1 u + c_2 \rho_2 x^t, \qquad
      A \leftarrow \frac{c_1}{\rho_1} J^t A + \frac{c_2}{\rho_2} D^t,$$

    with $\rho_1 = \sqrt{\|J^t A\| / \|u\|}$ and $\rho_2 = \sqrt{\|D^t\| /
    \|x^t\|}$ (variance-minimising), and the gradient is $(c^\top A) \otimes u$.

    The paper factors one matrix acting on $[x; h; 1]$; etrace factors **each
    weight operation** on its own (a GRU's `weight_ih` and `weight_hh` each get
    their $u$ and $A$, with independent signs), which keeps the estimate unbiased.
    An element-wise parameter used as it is (a bias) has the constant input 1, so
    its $u$ is a scalar and its trace $A$ (shape $(H, M)$) is RTRL's, exact. Every
    other parameter that reaches a hidden state (a convolution's weight, one used
    at several positions, a computed or masked weight, a learnable decay through
    a nonlinearity, an encoder's weight) has no such factors: with `fallback`
    these share one UORO estimate (`etrace.UORO`'s update restricted to them),
    else compiling refuses them. `learner.summary()` says which parameter gets
    which. Memory $O(H M + C)$ per factored weight; a step takes one pullback per
    hidden value for $D^t$ and $M$ Jacobian-vector products for $J^t A$.

    The random signs come from a key in the traces (`traces["key"]`), as for
    `etrace.UORO`: a run is pure and reproducible; give each example of a batch its
    own key for independent noise.

    **Arguments:**

    - `seed`: the seed of the initial key.
    - `fallback`: estimate the parameters without Kronecker factors with UORO's
        (default); with `False`, `etrace.compile` raises an `EtraceError` naming
        the first of them.
    - `eps`: keeps the scales finite when a norm is zero.
    """

    seed: int = 0
    fallback: bool = True
    eps: float = 1e-7
    routing: ClassVar[str] = "joint"
    dense_jacobians: ClassVar[bool] = False
    site_jacobians: ClassVar[bool] = True

    def init(self, graph: Graph):
        refuse_complex(graph, "KF_RTRL")
        kron, exact, other = _plan(graph)
        if other and not self.fallback:
            why = _why_not(graph, other[0], _site(graph, other[0]))
            raise EtraceError(_NOT_FACTORED.format(path=other[0], why=why))
        h = graph.hidden_size
        shapes = {path: (shape, dtype) for path, shape, dtype in graph.params}
        traces: dict[str, Any] = {"key": jr.key_data(jr.key(self.seed))}
        traces["kron"] = {
            p: (jnp.zeros((s.c,), s.dtype), jnp.zeros((h, s.fw), s.dtype))
            for p, s in kron.items()
        }
        traces["exact"] = {p: jnp.zeros((h, s.fw), s.dtype) for p, s in exact.items()}
        if other:
            dtype = graph.groups[0].dtype
            traces["s"] = jnp.zeros((h,), dtype)
            traces["theta"] = {p: jnp.zeros(*shapes[p]) for p in other}
        return traces

    def update(self, graph, traces, jac):
        kron, exact, _ = _plan(graph)
        h = graph.hidden_size
        key, k_kron, k_nu = jr.split(jr.wrap_key_data(traces["key"]), 3)
        new: dict[str, Any] = {"key": jr.key_data(key)}
        jv = jax.vmap(jac.jvp, in_axes=1, out_axes=1)  # J A, column by column
        new["exact"] = {
            p: jv(traces["exact"][p]) + jac.Df[s.name].reshape(h, s.fw)
            for p, s in exact.items()
        }
        new["kron"] = {}
        for i, (p, s) in enumerate(kron.items()):
            u, a = traces["kron"][p]
            x = jac.x[s.name].reshape(u.shape)
            d = jac.Df[s.name].reshape(a.shape)
            c1, c2 = _signs(jr.fold_in(k_kron, i), (2,), u.dtype)
            ja = jv(a)
            rho1 = jnp.sqrt((_norm(ja) + self.eps) / (_norm(u) + self.eps))
            rho2 = jnp.sqrt((_norm(d) + self.eps) / (_norm(x) + self.eps))
            new["kron"][p] = (
                c1 * rho1 * u + c2 * rho2 * x,
                c1 / rho1 * ja + c2 / rho2 * d,
            )
        if "s" in traces:
            new["s"], new["theta"] = self._uoro(traces, jac, k_nu)
        return new

    def _uoro(self, traces, jac, key):
        """`etrace.UORO`'s update of the parameters without Kronecker factors."""
        s, theta = traces["s"], traces["theta"]
        nu = _signs(key, s.shape, s.dtype)
        js = jac.jvp(s)
        nu_i = {p: g for p, g in jac.vjp(nu)[1].items() if p in theta}
        rho0 = jnp.sqrt((_norm(theta) + self.eps) / (_norm(js) + self.eps))
        rho1 = jnp.sqrt((_norm(nu_i) + self.eps) / (_norm(nu) + self.eps))
        new_theta = {p: t / rho0 + nu_i[p] / rho1 for p, t in theta.items()}
        return rho0 * js + rho1 * nu, new_theta

    def gradients(self, graph, traces, signal, jac):
        del jac
        kron, exact, _ = _plan(graph)
        c = signal["hidden"]
        grads = {}
        for p, s in kron.items():
            u, a = traces["kron"][p]
            grads[p] = s.weight_from_canonical(jnp.outer(c @ a, u))
        for p, s in exact.items():
            grads[p] = s.weight_from_canonical(c @ traces["exact"][p])
        if "s" in traces:
            scale = jnp.dot(c, traces["s"])
            grads.update({p: scale * t for p, t in traces["theta"].items()})
        return grads

    def summed_gradients(self, graph, traces, signal, jac):
        # One product over the batch per parameter.
        del jac
        kron, exact, _ = _plan(graph)
        c = signal["hidden"]
        grads = {}
        for p, s in kron.items():
            u, a = traces["kron"][p]
            scale = jnp.einsum("bh,bhm->bm", c, a)
            grads[p] = s.weight_from_canonical(jnp.einsum("bm,bc->mc", scale, u))
        for p, s in exact.items():
            summed = jnp.einsum("bh,bhm->m", c, traces["exact"][p])
            grads[p] = s.weight_from_canonical(summed)
        if "s" in traces:
            scale = jnp.sum(c * traces["s"], axis=1)
            grads.update(
                {p: jnp.tensordot(scale, t, axes=1) for p, t in traces["theta"].items()}
            )
        return grads

    def stored_traces(self, graph, traces, path):
        del graph
        for kind in ("kron", "exact", "theta"):
            if path in traces.get(kind, {}):
                return {path: traces[kind][path]}
        return {}

    def trace_of(self, graph, traces, path):
        del graph
        if path in traces["kron"] or path in traces["exact"]:
            kind = "kron" if path in traces["kron"] else "exact"
            return {"hidden": traces[kind][path]}
        if path in traces.get("theta", {}):
            return {"hidden": (traces["s"], traces["theta"][path])}
        return {}

    def summary_note(self, graph: Graph, path: str) -> str | None:
        kron, exact, other = _plan(graph)
        if path in kron:
            site = kron[path]
            return (
                f"Kronecker factors of `{site.name}`: u ({site.c},), A (H, {site.fw})"
            )
        if path in exact:
            return "RTRL's exact trace (its input is the constant 1)"
        if path in other:
            why = _why_not(graph, path, _site(graph, path))
            return f"UORO's rank-one factors: {why}"
        return None
