"""Whole sequences: `online_grad`, the BPTT oracle `bptt_grad`, and `compare`."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._analysis import keystr
from ._errors import EtraceError
from ._kernels import after, fused
from ._learner import Learner, TraceState
from ._step import Chunk, ChunkIO, StepOptions


def _length(xs: Any, targets: Any, mask: Any) -> int:
    lengths = {jnp.shape(a)[0] for a in jtu.tree_leaves((xs, targets)) if jnp.ndim(a)}
    if any(jnp.ndim(a) == 0 for a in jtu.tree_leaves((xs, targets))):
        raise EtraceError(
            "`xs` and `targets` need a leading time axis; got a scalar leaf."
        )
    if len(lengths) != 1:
        raise EtraceError(
            "Every leaf of `xs` and `targets` must have the same length on axis 0 "
            f"(time); got lengths {sorted(lengths)}."
        )
    (length,) = lengths
    if mask is not None and jnp.shape(mask) != (length,):
        raise EtraceError(
            f"`mask` must have shape ({length},), one weight per time step, got "
            f"{jnp.shape(mask)}."
        )
    return length


def _check_loss_fn(loss_fn: Any) -> None:
    """`online_grad` and `bptt_grad` compile with `loss_fn` as a static argument
    (its arrays, if it holds any, traced): the rest of it must be hashable."""
    for leaf in jtu.tree_leaves(loss_fn):
        if eqx.is_array(leaf):
            continue
        try:
            hash(leaf)
        except TypeError:
            raise EtraceError(
                f"`loss_fn` is (or holds) an unhashable {type(leaf).__name__}; "
                "the sequence is compiled with it as a static argument. Pass a "
                "plain function, a `functools.partial`, or an `eqx.Module` with "
                "`__call__` instead."
            ) from None


def _default_mask(xs: Any, targets: Any, mask: Any) -> Any:
    """Weight 1 for every step unless given. Made inside the compiled program,
    where it costs no memory: passed in, it would be a buffer of the sequence's
    length."""
    if mask is None:
        return jnp.ones(_length(xs, targets, mask), jnp.float32)
    return jnp.asarray(mask)


def _batch_size(tree: Any, axis: int, what: str) -> int:
    sizes = {jnp.shape(a)[axis] for a in jtu.tree_leaves(tree) if jnp.ndim(a) > axis}
    if len(sizes) != 1:
        raise EtraceError(
            f"With a batched trace state, every leaf of `{what}` needs the batch on "
            f"axis {axis}; got sizes {sorted(sizes)} there."
        )
    return sizes.pop()


def _zeros_like_grads(model: Any) -> Any:
    return jtu.tree_map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))


def _turned_sums(learner: Learner, zeros: Any) -> Any:
    """Per gradient leaf, whether `online_grad` keeps its running sum transposed:
    the weights whose gradient the algorithm forms transposed
    (`transposed_gradients`: D-RTRL's turned traces), so that adding each step's
    gradient is not a transpose. Every other sum keeps the parameter's layout."""
    algorithm = learner.algorithm
    graph, layout = learner.graph, learner.compiled.layout
    traces = jax.eval_shape(lambda: learner.init()).traces
    names = algorithm.transposed_gradients(graph, traces)
    paths = set()
    for u in graph.units:
        s = u.site
        # The weight is the parameter itself, a matrix `(Fw, C)`.
        if (
            u.name in names
            and len(s.params) == 1
            and s.b == 1
            and s.w_perm == (0, 1)
            and layout.avals[s.params[0]].shape == s.w_shape
        ):
            paths.add(layout.paths[s.params[0]])

    def turned(path: Any, a: Any) -> bool:
        del a
        return keystr(path) in paths

    return jtu.tree_map_with_path(turned, zeros)


def _turn(a: Any, turned: bool) -> Any:
    return a.T if turned else a


# `chunk` is validated with an `EtraceError` that says what to pass.
@typing.no_type_check
def online_grad(
    learner: Learner,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    trace_state: TraceState,
    xs: PyTree[Array],
    targets: PyTree[Array],
    *,
    mask: Float[Array, " T"] | None = None,
    chunk: int | None = None,
    modulators: PyTree[Array] | None = None,
) -> tuple[Any, TraceState, Float[Array, " T"]]:
    """The online gradient of a whole sequence, with memory independent of its length.

    Scans over time; at each step runs `learner.step`, takes the gradient of that
    step's loss with respect to the model, and adds it to the running sum.

    **Arguments:**

    - `learner`: from `etrace.compile`.
    - `loss_fn`: `loss_fn(y, target) -> scalar`, the loss of one step of one example.
        The sequence compiles as one program with `loss_fn` static (its arrays
        traced), so it must be hashable: a function, a `functools.partial` or an
        `eqx.Module`.
    - `model`: the model (held fixed over the sequence).
    - `trace_state`: where to start. If batched (from `learner.init(batch_size=B)`),
        `xs` and `targets` carry the batch on axis 1 and each step's loss is the mean
        over the batch.
    - `xs`, `targets`: pytrees with time on axis 0.
    - `mask`: optional weights of shape `(T,)`; step `t`'s loss is multiplied by
        `mask[t]` (0 advances state and traces only, e.g. during a warm-up).
    - `chunk`: for D-RTRL and OSTL, advance the traces `chunk` steps at a time
        (the last chunk may be shorter). The same gradient and traces in exact
        arithmetic, computed with two passes over the traces per chunk instead of
        per step, and the rest as matrix products over the chunk's steps; memory
        grows by the chunk's Jacobians, inputs and learning signals (`chunk`
        times a step's, independent of the sequence's length). Worth it where
        the traces are larger than the CPU's caches (see the performance page).
    - `modulators`: for algorithms whose learning signal is a modulator
        (`etrace.ThreeFactor`), each step's modulator (as `Learner.step` takes
        it), time on axis 0 and, with a batched trace state, the batch on axis 1
        (or scalars per step, the same for the whole batch). Weighted like the
        step's loss: by `mask[t]`, and by `1 / B` for a batch's mean.

    **Returns:**

    `(grads, trace_state, losses)`: the summed gradients (model-shaped, `None` for
    non-float leaves), the trace state after the last step, and the unweighted loss
    of each step, shape `(T,)`.
    """
    _length(xs, targets, mask)
    _check_loss_fn(loss_fn)
    if jnp.ndim(trace_state.t) == 1:
        size = int(jnp.shape(trace_state.t)[0])
        for what, tree in (("xs", xs), ("targets", targets)):
            if _batch_size(tree, 1, what) != size:
                raise EtraceError(
                    f"The trace state has batch size {size}, but `{what}` has "
                    f"{_batch_size(tree, 1, what)} on axis 1."
                )
    if chunk is not None:
        _check_chunk(learner, chunk)
    if modulators is not None:
        _check_modulators(xs, targets, mask, modulators)
    return _online_grad(
        learner, loss_fn, model, trace_state, xs, targets, mask, chunk, modulators
    )


def _check_modulators(xs: Any, targets: Any, mask: Any, modulators: Any) -> None:
    length = _length(xs, targets, mask)
    for path, m in jtu.tree_flatten_with_path(modulators)[0]:
        if jnp.ndim(m) == 0 or jnp.shape(m)[0] != length:
            raise EtraceError(
                f"`modulators{jtu.keystr(path)}` has shape {jnp.shape(m)}: it needs "
                f"time on axis 0, {length} steps like `xs`."
            )


def _check_chunk(learner: Learner, chunk: Any) -> None:
    """`chunk` is a positive integer, and the learner's algorithm one whose traces
    a chunk can advance, with the learning signal of autodiff."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise EtraceError(
            f"`chunk` must be a positive integer (steps per chunk), got {chunk!r}."
        )
    algorithm = learner.algorithm
    signal = algorithm.learning_signal
    if signal != "gradient":
        how = "takes a modulator" if signal == "modulator" else "projects a feedback"
        raise EtraceError(
            f"{type(algorithm).__name__} {how} learning signal, which a chunk does "
            "not collect; leave `chunk` out."
        )
    refusal = algorithm.chunk_refusal(learner.graph)
    if refusal is not None:
        raise EtraceError(refusal)


# One program for the whole sequence, called eagerly or inside the caller's `jit`:
# run eagerly, the scan and the bookkeeping around it would each compile apart.
def _step_loss(learner, loss_fn, batched: bool, size: int, options: StepOptions):
    """`step_loss(model, ts, x, target, weight, io) -> (weighted loss, (ts, loss,
    records))`: one step's loss, the batch mean of a batched trace state's, with
    the step evaluated under `options` (see `etrace._step`)."""

    projects_target = learner.algorithm.learning_signal == "target_feedback"
    share = 1.0 / size if batched else 1.0

    def weighted(tree, weight):
        return jtu.tree_map(
            lambda a: jnp.asarray(a) * (weight.astype(jnp.result_type(a)) * share),
            tree,
        )

    def step_loss(model, ts, x, target, weight, modulator=None, io=ChunkIO()):
        # A learning signal that replaces the loss's (a projected target, a
        # modulator) is linear in what it is made of: weight that like this
        # step's loss (mask, batch mean).
        signal_target = weighted(target, weight) if projects_target else None
        if modulator is not None:
            modulator = weighted(modulator, weight)
        y, ts, records = learner._run(
            model, ts, x, signal_target, options, io, modulator
        )
        if batched:
            loss = jnp.mean(jax.vmap(loss_fn)(y, target))
        else:
            loss = loss_fn(y, target)
        # The weight in the loss's dtype: a float64 mask (the default dtype under
        # `jax_enable_x64`) would make a float32 model's loss and cotangents float64.
        return loss * weight.astype(jnp.result_type(loss)), (ts, loss, records)

    return step_loss


def _add_grads(total: Any, grads: Any, turned: Any) -> Any:
    """The running sum plus this step's gradient. `fused`: the sum and the step's
    gradient (a matrix product's result) would be a kernel of one add."""
    return jtu.tree_map(lambda s, g, t: fused(s) + _turn(g, t), total, grads, turned)


# One program for the whole sequence, called eagerly or inside the caller's `jit`:
# run eagerly, the scan and the bookkeeping around it would each compile apart.
@eqx.filter_jit
def _online_grad(
    learner, loss_fn, model, trace_state, xs, targets, mask, chunk, modulators
):
    mask = _default_mask(xs, targets, mask)
    batched = jnp.ndim(trace_state.t) == 1
    size = int(jnp.shape(trace_state.t)[0]) if batched else 1
    options = StepOptions()
    zeros = _zeros_like_grads(model)
    turned = _turned_sums(learner, zeros)
    init = (trace_state, jtu.tree_map(_turn, zeros, turned))
    if chunk is not None:
        run = _chunk_run(learner, loss_fn, model, turned, batched, size, options)
        (trace_state, grads), losses = _chunked_scan(
            run, init, (xs, targets, mask), chunk
        )
        return jtu.tree_map(_turn, grads, turned), trace_state, losses
    step_loss = _step_loss(learner, loss_fn, batched, size, options)
    grad_fn = eqx.filter_value_and_grad(step_loss, has_aux=True)

    def body(carry, inputs):
        ts, total = carry
        (_, (ts, loss, _)), grads = grad_fn(model, ts, *inputs)
        ts = learner.after_read_out(ts, grads)
        return (ts, _add_grads(total, grads, turned)), loss

    inputs = (xs, targets, mask, modulators)
    (trace_state, grads), losses = jax.lax.scan(body, init, inputs)
    return jtu.tree_map(_turn, grads, turned), trace_state, losses


def _chunk_run(learner, loss_fn, model, turned, batched, size, options):
    """One chunk of `online_grad(..., chunk=S)`: its steps but the last collect
    their Jacobians and learning signals with the traces left as they are
    (`Chunk.COLLECT`), and the last advances the traces over the chunk and reads
    out its gradient (`Chunk.FLUSH`)."""
    lead = (size,) if batched else ()
    probes = {  # one per state, as the learning signal is recorded
        g.name: tuple(jnp.zeros(lead + (g.n,), g.leaf_dtype(k)) for k in range(g.k))
        for g in learner.graph.groups
    }
    collect_loss = _step_loss(
        learner,
        loss_fn,
        batched,
        size,
        dataclasses.replace(options, chunk=Chunk.COLLECT),
    )
    flush_loss = _step_loss(
        learner, loss_fn, batched, size, dataclasses.replace(options, chunk=Chunk.FLUSH)
    )

    def probed(diff, ts, x, target, weight):
        model, probes = diff
        return collect_loss(model, ts, x, target, weight, None, ChunkIO(probes=probes))

    collect_grad = eqx.filter_value_and_grad(probed, has_aux=True)
    flush_grad = eqx.filter_value_and_grad(flush_loss, has_aux=True)

    def run(carry, inputs):
        ts, total = carry
        traces = ts.traces
        n = jnp.shape(inputs[2])[0]

        def collect(c, step_inputs):
            state, t, total = c
            ts_in = TraceState(state, traces, t)
            (_, (out, loss, records)), (grads, signals) = collect_grad(
                (model, probes), ts_in, *step_inputs
            )
            total = _add_grads(total, grads, turned)
            return (out.state, out.t, total), (records, signals, loss)

        earlier = jtu.tree_map(lambda a: a[: n - 1], inputs)
        (state, t, total), (records, signals, losses) = jax.lax.scan(
            collect, (ts.state, ts.t, total), earlier
        )
        if batched:  # the batch first, as the step's vmap takes it
            records, signals = jtu.tree_map(
                lambda a: jnp.swapaxes(a, 0, 1), (records, signals)
            )
        io = ChunkIO(records=records, signals=signals)
        last = jtu.tree_map(lambda a: a[n - 1], inputs)
        (_, (out, loss, _)), grads = flush_grad(
            model, TraceState(state, traces, t), *last, None, io
        )
        total = _add_grads(total, grads, turned)
        # The new traces after the read-out, which reads the chunk's first ones:
        # XLA can then write them in place (see `Learner.after_read_out`).
        out = TraceState(out.state, after(out.traces, grads), out.t)
        return (out, total), jnp.concatenate([losses, loss[None]])

    return run


def _chunked_scan(run, init, inputs, chunk):
    """`run` over the sequence `chunk` steps at a time: a scan over the whole
    chunks, then the rest."""
    length = jnp.shape(inputs[2])[0]
    whole, rest = divmod(length, chunk)
    carry, losses = init, []
    if whole:
        shaped = jtu.tree_map(
            lambda a: a[: whole * chunk].reshape((whole, chunk) + a.shape[1:]), inputs
        )
        carry, out = jax.lax.scan(run, carry, shaped)
        losses.append(out.reshape(-1))
    if rest:
        carry, out = run(carry, jtu.tree_map(lambda a: a[whole * chunk :], inputs))
        losses.append(out)
    return carry, jnp.concatenate(losses)


def bptt_grad(
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    state: PyTree[Array],
    xs: PyTree[Array],
    targets: PyTree[Array],
    *,
    mask: Float[Array, " T"] | None = None,
    batched: bool = False,
) -> tuple[Any, Float[Array, " T"]]:
    """The exact gradient of a whole sequence by back-propagation through time.

    The oracle that online gradients are compared with: the same loss as
    `online_grad` (sum over steps of `mask[t] * loss_fn(y_t, target_t)`), with the
    model held fixed over the sequence.

    **Arguments:**

    - `loss_fn`, `xs`, `targets`, `mask`: as for `online_grad`.
    - `model`: the model, `model(x, state) -> (y, state)`.
    - `state`: the initial hidden state (e.g. `trace_state.state`). The caller's
        `eqx.nn.State` is not invalidated.
    - `batched`: if `True`, every leaf of `state` has a leading batch axis, `xs` and
        `targets` carry the batch on axis 1, and each step's loss is the batch mean.

    **Returns:**

    `(grads, losses)`: model-shaped gradients and each step's unweighted loss.
    """
    _length(xs, targets, mask)
    _check_loss_fn(loss_fn)
    return _bptt_grad(loss_fn, model, state, xs, targets, mask, batched)


@eqx.filter_jit
def _bptt_grad(loss_fn, model, state, xs, targets, mask, batched):
    mask = _default_mask(xs, targets, mask)
    leaves, treedef = jtu.tree_flatten(state)

    def total(model):
        def body(s, inputs):
            x, target, weight = inputs
            if batched:
                y, s = jax.vmap(model)(x, s)
                loss = jnp.mean(jax.vmap(loss_fn)(y, target))
            else:
                y, s = model(x, s)
                loss = loss_fn(y, target)
            return s, (loss * weight.astype(jnp.result_type(loss)), loss)

        s0 = jtu.tree_unflatten(treedef, leaves)
        _, (weighted, losses) = jax.lax.scan(body, s0, (xs, targets, mask))
        return jnp.sum(weighted), losses

    (_, losses), grads = eqx.filter_value_and_grad(total, has_aux=True)(model)
    return grads, losses


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Per-parameter agreement of an online gradient with BPTT.

    **Attributes:**

    - `rows`: per parameter path, `(relative_error, cosine_similarity, norm_online,
        norm_bptt)`; relative error is `|g - g_bptt| / |g_bptt|`.
    - `online`, `bptt`: the two gradient pytrees.
    """

    rows: dict[str, tuple[float, ...]]
    online: Any
    bptt: Any

    def __str__(self) -> str:
        head = ("parameter", "rel. error", "cosine", "|online|", "|bptt|")
        body = [
            (p, f"{e:.3e}", f"{c:.6f}", f"{a:.3e}", f"{b:.3e}")
            for p, (e, c, a, b) in self.rows.items()
        ]
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        return "\n".join(
            "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
            for r in [head] + body
        )


def gradient_table(online: Any, bptt: Any) -> dict[str, tuple[float, ...]]:
    """Relative error and cosine similarity for each leaf of two gradient pytrees."""
    rows = {}
    pairs = jtu.tree_flatten_with_path(online)[0]
    other = jtu.tree_leaves(bptt)
    for (path, a), b in zip(pairs, other):
        # In NumPy: eager JAX would compile each of these small reductions for
        # every leaf shape.
        a = np.ravel(np.asarray(a, np.float64))
        b = np.ravel(np.asarray(b, np.float64))
        na = float(np.linalg.norm(a))
        nb = float(np.linalg.norm(b))
        err = float(np.linalg.norm(a - b)) / nb if nb > 0 else float(na > 0)
        cos = float(np.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else float(na == nb)
        rows[keystr(path)] = (err, cos, na, nb)
    return rows


def compare(
    learner: Learner,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    trace_state: TraceState,
    xs: PyTree[Array],
    targets: PyTree[Array],
    *,
    mask: Float[Array, " T"] | None = None,
) -> Comparison:
    """Compares the online gradient of a sequence with BPTT, per parameter.

    Runs `online_grad` from `trace_state` and `bptt_grad` from `trace_state.state`
    on the same data. `print(result)` shows a table.

    **Arguments:**

    - `learner`, `loss_fn`, `model`, `xs`, `targets`, `mask`: as for `online_grad`.
    - `trace_state`: where to start, usually `learner.init()` (or
        `learner.init(batch_size=B)` for a batch, with `xs` and `targets` batched on
        axis 1). BPTT starts from its hidden state.

    **Returns:**

    A `Comparison` with relative error and cosine similarity per parameter.
    """
    online, _, _ = online_grad(
        learner, loss_fn, model, trace_state, xs, targets, mask=mask
    )
    batched = jnp.ndim(trace_state.t) == 1
    exact, _ = bptt_grad(
        loss_fn, model, trace_state.state, xs, targets, mask=mask, batched=batched
    )
    return Comparison(gradient_table(online, exact), online, exact)
