"""The algorithm interface: stateless strategy objects over the analysed graph."""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._graph import Graph, Unit


class AbstractAlgorithm(eqx.Module):
    """An online gradient algorithm: how traces start, evolve and are read out.

    Algorithms are stateless: their fields are hyper-parameters only; the traces they
    keep live in the `TraceState` and are passed in and handed back. The driver
    (`Learner.step`) calls `update` and `gradients` once per hidden group and step,
    with the graph restricted to that group (`graph.subgraph(group)`) and the traces
    to its units; `Learner.init` calls `init` once with the whole graph.

    Subclass this directly for full control, subclass `AbstractUnitAlgorithm` when
    every unit (one weight site feeding one hidden group) keeps its own trace, or wrap
    an existing algorithm (see `examples/custom_algorithm.py`).

    Three optional class variables change what the driver passes in, and a fourth
    is a hint for `etrace.online_grad`:

    - `routing = "joint"`: the algorithm is called once per step for the whole
        hidden state instead of once per group. `graph.params` lists every parameter
        that reaches a hidden state; `jac.J` and `jac.Jtheta` hold the full
        hidden-to-hidden and immediate Jacobians; the signal is `signal["hidden"]`
        of shape `(H,)`; traces and gradients are keyed by parameter path, and
        gradients have the parameter's shape (`RTRL`, `SnAp`, `UORO`). In
        `update`, `jac.jvp` and `jac.vjp` also give products with those
        Jacobians without forming them.
    - `dense_jacobians = False`, with `routing = "joint"`: `update` uses only
        `jac.jvp` and `jac.vjp`; `jac.J` and `jac.Jtheta` are never computed, and
        using them raises an `EtraceError` (`UORO`).
    - `full_diagonal = True`: `jac.H` holds each neuron's block of the full
        hidden-to-hidden Jacobian, recurrent weights included (`OSTLRecurrent`).
    - `outer_product_gradients = True`: each step's gradient of a weight matrix is
        one matrix product over the batch (an outer product of two factors, as in
        `ES_D_RTRL` and `OTTT`); `online_grad` may then keep its running sum of
        such a matrix transposed, the faster layout for that product on CPU. A
        layout choice only: the gradients are the same either way.

    An optional method is another such hint: `transposed_gradients(graph, traces)`
    returns the names of the units whose summed gradient the read-out forms as
    the transpose of canonical `(B, Fw, C)` (`traces`: one example's, or their
    shapes). `online_grad` then keeps the running sum of such a weight matrix
    transposed (`D_RTRL`, for the traces it stores turned).
    """

    @abc.abstractmethod
    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        """Zero traces for one example, keyed by unit name.

        **Arguments:**

        - `graph`: the analysed graph; its units give the shapes and dtypes.

        **Returns:**

        A dictionary from unit name to that unit's trace (any pytree of arrays,
        possibly empty), with an entry for every unit of `graph` (for `routing =
        "joint"`, any pytree: RTRL keys it by parameter path).
        """

    @abc.abstractmethod
    def update(
        self, graph: Graph, traces: dict[str, PyTree[Array]], jac: Any
    ) -> dict[str, PyTree[Array]]:
        """Advances the traces by one step.

        **Arguments:**

        - `graph`: the graph restricted to one hidden group.
        - `traces`: that group's units' traces at step `t - 1`.
        - `jac`: an `etrace.Jacobians` with this step's `D`, `Df` and `x`.

        **Returns:**

        The traces at step `t`, same structure.
        """

    @abc.abstractmethod
    def gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        """Reads out parameter gradients from the traces and the learning signal.

        **Arguments:**

        - `graph`: the graph restricted to one hidden group.
        - `traces`: the traces at step `t` (after `update`).
        - `signal`: per group name, `dL^t/dh^t` of shape `(N, K)`: this step's loss
            gradient with respect to the new hidden state, including every same-step
            path through later layers.
        - `jac`: this step's `etrace.Jacobians`.

        **Returns:**

        Per unit name, the gradient with respect to the unit's weight in canonical
        `(B, Fw, C)` layout.
        """

    def summed_gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        """`gradients` of a whole batch, summed over it.

        Every argument carries a leading batch axis (the traces and Jacobians of
        each example). `etrace.online_grad` calls this instead of `gradients` under
        its `vmap`, so that a read-out that is an outer product (ES-D-RTRL, OTTT)
        becomes one matrix product over the batch instead of one outer product per
        example followed by a sum. The default is exactly that: `gradients` per
        example, summed. Override it only together with `gradients`.
        """
        per_example = jax.vmap(lambda tr, s, j: self.gradients(graph, tr, s, j))(
            traces, signal, jac
        )
        return {name: batch_sum(g) for name, g in per_example.items()}

    def gradients_from_previous(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
        *,
        summed: bool = False,
    ) -> dict[str, Array] | None:
        r"""Optionally, this step's `gradients` from the traces *before* `update`.

        Where the read-out is linear in traces that recur linearly (D-RTRL:
        $c \cdot \epsilon^t = \sum_j (c^\top D)_j\,\epsilon^{t-1}_j +
        (c^\top D_f) \otimes x$), the gradient needs the previous traces only,
        and the trace of a state that no state's update reads (a spike) is then
        not read at all. The driver calls this first; the default, `None`, means:
        use `gradients` (or `summed_gradients`) on the updated traces.

        **Arguments:**

        As for `gradients`, with `traces` at step `t - 1`; with `summed`, every
        argument has a leading batch axis and the result is summed over it (as
        `summed_gradients`).

        **Returns:**

        What `gradients` (or `summed_gradients`) returns, or `None`.
        """
        del graph, traces, signal, jac, summed
        return None


