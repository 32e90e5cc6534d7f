"""`etrace.compile`, the `Learner` it returns, and the `TraceState` it threads."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Int, PyTree

from ._algorithm.base import AbstractAlgorithm
from ._algorithm.d_rtrl import D_RTRL
from ._analysis import (
    analyse,
    check_holomorphic,
    Compiled,
    initial_state,
    keystr,
    Leaf,
    split_model,
    warn_one_step,
)
from ._errors import describe as _describe, EtraceError
from ._graph import Graph
from ._kernels import after
from ._step import ChunkIO, run_step, StepOptions


class TraceState(eqx.Module):
    """Everything that changes from one step to the next, besides the model.

    **Attributes:**

    - `state`: the model's hidden state, in the structure the model uses (an
        `eqx.nn.State` or any pytree).
    - `traces`: the algorithm's traces, keyed by unit name (see `Learner.summary`).
    - `t`: the step counter (`int32`), counting steps since `init` or `reset`.

    With `Learner.init(batch_size=B)` every leaf, `t` included, has a leading batch
    axis. A `TraceState` round-trips through `eqx.tree_serialise_leaves`.
    """

    state: PyTree[Array]
    traces: dict[str, PyTree[Array]]
    t: Int[Array, "*batch"]


def _clone(tree: Any) -> Any:
    leaves, treedef = jtu.tree_flatten(tree)
    return jtu.tree_unflatten(treedef, [jnp.array(x) for x in leaves])


def _desc(a: Any) -> str:
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def _check_leaves(what: str, names, expected, got, hint: str) -> None:
    for name, e, g in zip(names, expected, got):
        if tuple(e.shape) != tuple(jnp.shape(g)) or jnp.dtype(
            e.dtype
        ) != jnp.result_type(g):
            raise EtraceError(
                f"{what} `{name}` is {_desc(jnp.asarray(g))}, but the learner was "
                f"compiled for {_desc(e)}. {hint}"
            )


_X_HINT = (
    "`step` takes one time step shaped like `sample_input`; for a batch, pass a "
    "trace state from `learner.init(batch_size=B)` and inputs with a leading axis "
    "`B` (or `jax.vmap(learner.step, in_axes=(None, 0, 0))` over unbatched ones), "
    "and keep the dtype of the sample."
)

_NOT_BATCHED = (
    "The trace state is batched (batch size {size}, from "
    "`learner.init(batch_size=...)`), so every leaf of `{what}` needs a leading "
    "batch axis of size {size}{each}; leaf `{what}{path}` has shape {shape}. Pass a "
    "batch of inputs, or an unbatched trace state (`learner.init()`) for one example."
)


def batch_size(trace_state: Any) -> int | None:
    """The batch size of a batched trace state (`t` of shape `(B,)`), else `None`."""
    t = jnp.shape(trace_state.t)
    return int(t[0]) if len(t) == 1 else None


def _check_batch(size: int, what: str, tree: Any, avals: Any = None) -> None:
    """Every leaf of `tree` has the leading batch axis `size` (and, where `avals`
    are given and the structure matches, the compiled shape after it)."""
    leaves = jtu.tree_flatten_with_path(tree)[0]
    if avals is not None and len(avals) != len(leaves):
        avals = None  # a structure error, reported per example
    for k, (path, leaf) in enumerate(leaves):
        shape = tuple(jnp.shape(leaf))
        want = None if avals is None else (size, *avals[k].shape)
        if (want is not None and shape != want) or not shape or shape[0] != size:
            each = "" if avals is None else " before the shape of `sample_input`"
            raise EtraceError(
                _NOT_BATCHED.format(
                    size=size,
                    what=what,
                    each=each,
                    path=jtu.keystr(path),
                    shape=shape,
                )
            )


class Learner(eqx.Module):
    """Runs a model one step at a time while carrying eligibility traces.

    Built by `etrace.compile`. It holds the algorithm, the analysed step (static) and
    the model's initial hidden state, but no parameters: pass the current model to
    every call, so one learner serves the model throughout training.

    Differentiating any loss of `step`'s output with respect to the model gives the
    algorithm's online gradient for that step (see `step`). `print(learner)` shows
    `summary()`.

    **Attributes:**

    - `algorithm`: the online algorithm (an `etrace.AbstractAlgorithm`).
    - `graph`: the hidden groups and traced units the compiler found (an
        `etrace.Graph`).
    - `init_state`: the model's initial hidden state, as passed to `compile`.
    - `check_finite`: whether `step` checks that traces and gradients are finite
        (see `etrace.compile`).
    """

    algorithm: AbstractAlgorithm
    compiled: Compiled = eqx.field(static=True)
    init_state: PyTree[Array]
    check_finite: bool = eqx.field(static=True, default=False)

    @property
    def graph(self) -> Graph:
        """The hidden groups and traced units the compiler found."""
        return self.compiled.graph

    def step(
        self,
        model: Any,
        trace_state: TraceState,
        x: PyTree[ArrayLike],
        target: PyTree[ArrayLike] | None = None,
        *,
        modulator: PyTree[ArrayLike] | None = None,
    ):
        """Runs the model for one step and advances hidden state and traces.

        **Arguments:**

        - `model`: the current model (same structure as the compiled one).
        - `trace_state`: the `TraceState` from the previous step (or `init`). A
            batched one (from `init(batch_size=B)`) runs a batch of `B` examples.
        - `x`: one time step, shaped like `sample_input`; with a batched trace
            state, a batch of them, every leaf with a leading axis `B`.
        - `target`: this step's target, for algorithms whose learning signal is a
            projection of it (`etrace.OSTTP`; batched like `x`); ignored by the
            others.
        - `modulator`: this step's third factor, for algorithms whose learning
            signal is a modulator (`etrace.ThreeFactor`): a scalar for every
            neuron, an array of a hidden group's neuron shape, or a dict of those
            keyed by group name. With a batched trace state every leaf has a
            leading axis `B`, one modulator per example (or is a scalar for all).

        **Returns:**

        `(y, trace_state)`: the model's output (with a leading axis `B` for a
        batch) and the next trace state. The gradient of any loss of `y` with
        respect to `model` is the algorithm's online gradient for this step:
        traced parameters get it from the traces, parameters that reach no hidden
        state (a readout) get this step's ordinary gradient.

        For a batch, the model's parameters are shared by the examples, so their
        gradient is the sum of every example's part whatever the loss (a mean over
        the batch gives the mean of the per-example online gradients): the
        read-out forms that sum itself, as one product over the batch where the
        algorithm's read-out is an outer product, instead of one gradient per
        example. `jax.vmap(learner.step, in_axes=(None, 0, 0))` over an
        unbatched trace state computes the same values with a read-out per
        example; use it under `jax.vmap(jax.grad(...))` for per-example gradients.

        **Raises:**

        `EtraceError` if the model, the input or the trace state do not match what
        was compiled. With `check_finite` (see `etrace.compile`), a runtime error
        naming the parameter when a trace or a gradient stops being finite.
        """
        y, trace_state, _ = self._run(
            model, trace_state, x, target, modulator=modulator
        )
        return y, trace_state

    def _run(
        self,
        model: Any,
        trace_state: TraceState,
        x: PyTree[ArrayLike],
        target: PyTree[ArrayLike] | None = None,
        options: StepOptions = StepOptions(),
        io: ChunkIO = ChunkIO(),
        modulator: Any = None,
    ) -> tuple[Any, TraceState, dict[str, Any]]:
        """`step` with explicit static `options` and a chunk's `io` (see
        `etrace._step`); also returns what a chunk's step recorded. A batched
        trace state runs the batch under `vmap`, its read-out summed over it."""
        size = batch_size(trace_state)
        if size is None:
            return self._run_one(model, trace_state, x, target, options, io, modulator)
        _check_batch(size, "x", x, self.compiled.step.x_avals)
        if target is not None:
            _check_batch(size, "target", target)
        if modulator is not None:  # a scalar is the same for every example
            modulator = jtu.tree_map(
                lambda m: jnp.broadcast_to(m, (size,)) if jnp.ndim(m) == 0 else m,
                modulator,
            )
            _check_batch(size, "modulator", modulator)
        options = dataclasses.replace(options, summed=True)

        def one(ts, x, target, io, modulator):
            return self._run_one(model, ts, x, target, options, io, modulator)

        axes = (
            0,
            0,
            None if target is None else 0,
            0,
            None if modulator is None else 0,
        )
        return jax.vmap(one, in_axes=axes)(trace_state, x, target, io, modulator)

    def _run_one(self, model, trace_state, x, target, options, io, modulator=None):
        c = self.compiled
        dyn = self._checked_model(model)
        x_leaves = self._checked_input(x)
        state_leaves = self._checked_state(trace_state)
        self._check_traces(trace_state.traces)
        out = run_step(
            c,
            self.algorithm,
            dyn + state_leaves + x_leaves,
            trace_state.traces,
            trace_state.t,
            target,
            options,
            io,
            modulator,
        )
        traces = out.traces
        if self.check_finite:
            traces = {
                k: _finite_trace(v, self._trace_owner(k)) for k, v in traces.items()
            }
        new = TraceState(
            state=jtu.tree_unflatten(c.step.state_def, out.state),
            traces=traces,
            t=trace_state.t + 1,
        )
        return jtu.tree_unflatten(c.step.y_def, out.y), new, out.records

    def _checked_model(self, model: Any) -> list[Any]:
        c = self.compiled
        dyn, treedef, static = split_model(model)
        if self.check_finite:
            dyn = [
                _finite_gradient(leaf, path) if is_p else leaf
                for leaf, path, is_p in zip(dyn, c.layout.paths, c.layout.is_param)
            ]
        if treedef != c.layout.treedef or not _static_equal(static, c.layout.static):
            raise EtraceError(_structure_message(model, c))
        _check_leaves(
            "Model array",
            c.layout.paths,
            c.layout.avals,
            dyn,
            "Pass a model of the same structure, shapes and dtypes as the compiled "
            "one, or compile again.",
        )
        return list(dyn)

    def _checked_input(self, x: Any) -> list[Any]:
        c = self.compiled.step
        x_leaves, x_def = jtu.tree_flatten(x)
        if x_def != c.x_def:
            compiled = jtu.tree_unflatten(c.x_def, list(c.x_avals))
            hint = ""
            if all(not eqx.is_array(v) for v in x_leaves) and c.x_def.num_leaves == 1:
                hint = " Convert it with `jnp.asarray(x)`."
            raise EtraceError(
                f"The input is {_describe(x)}, but the learner was compiled for "
                f"{_describe(compiled)}. Pass inputs shaped like `sample_input`." + hint
            )
        _check_leaves(
            "Input",
            [f"x{jtu.keystr(p)}" for p, _ in jtu.tree_flatten_with_path(x)[0]],
            c.x_avals,
            x_leaves,
            _X_HINT,
        )
        return [jnp.asarray(v) for v in x_leaves]

    def _checked_state(self, trace_state: TraceState) -> list[Any]:
        c = self.compiled.step
        state_leaves, state_def = jtu.tree_flatten(trace_state.state)
        if state_def != c.state_def:
            raise EtraceError(
                "`trace_state.state` does not have the structure of the compiled "
                "model's state. Use the trace state returned by this learner's "
                "`compile`, `init` or `step`."
            )
        _check_leaves(
            "State leaf",
            c.state_names,
            c.state_avals,
            state_leaves,
            "Use the trace state from this learner's `init` (vmap `step` for a batch).",
        )
        return [jnp.asarray(s) for s in state_leaves]

    def after_read_out(self, trace_state: TraceState, grads: Any) -> TraceState:
        """The trace state with its traces' update ordered after the read-out that
        produced `grads`; the values are unchanged.

        Some algorithms read a step's gradient out of the traces as they were
        before the step (D-RTRL on a spiking layer, whose spike then keeps no
        trace). In a loop that carries the trace state from step to step (a
        `lax.scan`, or a jitted training step whose trace state is donated), XLA
        writes the updated traces over the previous ones only when it can tell
        that the read-out has used them first; otherwise it copies every trace at
        every step. Pass each step's trace state through this, with that step's
        gradients, to give XLA the order (`etrace.online_grad` does).

        **Arguments:**

        - `trace_state`: the trace state `step` returned.
        - `grads`: the gradient taken through that step (any pytree holding it).

        **Returns:**

        `trace_state`, its traces read out before their update now computed after
        `grads` (the others as they are: ordering them would make XLA write them
        twice).
        """
        return _ordered(trace_state, self._previous_readers(), grads)

    def _previous_readers(self) -> frozenset[str]:
        """The units whose gradient is read out from the traces before the update
        (`AbstractAlgorithm.reads_previous`)."""
        graph = self.graph
        return frozenset(
            u.name
            for g in graph.groups
            if self.algorithm.reads_previous(graph.subgraph(g))
            for u in graph.units
            if u.group is g
        )

    def _check_traces(self, traces: Any) -> None:
        """The traces have the structure, shapes and dtypes of this learner's
        `init` (per example)."""
        expected = jax.eval_shape(lambda: self.algorithm.init(self.graph))
        if _same_layout(traces, expected):
            return
        name = type(self.algorithm).__name__
        if not isinstance(traces, dict) or set(traces) != set(expected):
            keys = sorted(traces) if isinstance(traces, dict) else traces
            detail = (
                f"it holds traces for {_layout(keys)}, where this learner keeps "
                f"traces for {_layout(sorted(expected))}"
            )
        else:
            key = next(k for k in expected if not _same_layout(traces[k], expected[k]))
            detail = (
                f"the trace `{key}` is {_layout(traces[key])}, where this learner "
                f"keeps {_layout(expected[key])}"
            )
        raise EtraceError(
            f"The traces of `trace_state` do not fit this learner ({name}): "
            f"{detail}. Use the trace state from this learner's `compile`, `init` or "
            "`step` (a trace state of another learner or algorithm does not fit)."
        )

    def _trace_owner(self, key: str) -> str:
        """The parameters a trace belongs to, for error messages."""
        paths = self.compiled.layout.paths
        for u in self.graph.units:
            if u.name == key:
                return ", ".join(f"`{paths[k]}`" for k in u.site.params)
        if key in paths:
            return f"`{key}`"
        return "every parameter that reaches a hidden state"

    # `batch_size` is validated below with an `EtraceError`.
    @typing.no_type_check
    def init(self, batch_size: int | None = None) -> TraceState:
        """A fresh trace state: the initial hidden state and zero traces.

        **Arguments:**

        - `batch_size`: if given, every leaf gets a leading axis of this size, ready
            for `jax.vmap(learner.step, in_axes=(None, 0, 0))`.

        **Returns:**

        A `TraceState` with `t = 0`.
        """
        ts = TraceState(
            state=_clone(self.init_state),
            traces=self.algorithm.init(self.graph),
            t=jnp.zeros((), jnp.int32),
        )
        if batch_size is None:
            return ts
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or (batch_size < 1)
        ):
            raise EtraceError(
                f"`batch_size` must be a positive int or None, got {batch_size!r}."
            )
        return jtu.tree_map(
            lambda a: jnp.broadcast_to(a, (batch_size,) + jnp.shape(a)), ts
        )

    def reset(self, trace_state: TraceState) -> TraceState:
        """Zero traces and step counter, and the initial hidden state, keeping shapes.

        Use it between independent sequences.

        **Arguments:**

        - `trace_state`: a trace state of this learner, batched or not.

        **Returns:**

        A fresh `TraceState` (as from `init`) with the same batch size as
        `trace_state`.
        """
        t = jnp.asarray(trace_state.t)
        if t.ndim == 0:
            return self.init()
        return self.init(batch_size=int(t.shape[0]))

    def trace_of(
        self, trace_state: TraceState, where: Callable[[Any], Any]
    ) -> dict[str, Any]:
        """The traces of one parameter.

        **Arguments:**

        - `trace_state`: a trace state of this learner.
        - `where`: a function selecting the parameter from the model, as for
            `eqx.tree_at`, e.g. `lambda m: m.cell.weight_hh`.

        **Returns:**

        A dictionary from hidden group name to the trace of the unit through which
        the parameter feeds that group (a tuple if several do). The layout is the
        algorithm's; for `D_RTRL` it is a tuple of `K` arrays `(B, Fw, Fx, C)` in
        canonical form, one per state of the group's neurons (`None` for a state
        whose previous value no update reads, such as a spike: its trace is not
        kept), also for a weight with few inputs, whose trace `TraceState.traces`
        stores turned, `(B, C, Fw, Fx)`.

        **Raises:**

        `EtraceError` if `where` does not select a parameter, or the parameter has no
        trace.
        """
        c = self.compiled
        try:
            leaf = where(c.skeleton)
        except Exception as err:
            raise EtraceError(
                f"`where` could not be applied to the model structure: {err!r}. Pass "
                "a function such as `lambda m: m.cell.weight_hh`."
            ) from None
        if not isinstance(leaf, Leaf):
            raise EtraceError(
                "`where` must select one array of the model (e.g. `lambda m: "
                f"m.cell.weight_hh`), but it selected {type(leaf).__name__}."
            )
        path = c.layout.paths[leaf.index]
        out = self.algorithm.trace_of(self.graph, trace_state.traces, path)
        if not out:
            role, why = c.roles[leaf.index]
            raise EtraceError(
                f"Parameter `{path}` has no trace: its role is {role!r} ({why})."
            )
        return out

    def summary(self) -> str:
        """A table of every parameter's role, trace shape and memory, and the groups.

        **Returns:**

        A multi-line string: the hidden groups (`N` neurons, `K` states each, their
        state leaves); for every parameter its path, shape, role (`matrix`,
        `elementwise`, `one-step`, `one-step*` or `none`), trace shape, trace bytes
        per example and the reason for its role; and the total trace memory per
        example.
        """
        c = self.compiled
        lines = [f"etrace.Learner with {type(self.algorithm).__name__}", ""]
        lines.append("Hidden groups:")
        if not self.graph.groups:
            lines.append("  (none: no parameter reaches the hidden state)")
        for g in self.graph.groups:
            lines.append(
                f"  {g.name}: N={g.n} neurons, K={g.k} state(s) "
                f"[{', '.join(g.leaf_names)}]"
            )
        traces = jax.eval_shape(lambda: self.algorithm.init(self.graph))
        lines.append("")
        lines.append("Parameters:")
        rows = [
            self._summary_row(k, path, traces) for k, path in enumerate(c.layout.paths)
        ]
        head = ("parameter", "shape", "role", "trace shape", "bytes/example", "why")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            lines.append(
                "  " + "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()
            )
        lines.append("")
        lines.append(f"Trace memory per example: {_bytes(_nbytes(traces))}")
        return "\n".join(lines)

    def _summary_row(self, k: int, path: str, traces: Any) -> tuple[str, ...]:
        c = self.compiled
        role, why = c.roles[k]
        found = self.algorithm.stored_traces(self.graph, traces, path)
        note = self.algorithm.summary_note(self.graph, path)
        if note:
            why = f"{why}; {note}"
        shapes = [_shapes(jtu.tree_leaves(tree)) for tree in found.values()]
        return (
            path,
            str(tuple(c.layout.avals[k].shape)),
            role,
            ", ".join(shapes) or "-",
            _bytes(_nbytes(found)) if found else "-",
            why,
        )

    def __str__(self) -> str:
        return self.summary()


def _layout(tree: Any) -> str:
    """A trace's structure, shapes and dtypes, written out."""
    if tree is None:
        return "None"
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return _desc(tree)
    if isinstance(tree, (list, tuple)):
        return (
            "("
            + ", ".join(_layout(v) for v in tree)
            + ("," if len(tree) == 1 else "")
            + ")"
        )
    if isinstance(tree, dict):
        return "{" + ", ".join(f"{k!r}: {_layout(v)}" for k, v in tree.items()) + "}"
    return repr(tree)


