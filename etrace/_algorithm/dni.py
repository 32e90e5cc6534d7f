"""Decoupled neural interfaces: truncated online learning with synthetic gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._errors import EtraceError
from .._graph import Graph
from .base import AbstractAlgorithm
from .helpers import refuse_complex
from .rtrl import RTRL


_NOT_WHOLE_STATE = (
    "DNI(inner={name}(...)): DNI wraps a whole-state algorithm (`etrace.RTRL()`, "
    "`etrace.SnAp(n)`, `etrace.UORO()`, `etrace.KF_RTRL()`), whose learning signal "
    "and traces cover the whole hidden state its predictor reads and feeds; "
    "{name} {why}. Pass one of those as `inner`."
)


def _slices(graph: Graph) -> list[tuple[str, int, int]]:
    """Each group's name and its slice of the flat hidden vector."""
    out, start = [], 0
    for g in graph.groups:
        out.append((g.name, start, start + g.n * g.k))
        start += g.n * g.k
    return out


def synthetic_gradient(graph: Graph, predictor: dict[str, Any], h: Array) -> Array:
    """The predictor's output for the flat hidden state `h`: each group's affine map
    of its own values, `weight @ h_g + bias`."""
    parts = [
        predictor[name]["weight"] @ h[a:b] + predictor[name]["bias"]
        for name, a, b in _slices(graph)
    ]
    return jnp.concatenate(parts) if parts else jnp.zeros_like(h)


def _restart(fresh: Any, traces: Any, first: Any) -> Any:
    # Inexact leaves restart from `init`; others (a PRNG key) carry on.
    def pick(z, a):
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            return jnp.where(first, z, a)
        return a

    return jtu.tree_map(pick, fresh, traces)