def overrides(algorithm: Any, cls: type, *names: str) -> bool:
    """Whether `type(algorithm)` replaces any of `cls`'s methods `names` (then a
    shortcut `cls` takes for them no longer computes what the subclass means)."""
    return any(getattr(type(algorithm), n) is not getattr(cls, n) for n in names)


def after(tree: PyTree, reads: PyTree) -> PyTree:
    """`tree` with a zero computed from `reads` added to its float leaves, so that
    XLA computes `tree` after `reads`.

    Where a step reads a trace twice, to update it and for something else (a
    read-out, another trace's update), XLA writes the updated trace over the
    previous one only when it can tell that the other reader runs first;
    otherwise it copies the previous trace at every step. The zero makes the
    update depend on the other reader, and XLA fuses the addition into the
    update. `tree` is returned unchanged where `reads` has no float entry."""
    leaves = [
        r
        for r in jax.tree_util.tree_leaves(reads)
        if jnp.issubdtype(jnp.result_type(r), jnp.inexact) and jnp.size(r)
    ]
    if not leaves:
        return tree
    probe = sum(jnp.real(jnp.ravel(r)[0]).astype(jnp.float32) for r in leaves)
    # Zero, even where `reads` is not finite (an inf times zero is a NaN).
    zero = jnp.where(jnp.isfinite(probe), probe * 0, 0)

    def add(a: Any) -> Any:
        if a is None or not jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            return a
        return a + zero.astype(jnp.result_type(a))

    return jax.tree_util.tree_map(add, tree)


def batch_sum(a: Array) -> Array:
    """`a.sum(axis=0)`, written as additions of the batch's even and odd halves.

    XLA fuses the additions, with the products that produce `a`, into one pass.
    A reduction over the batch of such products is what XLA on CPU otherwise
    hands to a library kernel that runs several times slower than the trace
    update that produced `a` (measured with `benchmarks/training.py`).

    The halving stops at the number of devices, with an ordinary sum of what is
    left: a batch split over them (`etrace.shard_batch`) is then summed on each
    device first, and only the per-device sums cross devices.
    """
    if a.shape[0] == 0:
        return jnp.zeros(a.shape[1:], a.dtype)
    devices = jax.device_count()
    rest = []
    while a.shape[0] > devices:
        n = a.shape[0]
        if n % 2:
            rest.append(a[-1])
            a = a[: n - 1]
            n -= 1
        a = a[0::2] + a[1::2]
    total = jnp.sum(a, axis=0) if a.shape[0] > 1 else a[0]
    for r in rest:
        total = total + r
    return total


