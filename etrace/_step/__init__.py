"""Evaluating one step of an analysed model: values, Jacobians, traces and hooks.

`run_step` dispatches on the algorithm's declared `routing`: per hidden group
(`group.GroupStep`) or over the whole hidden state (`joint.JointStep`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._analysis import Compiled
from .._errors import EtraceError
from .group import GroupStep
from .jacobians import Jacobians as Jacobians
from .joint import JointStep
from .options import Chunk as Chunk, ChunkIO as ChunkIO, StepOptions as StepOptions


class StepOut(NamedTuple):
    """Output leaves, new state leaves, new traces, and what a chunk's step
    recorded (empty otherwise)."""

    y: list[Any]
    state: list[Any]
    traces: dict[str, Any]
    records: dict[str, Any]


_NEEDS_TARGET = (
    "{name} projects the target into its learning signal: pass it to the step, "
    "`learner.step(model, trace_state, x, target)` (`etrace.online_grad` does this "
    "for you)."
)


_NEEDS_MODULATOR = (
    "{name} takes its learning signal from a modulator (a reward prediction error, "
    "a neuromodulator) instead of the loss: pass it to the step, "
    "`learner.step(model, trace_state, x, modulator=m)`, or to "
    "`etrace.online_grad(..., modulators=ms)`."
)
_NO_MODULATOR = (
    "{name} takes its learning signal from the loss, not from a modulator: leave "
    "`modulator` out, or use an algorithm whose learning signal is a modulator "
    "(`etrace.ThreeFactor()`)."
)


def run_step(
    compiled: Compiled,
    algorithm: Any,
    inputs: list[Any],
    traces: dict[str, Any],
    t: Any,
    target: Any = None,
    options: StepOptions = StepOptions(),
    io: ChunkIO = ChunkIO(),
    modulator: Any = None,
) -> StepOut:
    """Evaluates one step of one example; `inputs` are the model's array leaves,
    then the state leaves, then the input leaves."""
    name = type(algorithm).__name__
    signal = algorithm.learning_signal
    if signal == "modulator" and modulator is None and compiled.graph.groups:
        raise EtraceError(_NEEDS_MODULATOR.format(name=name))
    if signal != "modulator" and modulator is not None:
        raise EtraceError(_NO_MODULATOR.format(name=name))
    if algorithm.routing == "joint":
        joint = JointStep(compiled, algorithm, inputs, traces, t, options)
        return StepOut(*joint.run())
    if signal == "target_feedback" and target is None:
        raise EtraceError(_NEEDS_TARGET.format(name=name))
    inputs = _checked_masks(compiled, inputs)
    step = GroupStep(
        compiled, algorithm, inputs, traces, t, target, options, io, modulator
    )
    return StepOut(*step.run())


def _is_concrete(a: Any) -> bool:
    try:
        bool(a)
    except jax.errors.ConcretizationTypeError:
        return False
    return True


def _checked_masks(compiled: Compiled, inputs: list[Any]) -> list[Any]:
    """Refuses a mask that gained non-zeros since `compile`: traces are only kept
    where the compiled mask was non-zero."""
    if not compiled.sites.mask_leaves:
        return inputs
    inputs = list(inputs)
    for k, nonzero in compiled.sites.mask_leaves:
        leaf = inputs[k]
        grown = jnp.any((leaf != 0) & ~jnp.asarray(nonzero))
        message = (
            f"The mask `{compiled.layout.paths[k]}` is non-zero where it was zero "
            "when the model was compiled; traces exist only where it was non-zero "
            "then. Call `etrace.compile` again after changing a mask (removing "
            "entries is fine)."
        )
        if not isinstance(grown, jax.Array) or _is_concrete(grown):
            if bool(grown):
                raise EtraceError(message)
        else:
            inputs[k] = eqx.error_if(leaf, grown, message)
    return inputs
