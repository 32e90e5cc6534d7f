"""Tracing one step of the model, `(params, state, x) -> (y, state')`, to a flat
program (`etrace._ir`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _ir
from .._errors import describe, EtraceError
from .model import model_layout, ModelLayout, split_model, state_names


class TracedStep(NamedTuple):
    """One step of the model as a flat program, and how its inputs and outputs
    are laid out. The program's inputs are the model's arrays, then the state
    leaves, then the input leaves; its outputs the output leaves, then the new
    state leaves."""

    program: _ir.Program
    layout: ModelLayout
    state_def: Any
    state_avals: tuple[jax.ShapeDtypeStruct, ...]
    state_names: tuple[str, ...]
    x_def: Any
    x_avals: tuple[jax.ShapeDtypeStruct, ...]
    y_def: Any

    @property
    def n_y(self) -> int:
        """The number of output leaves."""
        return self.y_def.num_leaves

    @property
    def n_dyn(self) -> int:
        """The number of model arrays."""
        return len(self.layout.paths)

    @property
    def state_vars(self) -> list[int]:
        """The program's variables of the previous state leaves."""
        n = self.n_dyn
        return self.program.invars[n : n + len(self.state_avals)]

    @property
    def new_state(self) -> list[_ir.Operand]:
        """The program's outputs that are the new state leaves."""
        return self.program.outvars[self.n_y :]


_CONVENTION = """\
Running one step of the model to trace it failed with {err}
etrace calls the model as `model(x, state) -> (y, new_state)`, with `x` one time
step without a batch axis, shaped like `sample_input` (here {x}), and `state` the
hidden state passed to `etrace.compile` (here {state}). Check that the model takes
these two arguments in this order, and pass a single unbatched time step as
`sample_input` (batches come later, from `learner.init(batch_size=...)`)."""


def _desc(a: Any) -> str:
    return f"{jnp.dtype(a.dtype).name}{list(a.shape)}"


def _arrays(what: str, tree: Any) -> tuple[list[Any], Any]:
    leaves, treedef = jtu.tree_flatten(tree)
    for leaf in leaves:
        if not eqx.is_array(leaf):
            raise EtraceError(
                f"Every leaf of `{what}` must be a JAX or NumPy array, got "
                f"{type(leaf).__name__} ({leaf!r}) in `{what}`, which is "
                f"{describe(tree)}. Convert it with `jnp.asarray`."
            )
    return [jnp.asarray(x) for x in leaves], treedef


def _avals(leaves: list[Any]) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)


def _check_new_state(new_state, state_def, names, state_avals) -> list[Any]:
    new_leaves, new_def = jtu.tree_flatten(new_state)
    if new_def != state_def:
        raise EtraceError(
            "The model returned a new state whose structure differs from the "
            f"state it was given: {new_def} instead of {state_def}. Return the "
            "same structure (e.g. `state.set(index, value)` on the state passed "
            "in)."
        )
    for name, old, new in zip(names, state_avals, new_leaves):
        if old.shape != jnp.shape(new) or old.dtype != jnp.result_type(new):
            raise EtraceError(
                f"State leaf `{name}` changes from {_desc(old)} to "
                f"{_desc(jnp.asarray(new))} in one step. Keep each state "
                "leaf's shape and dtype fixed (initialise it with the dtype the "
                "update produces)."
            )
    return list(new_leaves)


def trace(model: Any, sample_input: Any, state: Any) -> TracedStep:
    """Traces one step of the model to a flat program."""
    layout = model_layout(model)
    dyn_leaves, _, _ = split_model(model)
    # Flattening copies the leaves: the caller's `eqx.nn.State` stays valid.
    state_leaves, state_def = _arrays("state", state)
    x_leaves, x_def = _arrays("sample_input", sample_input)
    state_avals = _avals(state_leaves)
    names = tuple(state_names(model, state))
    y_def_box: list[Any] = []

    def step(dyn, st, xs):
        m = eqx.combine(jtu.tree_unflatten(layout.treedef, dyn), layout.static)
        out = m(jtu.tree_unflatten(x_def, xs), jtu.tree_unflatten(state_def, st))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise EtraceError(
                "The model must return a pair `(y, new_state)`, got "
                f"{type(out).__name__}. Write `__call__(self, x, state)` to return "
                "the output and the updated state."
            )
        y, new_state = out
        new_leaves = _check_new_state(new_state, state_def, names, state_avals)
        y_leaves, y_def = jtu.tree_flatten(y)
        y_def_box.append(y_def)
        return list(y_leaves) + new_leaves

    try:
        closed = jax.make_jaxpr(step)(list(dyn_leaves), state_leaves, x_leaves)
    except EtraceError:
        raise
    except (TypeError, ValueError, IndexError) as err:
        raise EtraceError(
            _CONVENTION.format(
                err=f"{type(err).__name__}: {err}",
                x=describe(sample_input),
                state=describe(state),
            )
        ) from err
    return TracedStep(
        program=_ir.from_closed_jaxpr(closed),
        layout=layout,
        state_def=state_def,
        state_avals=state_avals,
        state_names=names,
        x_def=x_def,
        x_avals=_avals(x_leaves),
        y_def=y_def_box[0],
    )