def _same_layout(a: Any, b: Any) -> bool:
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(
        tuple(jnp.shape(x)) == tuple(y.shape) and jnp.result_type(x) == y.dtype
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def _ordered(ts: TraceState, names: frozenset[str], grads: Any) -> TraceState:
    """`ts` with the traces of the units `names` computed after `grads` (`after`).
    (LIF network, H = 512, D-RTRL in a scan over 100 steps: 1.9 times faster.)"""
    if not names:
        return ts
    traces = {k: after(v, grads) if k in names else v for k, v in ts.traces.items()}
    return eqx.tree_at(lambda s: s.traces, ts, traces)


def _nbytes(tree: Any) -> int:
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jtu.tree_leaves(tree)
    )


def _bytes(count: int) -> str:
    n = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _static_equal(a: Any, b: Any) -> bool:
    try:
        return eqx.tree_equal(a, b) is True
    except Exception:
        return False


def _structure_message(model: Any, c: Compiled) -> str:
    dynamic, _ = eqx.partition(model, eqx.is_array)
    paths = [keystr(p) for p, _ in jtu.tree_flatten_with_path(dynamic)[0]]
    detail = ""
    for a, b in zip(paths, c.layout.paths):
        if a != b:
            detail = f" The first difference is at `{b}` (got `{a}`)."
            break
    else:
        if len(paths) != len(c.layout.paths):
            detail = f" It has {len(paths)} arrays instead of {len(c.layout.paths)}."
        else:
            dyn, _, _ = split_model(model)
            for path, want, got in zip(paths, c.layout.avals, dyn):
                if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
                    detail = (
                        f" The first difference is at `{path}`: "
                        f"{_desc(got)} instead of {_desc(want)}."
                    )
                    break
            else:
                detail = " Its non-array fields (sizes, activation functions) differ."
    return (
        "The model passed to `step` has a different structure from the compiled "
        f"one.{detail} Pass a model of the same structure (updated parameters are "
        "fine), or compile the new model with `etrace.compile`."
    )


