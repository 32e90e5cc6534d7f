"""Data-parallel placement of batched trace states and data."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._errors import EtraceError


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