class DNI(AbstractAlgorithm):
    r"""Truncated online learning with synthetic gradients (Jaderberg et al.,
    "Decoupled neural interfaces using synthetic gradients", ICML 2017, the
    recurrent case).

    The sequence is cut into chunks of `every` steps (by the step counter, so a
    chunk may span calls). Within a chunk `inner` (a whole-state algorithm, RTRL by
    default) runs as usual, but its traces restart at each chunk's first step: no
    credit flows across a chunk boundary, as in truncated BPTT (with `RTRL`, the
    gradient *is* truncated BPTT's over these chunks). At each chunk's last step
    $T$, the learning signal gains the prediction of the gradient of every later
    loss by the state the chunk leaves behind,

    $$c^T \leftarrow c^T + \hat g(h^T), \qquad
      \hat g_k(h) = W_k h_k + b_k \text{ for each hidden group } k,$$

    an affine map of each group's own values (their $N K$ values flattened in state
    order), kept in the trace state as `trace_state.traces["predictor"][group]`
    with entries `"weight"` $(NK, NK)$ and `"bias"` $(NK,)$, zero at `init`. A zero
    predictor gives the plain truncated gradient.

    The predictor is trained from the bootstrapped target of each chunk that starts
    from state $h^{T_0}$ and ends in $h^{T}$: the gradient of the chunk's own loss
    by $h^{T_0}$ plus the prediction at its end, pushed back through the chunk,

    $$\ell = \tfrac12 \left\lVert \hat g(h^{T_0}) - \operatorname{sg}\left[
      \tfrac{\partial L_\text{chunk}}{\partial h^{T_0}}
      + \left(\tfrac{\partial h^T}{\partial h^{T_0}}\right)^{\!\top} \hat g(h^T)
      \right] \right\rVert^2,$$

    (`sg`: no gradient through the target). `etrace.dni_grad` returns both the
    model's gradient and the predictor's gradient of $\ell$ for a stretch of whole
    chunks; apply them with any optimiser and put the predictor back into the trace
    state. Memory: the inner traces plus $(NK)^2 + NK$ per group.

    **Arguments:**

    - `inner`: the whole-state algorithm run within each chunk (default
        `etrace.RTRL()`).
    - `every`: the chunk length in steps.

    **Raises:**

    `EtraceError` for an `inner` algorithm that is not whole-state or not driven by
    the gradient, and for an `every` that is not a positive int.
    """

    inner: AbstractAlgorithm = RTRL()
    every: int = 8

    def __check_init__(self):
        every = self.every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise EtraceError(
                f"DNI(every={every!r}): `every` is the chunk length in steps, an "
                "int of at least 1."
            )
        name = type(self.inner).__name__
        if self.inner.routing != "joint":
            why = "keeps per-group traces"
            raise EtraceError(_NOT_WHOLE_STATE.format(name=name, why=why))
        if self.inner.learning_signal != "gradient":
            why = f"takes its learning signal from `{self.inner.learning_signal}`"
            raise EtraceError(_NOT_WHOLE_STATE.format(name=name, why=why))

    # The capabilities are the inner algorithm's.
    @property
    def routing(self) -> str:  # pyright: ignore[reportIncompatibleVariableOverride]
        return "joint"

    @property
    def dense_jacobians(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.dense_jacobians

    @property
    def site_jacobians(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.inner.site_jacobians

    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        refuse_complex(graph, "DNI")
        dtype = graph.groups[0].dtype if graph.groups else jnp.result_type(float)
        predictor = {
            name: {
                "weight": jnp.zeros((b - a, b - a), dtype),
                "bias": jnp.zeros((b - a,), dtype),
            }
            for name, a, b in _slices(graph)
        }
        return {"inner": self.inner.init(graph), "predictor": predictor}

    def update(self, graph, traces, jac):
        first = jac.t % self.every == 0
        inner = _restart(self.inner.init(graph), traces["inner"], first)
        new = self.inner.update(graph, inner, jac)
        return {"inner": new, "predictor": traces["predictor"]}

    def _signal(self, graph, traces, signal, jac):
        last = (jac.t + 1) % self.every == 0
        synthetic = synthetic_gradient(graph, traces["predictor"], jac.h)
        return {"hidden": signal["hidden"] + jnp.where(last, synthetic, 0)}

    def gradients(self, graph, traces, signal, jac):
        signal = self._signal(graph, traces, signal, jac)
        return self.inner.gradients(graph, traces["inner"], signal, jac)

    def summed_gradients(self, graph, traces, signal, jac):
        signal = jax.vmap(lambda tr, s, j: self._signal(graph, tr, s, j))(
            traces, signal, jac
        )
        return self.inner.summed_gradients(graph, traces["inner"], signal, jac)

    def trace_of(self, graph, traces, path):
        return self.inner.trace_of(graph, traces["inner"], path)

    def stored_traces(self, graph, traces, path):
        return self.inner.stored_traces(graph, traces["inner"], path)

    def summary_note(self, graph: Graph, path: str) -> str | None:
        note = self.inner.summary_note(graph, path)
        chunked = f"{type(self.inner).__name__} restarted every {self.every} steps"
        return chunked if note is None else f"{chunked}; {note}"


def dni_grad(
    learner: Any,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    trace_state: Any,
    xs: PyTree[Array],
    targets: PyTree[Array],
    *,
    mask: Array | None = None,
) -> tuple[Any, dict[str, Any], Any, Array]:
    """The model's and the predictor's gradients over whole chunks of a stream, for
    a learner compiled with `algorithm=etrace.DNI(...)`.

    The model's gradient is `etrace.online_grad`'s (truncated at the chunk
    boundaries, with the synthetic gradient at each chunk's end). The predictor's
    is that of the regression loss in `etrace.DNI`, summed over the chunks: each
    chunk's target is computed by back-propagating through that chunk alone (the
    gradient of its loss, and of the prediction at its end, by the state it starts
    from), so this costs one chunk of activations, as truncated BPTT.

    **Arguments:**

    - `learner`, `loss_fn`, `model`, `xs`, `targets`, `mask`: as for
        `etrace.online_grad`; the length of `xs` a multiple of the chunk length.
    - `trace_state`: an unbatched trace state at a chunk boundary (its step
        counter a multiple of the chunk length), holding the predictor in
        `trace_state.traces["predictor"]`.

    **Returns:**

    `(grads, predictor_grads, trace_state, losses)`: the model-shaped gradient,
    the gradient of the predictor (shaped as `trace_state.traces["predictor"]`),
    the trace state after `xs`, and each step's loss.

    **Raises:**

    `EtraceError` for a learner without `DNI`, a batched trace state, or a stretch
    that is not made of whole chunks.
    """
    from .._sequence import online_grad

    algorithm = learner.algorithm
    if not isinstance(algorithm, DNI):
        raise EtraceError(
            "`etrace.dni_grad` takes a learner compiled with "
            f"`algorithm=etrace.DNI(...)`; this one runs {type(algorithm).__name__}."
            " Use `etrace.online_grad` for it."
        )
    _check_stretch(algorithm.every, trace_state, xs)
    grads, end, losses = online_grad(
        learner, loss_fn, model, trace_state, xs, targets, mask=mask
    )
    if mask is None:
        mask = jnp.ones(len(losses), losses.dtype)
    predictor_grads = _predictor_grad(
        learner, loss_fn, model, trace_state, xs, targets, mask
    )
    return grads, predictor_grads, end, losses


def _check_stretch(every: int, trace_state: Any, xs: Any) -> None:
    if jnp.ndim(trace_state.t) != 0:
        raise EtraceError(
            "`etrace.dni_grad` takes an unbatched trace state (from "
            "`learner.init()`); for a batch, `jax.vmap` it over the examples and "
            "average the predictor's gradients."
        )
    length = jnp.shape(jtu.tree_leaves(xs)[0])[0]
    if length % every:
        raise EtraceError(
            f"`xs` has {length} steps, not a whole number of DNI chunks of "
            f"{every} steps: pass whole chunks (`every` divides the length)."
        )
    if isinstance(trace_state.t, jax.core.Tracer):  # under `jit` or `vmap`
        return
    start = int(trace_state.t)
    if start % every:
        raise EtraceError(
            f"The trace state is at step {start}, inside a DNI chunk of {every} "
            "steps: start `etrace.dni_grad` at a chunk boundary."
        )


@eqx.filter_jit
def _predictor_grad(learner, loss_fn, model, trace_state, xs, targets, mask):
    """The gradient of the predictor's loss, summed over the chunks."""
    graph = learner.graph
    every = learner.algorithm.every
    predictor = trace_state.traces["predictor"]
    leaves, treedef = jtu.tree_flatten(trace_state.state)
    hidden = [j for g in graph.groups for j in g.leaves]

    def flat(hs):
        return jnp.concatenate([jnp.reshape(h, (-1,)) for h in hs])

    def run(start, hs, inputs):
        state = list(start)
        for j, h in zip(hidden, hs):
            state[j] = h

        def body(s, step):
            x, target, weight = step
            y, new = model(x, jtu.tree_unflatten(treedef, s))
            new = jtu.tree_leaves(new)
            return new, weight * loss_fn(y, target)

        end, losses = jax.lax.scan(body, state, inputs)
        return end, jnp.sum(losses)

    def chunk(carry, inputs):
        start, total = carry
        hs = [start[j] for j in hidden]

        def chunk_loss(hs):
            end, loss = run(start, hs, inputs)
            h_end = flat([end[j] for j in hidden])
            g_end = synthetic_gradient(graph, predictor, jax.lax.stop_gradient(h_end))
            return loss + jnp.dot(jax.lax.stop_gradient(g_end), h_end), end

        target, end = jax.grad(chunk_loss, has_aux=True)(hs)
        target = jax.lax.stop_gradient(flat(target))

        def regression(p):
            error = synthetic_gradient(graph, p, flat(hs)) - target
            return 0.5 * jnp.sum(error**2)

        grads = jax.grad(regression)(predictor)
        total = jtu.tree_map(jnp.add, total, grads)
        return (jax.lax.stop_gradient(end), total), None

    def chunks(a):
        return jnp.reshape(a, (-1, every) + jnp.shape(a)[1:])

    inputs = jtu.tree_map(chunks, (xs, targets, mask))
    zero = jtu.tree_map(jnp.zeros_like, predictor)
    (_, total), _ = jax.lax.scan(chunk, (leaves, zero), inputs)
    return total