_FULL_TRACES = contextvars.ContextVar("etrace_full_traces", default=False)


@contextlib.contextmanager
def full_traces() -> Iterator[None]:
    """While an algorithm's `init` runs in this context, it keeps every trace its
    read-out from the updated traces needs, even those its own read-out never
    reads (D-RTRL's trace of a transient state): a wrapper that replaces the
    update or the read-out reads out from the updated traces."""
    token = _FULL_TRACES.set(True)
    try:
        yield
    finally:
        _FULL_TRACES.reset(token)


def keeps_full_traces() -> bool:
    """Whether `init` runs under `full_traces`."""
    return _FULL_TRACES.get()


def sum_states(a: Array) -> Array:
    """`a.sum(axis=-1)` over the few states `K` of the last axis, written as
    element-wise additions: XLA on CPU runs a reduction over a minor axis of size 2
    some hundred times slower than the additions."""
    total = a[..., 0]
    for k in range(1, a.shape[-1]):
        total = total + a[..., k]
    return total


def fused(a: Array) -> Array:
    """`a` times a one that XLA cannot fold away (it comes out of an
    `optimization_barrier`), so that the instruction computing `a` is one of at
    least two in its kernel.

    XLA on CPU compiles a fusion of several element-wise instructions with its
    vectorising emitter, but an element-wise instruction left alone in its kernel
    (an add or multiply of two arrays: `wrapped_add` in the compiled program) by
    another path, several times slower: adding two `(64, 384)` float32 arrays took
    7.3 us alone and 1.2 us with a multiply by a scalar fused in (jax 0.10.2).
    The multiply fuses into whatever kernel computes `a`; it is exact (a number
    times one is itself). Only on CPU (`jax.lax.platform_dependent`, chosen when
    the program is lowered): elsewhere `a` itself, since a GPU's compiler fuses
    element-wise instructions with their neighbours anyway, and can fold an
    addition into the matrix product it follows, which the multiply would undo."""
    return jax.lax.platform_dependent(a, cpu=_times_kept_one, default=_same)


def _times_kept_one(a: Array) -> Array:
    return a * jax.lax.optimization_barrier(jnp.ones((), jnp.result_type(a)))


def _same(a: Array) -> Array:
    return a


def weighted_states(signal: Array, a: Array) -> Array:
    """`sum_k signal[..., k] * a[..., k]` as element-wise operations (`sum_states`).
    With one state that is a lone multiply, and it usually feeds a matrix product,
    which XLA does not fuse it into: `fused` keeps it from being a kernel of one
    instruction."""
    return fused(sum_states(signal * a))


def outer_product_sum(a: Array, b: Array, turned: bool = False) -> Array:
    """`sum_n sum_f a[n, b, w, f] b[n, b, f, c]`: the batch sum of per-example
    outer products as one matrix product (an outer product per example followed by
    a sum over the batch is several times slower), `(B, W, C)`; with `turned`, its
    transpose `(B, C, W)`, as a product that writes it so (XLA on CPU writes a
    product with a short last axis several times slower than its transpose: `(768,
    2048) x (2048, 10)` at 12 GFLOP/s, its transpose at 64)."""
    n, nb, w, f = a.shape
    c = b.shape[-1]
    if nb == 1:
        # One product contracting the leading axes as they lie (`(n f, w)` by
        # `(n f, c)`): XLA reads transposed operands natively, where a batch
        # dimension would make it transpose them first.
        lhs = a.reshape(n, w, f).transpose(0, 2, 1).reshape(n * f, w)
        rhs = b.reshape(n * f, c)
        if turned:
            return jnp.einsum("kc,kw->cw", rhs, lhs)[None]
        return jnp.einsum("kw,kc->wc", lhs, rhs)[None]
    if turned:
        return jnp.einsum("nbfc,nbwf->bcw", b, a)
    return jnp.einsum("nbwf,nbfc->bwc", a, b)