# Its arguments are validated with an `EtraceError` that says what to pass, rather
# than by a runtime type checker.
@typing.no_type_check
def compile(
    model: Callable[[PyTree[ArrayLike], PyTree[ArrayLike]], tuple[Any, Any]],
    sample_input: PyTree[ArrayLike],
    *,
    algorithm: AbstractAlgorithm | None = None,
    state: PyTree[ArrayLike] | None = None,
    check_finite: bool = False,
) -> tuple[Learner, TraceState]:
    """Analyses a model's step once and returns a learner and zero traces.

    **Arguments:**

    - `model`: any callable pytree (usually an `eqx.Module`) called as
        `model(x, state) -> (y, new_state)`. Stock Equinox layers work unchanged.
    - `sample_input`: one unbatched time step (any pytree of arrays).
    - `algorithm`: the online algorithm; defaults to `etrace.D_RTRL()`.
    - `state`: the initial hidden state. Defaults to `eqx.nn.State(model)`; required
        for a model built with `eqx.nn.make_with_state`, or when the state is a plain
        pytree.
    - `check_finite`: a numerical guard. If `True`, every `step` checks that each
        trace and each parameter's gradient is finite (with `eqx.error_if`, so it
        works under `jit`), and fails with an error naming the parameter when one is
        not. Off by default: it costs one reduction per trace and gradient.

    **Returns:**

    `(learner, trace_state)`: the `Learner` and its initial `TraceState`.

    **Raises:**

    `EtraceError` if the model cannot be learned online as written (the message names
    the primitive or state at fault and what to do).

    !!! Example

        ```python
        learner, trace_state = etrace.compile(model, x0, state=state)
        y, trace_state = learner.step(model, trace_state, x)
        ```
    """
    if algorithm is None:
        algorithm = D_RTRL()
    if not isinstance(algorithm, AbstractAlgorithm):
        raise EtraceError(
            "`algorithm` must be an `etrace.AbstractAlgorithm` such as "
            f"`etrace.D_RTRL()`, got {type(algorithm).__name__}. If it is a class, "
            "instantiate it."
        )
    if not isinstance(check_finite, bool):
        raise EtraceError(
            f"`check_finite` must be True or False, got {check_finite!r}."
        )
    state = initial_state(model, state)
    compiled = analyse(model, sample_input, state)
    if algorithm.routing == "group":
        check_holomorphic(compiled, type(algorithm).__name__)
        warn_one_step(compiled)
    learner = Learner(algorithm, compiled, _clone(state), bool(check_finite))
    return learner, learner.init()


