"""The model's layout: which of its leaves are arrays, which are parameters, and
the names of its state leaves."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._errors import EtraceError


_MISSING_STATE = """\
`etrace.compile` needs the model's initial hidden state, but `eqx.nn.State(model)`
failed: {err}
A model built with `eqx.nn.make_with_state` has had its initial state values removed
from the model. Pass the state it returned: `etrace.compile(model, x0, state=state)`."""


def is_state_index(x: Any) -> bool:
    return isinstance(x, eqx.nn.StateIndex)


def keystr(path: Any) -> str:
    """A key path as a readable parameter path: `cell.weight_ih`."""
    s = jtu.keystr(path)
    return s[1:] if s.startswith(".") else s


@dataclasses.dataclass(frozen=True, eq=False)
class ModelLayout:
    """How a model is split into dynamic leaves (arrays) and the rest.

    `paths`, `is_param` and `avals` describe the arrays in flattening order;
    `StateIndex` initial values are arrays but never parameters.
    """

    treedef: Any
    static: Any
    paths: tuple[str, ...]
    is_param: tuple[bool, ...]
    avals: tuple[jax.ShapeDtypeStruct, ...]


def split_model(model: Any) -> tuple[list[Any], Any, Any]:
    """`(array leaves, their treedef, the non-array rest)` of a model."""
    dynamic, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jtu.tree_flatten(dynamic)
    return leaves, treedef, static


def model_layout(model: Any) -> ModelLayout:
    init_ids = {
        id(a)
        for si in jtu.tree_leaves(model, is_leaf=is_state_index)
        if is_state_index(si)
        for a in jtu.tree_leaves(si.init)
    }
    dynamic, static = eqx.partition(model, eqx.is_array)
    with_path, treedef = jtu.tree_flatten_with_path(dynamic)
    paths = tuple(keystr(p) for p, _ in with_path)
    is_param = tuple(
        bool(eqx.is_inexact_array(x)) and id(x) not in init_ids for _, x in with_path
    )
    avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for _, x in with_path)
    return ModelLayout(treedef, static, paths, is_param, avals)


def state_names(model: Any, state: Any) -> list[str]:
    """Readable names of the state leaves: model paths for `eqx.nn.State`."""
    if isinstance(state, eqx.nn.State):
        where = {}
        for path, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_state_index)[0]:
            if is_state_index(leaf):
                where[leaf.marker] = keystr(path)
        names = []
        for marker, value in state._state.items():  # pyright: ignore
            base = where.get(marker, str(marker))
            for path, _ in jtu.tree_flatten_with_path(value)[0]:
                names.append(base + jtu.keystr(path))
        return names
    return ["state" + jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(state)[0]]


def initial_state(model: Any, state: Any) -> Any:
    """`state`, or the model's own initial state (`eqx.nn.State(model)`)."""
    if state is not None:
        return state
    try:
        return eqx.nn.State(model)
    except ValueError as err:
        raise EtraceError(_MISSING_STATE.format(err=err)) from None


@dataclasses.dataclass(frozen=True)
class Leaf:
    """Stands in for a model array in the skeleton used by `Learner.trace_of`."""

    index: int


def skeleton(layout: ModelLayout) -> Any:
    """The model with each array replaced by its `Leaf`."""
    leaves = [Leaf(i) for i in range(len(layout.paths))]
    return eqx.combine(jtu.tree_unflatten(layout.treedef, leaves), layout.static)