class AbstractUnitAlgorithm(AbstractAlgorithm):
    """An algorithm that keeps an independent trace for every unit.

    Subclasses implement `init_unit`, `update_unit` and `gradient_unit`; the diagonal
    Jacobian `D` and the learning signal arrive already gathered to each output of
    the unit (`D[nmap]`, `signal[nmap]`).
    """

    @abc.abstractmethod
    def init_unit(self, unit: Unit) -> PyTree[Array]:
        """Zero trace for one unit and one example.

        **Arguments:**

        - `unit`: the unit; `unit.shape` is its canonical `(B, Fw, Fx, C)`, `unit.k`
            the states per neuron and `unit.site.dtype` the dtype.

        **Returns:**

        The unit's trace: any pytree of arrays (without a batch axis).
        """

    @abc.abstractmethod
    def update_unit(
        self, unit: Unit, trace: PyTree[Array], D: Array, Df: Array, x: Array
    ) -> PyTree[Array]:
        """One step of the trace recurrence.

        **Arguments:**

        - `unit`: the unit.
        - `trace`: its trace at step `t - 1`.
        - `D`: the neurons' diagonal Jacobian gathered to each canonical output,
            shape `(B, Fw, Fx, K, K)`.
        - `Df`: the derivative of the neuron's states with respect to each output,
            shape `(B, Fw, Fx, K)`.
        - `x`: the weight operation's input in canonical form, shape `(B, Fx, C)`
            (ones for an element-wise parameter).

        **Returns:**

        The trace at step `t`, same structure.
        """

    @abc.abstractmethod
    def gradient_unit(
        self, unit: Unit, trace: PyTree[Array], signal: Array, Df: Array, x: Array
    ) -> Array:
        """Reads out the unit's weight gradient.

        **Arguments:**

        - `unit`: the unit.
        - `trace`: its trace at step `t` (after `update_unit`).
        - `signal`: the learning signal `dL^t/dh^t` of the neuron of each canonical
            output, shape `(B, Fw, Fx, K)`.
        - `Df`, `x`: as for `update_unit`.

        **Returns:**

        The gradient with respect to the unit's weight in canonical `(B, Fw, C)`
        layout.
        """

    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        return {u.name: self.init_unit(u) for u in graph.units}

    def update(self, graph, traces, jac):
        out = {}
        for u in graph.units:
            D = u.gather(jac.D[u.group.name])
            out[u.name] = self.update_unit(
                u, traces[u.name], D, jac.Df[u.name], jac.x[u.name]
            )
        return out

    def gradients(self, graph, traces, signal, jac):
        out = {}
        for u in graph.units:
            sig = u.gather(signal[u.group.name])
            out[u.name] = self.gradient_unit(
                u, traces[u.name], sig, jac.Df[u.name], jac.x[u.name]
            )
        return out

    def summed_gradient_unit(
        self, unit: Unit, trace: PyTree[Array], signal: Array, Df: Array, x: Array
    ) -> Array | None:
        """`gradient_unit` summed over a batch (every argument with a leading batch
        axis), or `None` (the default) to take `gradient_unit` per example and sum.
        A shortcut for read-outs that are outer products (see `outer_product_sum`);
        implementations return `None` when a subclass replaced `gradient_unit`."""
        del unit, trace, signal, Df, x
        return None

    def summed_gradients(self, graph, traces, signal, jac):
        if overrides(self, AbstractUnitAlgorithm, "gradients"):
            return super().summed_gradients(graph, traces, signal, jac)
        return self.summed_unit_gradients(graph, traces, signal, jac)

    def summed_unit_gradients(self, graph, traces, signal, jac):
        """`summed_gradients` unit by unit, through `summed_gradient_unit`."""
        out = {}
        for u in graph.units:
            args = (
                traces[u.name],
                u.gather(signal[u.group.name], axis=1),
                jac.Df[u.name],
                jac.x[u.name],
            )
            summed = self.summed_gradient_unit(u, *args)
            if summed is None:
                per_example = jax.vmap(self.gradient_unit, in_axes=(None, 0, 0, 0, 0))
                summed = batch_sum(per_example(u, *args))
            out[u.name] = summed
        return out