_NON_FINITE = """\
{what} of {owner} is not finite (inf or NaN) at this step. Typical causes: a
learning rate or input scale that makes the weights diverge, or traces that grow
without bound (a recurrence with |D| > 1). Lower the learning rate, clip the
gradients (`optax.clip_by_global_norm`), or clip the traces by wrapping the
algorithm (see `examples/custom_algorithm.py`)."""


def _finite_trace(trace: Any, owner: str) -> Any:
    bad = jnp.array(False)
    for leaf in jtu.tree_leaves(trace):
        bad = bad | ~jnp.all(jnp.isfinite(leaf))
    message = _NON_FINITE.format(what="The trace", owner=owner)
    return jtu.tree_map(lambda leaf: eqx.error_if(leaf, bad, message), trace)


def _finite_gradient(leaf: Any, path: str) -> Any:
    """An identity whose backward pass checks the parameter's gradient."""
    message = _NON_FINITE.format(what="The gradient", owner=f"parameter `{path}`")

    @jax.custom_vjp
    def identity(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        return (eqx.error_if(g, ~jnp.all(jnp.isfinite(g)), message),)

    identity.defvjp(fwd, bwd)
    return identity(leaf)


def _shapes(leaves: list[Any]) -> str:
    """`"(1, 3, 1, 2)/(1, 3, 1)"`; `"2 x (1, 3, 1, 2)"` for repeated shapes."""
    shapes = [str(tuple(x.shape)) for x in leaves]
    if len(shapes) > 1 and len(set(shapes)) == 1:
        return f"{len(shapes)} x {shapes[0]}"
    return "/".join(shapes)
