"""Data-parallel placement of batched trace states and data."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._errors import EtraceError
from ._learner import batch_size, Learner, TraceState


def shard_batch(
    tree: Any, mesh: Mesh, *, axis: int = 0, axis_name: str | None = None
) -> Any:
    """Places every array of `tree` on `mesh`, split along its batch axis.

    Data-parallel online training shards the batch axis of the `TraceState` (from
    `learner.init(batch_size=...)`, batch on axis 0) and of the data (`online_grad`
    takes `xs` and `targets` with time on axis 0 and batch on axis 1, hence
    `axis=1`); parameters stay replicated (`jax.device_put(model,
    NamedSharding(mesh, PartitionSpec()))`). Under `jax.jit`, XLA then runs each
    device's share of the batch where it lives and reduces the gradients across
    devices; nothing else changes in the training step.

    **Arguments:**

    - `tree`: a pytree of arrays (a `TraceState`, a batch of sequences). Non-array
        leaves are left as they are.
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis`: the batch axis of every array in `tree`.
    - `axis_name`: the mesh axis to split the batch over; may be omitted when the
        mesh has one axis.

    **Returns:**

    `tree` with every array placed with `NamedSharding(mesh, PartitionSpec(...))`.

    **Raises:**

    `EtraceError` if an array has no axis `axis`, or its size there is not a multiple
    of the number of devices along `axis_name`.

    !!! Example

        ```python
        mesh = jax.make_mesh(
            (jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,)
        )
        trace_state = etrace.shard_batch(learner.init(batch_size=64), mesh)
        xs, ys = etrace.shard_batch((xs, ys), mesh, axis=1)
        model = jax.device_put(model, NamedSharding(mesh, PartitionSpec()))
        ```
    """
    if not isinstance(mesh, Mesh):
        raise EtraceError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}. Build "
            'one with `jax.make_mesh((jax.device_count(),), ("batch",))`.'
        )
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise EtraceError(
                f"The mesh has axes {mesh.axis_names}: pass `axis_name=` to say which "
                "one the batch is split over."
            )
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise EtraceError(
            f"`axis_name={axis_name!r}` is not an axis of the mesh {mesh.axis_names}."
        )
    devices = mesh.shape[axis_name]

    def place(path, leaf):
        if not eqx.is_array(leaf):
            return leaf
        where = f"Leaf `{jtu.keystr(path)}`" if path else "The array"
        if leaf.ndim <= axis:
            raise EtraceError(
                f"{where} has shape {tuple(leaf.shape)}, with no batch axis {axis}. "
                "Shard a batched tree (`learner.init(batch_size=...)`; data with the "
                "batch on axis 1, `axis=1`)."
            )
        if leaf.shape[axis] % devices:
            raise EtraceError(
                f"{where} has batch size {leaf.shape[axis]} on axis {axis}, not a "
                f"multiple of the {devices} devices of mesh axis {axis_name!r}. Use "
                "a batch size divisible by the number of devices."
            )
        spec = PartitionSpec(*([None] * axis), axis_name)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jtu.tree_map_with_path(place, tree)


# --------------------------------------------------------------------------------
# Model parallelism: traces, hidden state and traced weight rows split along
# neurons.

_JOINT = (
    "{name} keeps whole-state traces (a Jacobian of every hidden value with respect "
    "to every parameter), which mix all neurons: they cannot be split along "
    "neurons. Shard the batch instead (`etrace.shard_batch`), or use an algorithm "
    "whose traces are per neuron (`etrace.D_RTRL`, `etrace.ES_D_RTRL`, "
    "`etrace.EProp`, ...)."
)

_INDIVISIBLE = (
    "Hidden group `{name}` has {size} neurons, not a multiple of the {devices} "
    "devices of mesh axis {axis!r}. Use a hidden size divisible by {devices}, or a "
    "mesh whose {axis!r} axis has a size that divides it."
)


def _check_axis(mesh: Any, name: Any, argument: str) -> int:
    """The size of mesh axis `name` (the argument `argument`)."""
    if not isinstance(mesh, Mesh):
        raise EtraceError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}. Build "
            'one with `jax.make_mesh((2, 2), ("data", "model"))`.'
        )
    if name not in mesh.axis_names:
        raise EtraceError(
            f"`{argument}={name!r}` is not an axis of the mesh, whose axes are "
            f"{mesh.axis_names}. Pass one of those names."
        )
    return mesh.shape[name]


def _check_routing(learner: Learner) -> None:
    algorithm = learner.algorithm
    if algorithm.routing == "joint":
        raise EtraceError(_JOINT.format(name=type(algorithm).__name__))


def _trace_axis(unit: Any, shape: tuple[int, ...]) -> int | None:
    """The axis of one example's trace array (of `unit`) that runs along the
    neurons, from the canonical layouts: `(B, Fw, Fx, C)` (dense), `(B, Fw, Fx, K)`
    (per output and state), `(B, C, Fw, Fx)` (turned); `None` for any other array
    (an input trace `(B, Fx, C)`, a masked trace `(nnz, Fx)`), kept whole on every
    device. Any placement computes the same values; this one keeps the traces'
    update on the device that holds them."""
    b, w, f, c = unit.shape
    if shape in ((b, w, f, c), (b, w, f, unit.k)):
        return 1
    if shape == (b, c, w, f):
        return 2
    return None


def neuron_axes(learner: Learner) -> tuple[list[int | None], Any]:
    """Per example, the neuron axis of every state leaf (flattened order) and of
    every trace array (a pytree shaped like the traces), or `None` where the array
    has none."""
    _check_routing(learner)
    graph = learner.graph
    state = [None] * len(learner.compiled.step.state_avals)
    for group in graph.groups:
        for leaf in group.leaves:
            state[leaf] = 0
    units = {u.name: u for u in graph.units}
    traces = jax.eval_shape(lambda: learner.algorithm.init(graph))

    def axis(path, leaf):
        key = path[0].key if path and isinstance(path[0], jtu.DictKey) else None
        unit = units.get(key)
        return None if unit is None else _trace_axis(unit, tuple(leaf.shape))

    return state, jtu.tree_map_with_path(axis, traces)


_NOT_THIS_LEARNERS = (
    "Pass the trace state of this learner (`learner.init(...)`, or one `step` or "
    "`online_grad` returned); a trace state of another model or algorithm does "
    "not fit."
)


def _check_layout(trace_state: Any, learner: Learner, size: int | None) -> None:
    """`trace_state` has the structure and shapes of `learner.init(size)`."""
    expected = jax.eval_shape(lambda: learner.init(batch_size=size))
    name = type(learner.algorithm).__name__
    if jtu.tree_structure(trace_state) != jtu.tree_structure(expected):
        raise EtraceError(
            f"`trace_state` does not have the structure of this learner's ({name}) "
            f"trace state. {_NOT_THIS_LEARNERS}"
        )
    names = [f"state leaf `{n}`" for n in learner.compiled.step.state_names]
    for path, _ in jtu.tree_flatten_with_path(trace_state.traces)[0]:
        names.append(f"leaf `trace_state.traces{jtu.keystr(path)}`")
    names.append("leaf `trace_state.t`")
    for what, got, want in zip(
        names, jtu.tree_leaves(trace_state), jtu.tree_leaves(expected)
    ):
        if tuple(jnp.shape(got)) != tuple(want.shape):
            raise EtraceError(
                f"The {what} has shape {tuple(jnp.shape(got))}, where this learner "
                f"({name}) keeps {tuple(want.shape)}. {_NOT_THIS_LEARNERS}"
            )


def shard_traces(
    trace_state: TraceState,
    learner: Learner,
    mesh: Mesh,
    *,
    neuron_axis: str,
    batch_axis: str | None = None,
) -> TraceState:
    """Places a trace state on `mesh`, split along neurons (and the batch).

    Every trace of the diagonal family is neuron-local: row `m` of a weight's trace
    is updated from its neuron's `D`, `Df` and the shared input alone. Split along
    the neurons over a mesh axis, with the traced weights' output rows split the
    same way (`etrace.shard_params`), the trace update needs no communication:
    under `jax.jit` each device updates and reads out the rows it holds, and only
    per-neuron values (hidden state, learning signal, a weight op's input) cross
    devices.

    The learner knows the neuron axis of every array: each hidden state leaf of a
    hidden group is split along its first axis; each trace array laid out along a
    unit's outputs (`(B, Fw, Fx, C)`, `(B, Fw, Fx, K)`, or turned `(B, C, Fw, Fx)`)
    along `Fw`; arrays without a neuron axis (ES-D-RTRL's input traces, OTTT's
    presynaptic traces, a masked weight's traces kept at its non-zeros, the step
    counter, state outside the hidden groups) are kept whole on every device of
    `neuron_axis`. With `batch_axis`, a batched trace state
    (`learner.init(batch_size=B)`) is also split along its batch axis.

    **Arguments:**

    - `trace_state`: a `TraceState` of `learner` (batched or not).
    - `learner`: the `Learner` it belongs to.
    - `mesh`: a `jax.sharding.Mesh`.
    - `neuron_axis`: the mesh axis to split the neurons over.
    - `batch_axis`: the mesh axis to split the batch over, or `None`.

    **Returns:**

    `trace_state` with every array placed with a `NamedSharding` on `mesh`.

    **Raises:**

    `EtraceError` for a mesh axis the mesh does not have, a hidden group or trace
    whose neuron count is not a multiple of the devices along `neuron_axis` (or a
    batch along `batch_axis`), a trace state that is not `learner`'s, and an
    algorithm whose traces mix neurons (`RTRL`, `SnAp`, `UORO`: shard the batch
    with `etrace.shard_batch`).

    !!! Example

        ```python
        mesh = jax.make_mesh((2, 2), ("data", "model"))
        model = etrace.shard_params(model, learner, mesh, neuron_axis="model")
        trace_state = etrace.shard_traces(
            learner.init(batch_size=8), learner, mesh,
            neuron_axis="model", batch_axis="data",
        )
        xs, ys = etrace.shard_batch((xs, ys), mesh, axis=1, axis_name="data")
        ```
    """
    devices = _check_axis(mesh, neuron_axis, "neuron_axis")
    if batch_axis is not None:
        _check_axis(mesh, batch_axis, "batch_axis")
        if batch_axis == neuron_axis:
            raise EtraceError(
                f"`batch_axis` and `neuron_axis` are both {batch_axis!r}: split the "
                "batch and the neurons over two different mesh axes."
            )
    size = batch_size(trace_state)
    if size is None and batch_axis is not None:
        raise EtraceError(
            f"`batch_axis={batch_axis!r}` was given, but the trace state has no "
            "batch axis. Pass `learner.init(batch_size=B)`, or leave `batch_axis` out."
        )
    _check_layout(trace_state, learner, size)
    _check_groups(learner, devices, neuron_axis)
    state_axes, trace_axes = neuron_axes(learner)
    lead = 0 if size is None else 1
    batch = (batch_axis, mesh.shape[batch_axis]) if batch_axis else None
    state_leaves, state_def = jtu.tree_flatten(trace_state.state)
    state = [
        _place(leaf, mesh, axis, lead, neuron_axis, batch)
        for leaf, axis in zip(state_leaves, state_axes)
    ]
    traces = jtu.tree_map(
        lambda leaf, axis: _place(leaf, mesh, axis, lead, neuron_axis, batch),
        trace_state.traces,
        trace_axes,
        is_leaf=lambda x: x is None,
    )
    t = _place(trace_state.t, mesh, None, lead, neuron_axis, batch)
    return TraceState(jtu.tree_unflatten(state_def, state), traces, t)


def _check_groups(learner: Learner, devices: int, axis: str) -> None:
    """Every hidden group's neurons split evenly over `devices`."""
    for group in learner.graph.groups:
        if group.n % devices:
            raise EtraceError(
                _INDIVISIBLE.format(
                    name=group.name, size=group.n, devices=devices, axis=axis
                )
            )


def _place(leaf, mesh, axis, lead, neuron_axis, batch):
    """`leaf` placed with its neuron axis `axis` (per example, `None`: kept whole)
    split over `neuron_axis`, and its batch axis 0 (when `lead`) over `batch`."""
    if leaf is None or not eqx.is_array(leaf):
        return leaf
    spec: list[Any] = [None] * leaf.ndim
    if batch is not None:
        name_, devices = batch
        if leaf.shape[0] % devices:
            raise EtraceError(
                f"The trace state has batch size {leaf.shape[0]}, not a multiple of "
                f"the {devices} devices of mesh axis {name_!r}. Use a batch size "
                "divisible by the number of devices."
            )
        spec[0] = name_
    # A neuron axis that does not split evenly although its group's neurons do
    # (a weight whose outputs are grouped in fewer blocks than devices) is kept
    # whole: correct, only not split.
    if axis is not None and leaf.shape[lead + axis] % mesh.shape[neuron_axis] == 0:
        spec[lead + axis] = neuron_axis
    return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(*spec)))


def _weight_row_axis(site: Any, shape: tuple[int, ...], devices: int) -> int | None:
    """The axis of a parameter of `shape` holding the output rows of `site`'s
    weight, where the parameter is that weight (same shape) and the rows' leading
    dimension splits evenly; else `None`."""
    if tuple(shape) != tuple(site.w_shape):
        return None
    # `w_perm` orders the weight's dimensions as `(B, Fw, C)`: skip those of `B`,
    # then look among those of `Fw` only.
    order, i = site.w_perm, 0
    for size in (site.b, site.fw):
        first, product = i, 1
        while i < len(order) and product < size:
            product *= site.w_shape[order[i]]
            i += 1
    for d in order[first:i]:
        if site.w_shape[d] > 1:
            return d if site.w_shape[d] % devices == 0 else None
    return None


def param_axes(learner: Learner, devices: int) -> list[int | None]:
    """Per model array (flattened order), the axis split along neurons: the output
    rows of a traced weight, where every unit it feeds agrees on it."""
    _check_routing(learner)
    layout = learner.compiled.layout
    out: list[int | None] = []
    for path, aval in zip(layout.paths, layout.avals):
        axes = {
            _weight_row_axis(u.site, aval.shape, devices)
            for u in learner.graph.units_of(path)
        }
        out.append(axes.pop() if len(axes) == 1 else None)
    return out


def shard_params(model: Any, learner: Learner, mesh: Mesh, *, neuron_axis: str) -> Any:
    """Places a model on `mesh` with its traced weights' output rows split along
    neurons, everything else replicated.

    The companion of `etrace.shard_traces`: a weight op `y = W x` whose trace is
    split along its outputs gets the rows of `W` split the same way, so that each
    device forms its outputs and their traces from the rows it holds. A parameter
    is split along the dimension of its weight's outputs (`Fw` in `learner.summary`
    terms; a bias or a learnable decay along its only axis) where it is the weight
    of every unit it feeds, as stored (the same shape, up to element-wise
    functions); a parameter used transposed or reshaped, one-step parameters (a
    readout) and other arrays are replicated.

    The rows are split in the order the model stores them, into contiguous blocks.
    Where a weight's outputs are the neurons in order (a dense or convolutional
    layer feeding a hidden group), each block holds whole neurons. Where they
    repeat the neurons (a GRU's `3H` rows: the reset, update and candidate gates,
    each over all `H` neurons), a block holds a slice of one or two gates instead;
    the traces are split in the same blocks, so their update is still local, and
    only the gate values (per neuron, not per weight) move between devices.

    **Arguments:**

    - `model`: the model (of the structure `learner` was compiled for).
    - `learner`: its `Learner`.
    - `mesh`: a `jax.sharding.Mesh`.
    - `neuron_axis`: the mesh axis to split along, as for `shard_traces`.

    **Returns:**

    `model` with every array placed with a `NamedSharding` on `mesh`.

    **Raises:**

    `EtraceError` for a mesh axis the mesh does not have, a hidden group whose
    neuron count is not a multiple of the devices along `neuron_axis`, a model
    that does not fit `learner`, and an algorithm whose traces mix neurons.
    """
    devices = _check_axis(mesh, neuron_axis, "neuron_axis")
    _check_groups(learner, devices, neuron_axis)
    layout = learner.compiled.layout
    dynamic, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    if treedef != layout.treedef or any(
        tuple(leaf.shape) != tuple(aval.shape)
        for leaf, aval in zip(leaves, layout.avals)
    ):
        raise EtraceError(
            "`model` does not have the structure and shapes of the model this "
            "learner was compiled for. Pass that model (or one `eqx.apply_updates` "
            "made from it)."
        )
    placed = []
    for leaf, axis in zip(leaves, param_axes(learner, devices)):
        spec: list[Any] = [None] * leaf.ndim
        if axis is not None:
            spec[axis] = neuron_axis
        placed.append(jax.device_put(leaf, NamedSharding(mesh, PartitionSpec(*spec))))
    return eqx.combine(jtu.tree_unflatten(treedef, placed), static)
