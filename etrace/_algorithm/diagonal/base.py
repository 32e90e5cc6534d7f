"""`AbstractDiagonalAlgorithm`: the algorithms whose per-unit trace is D-RTRL's."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtyping import Array, Inexact

from ..._errors import EtraceError
from ..._graph import Graph, Unit
from ..._kernels import turns
from ..base import AbstractUnitAlgorithm, overrides
from . import chunk, masked
from .dense import (
    diagonal_init,
    diagonal_readout,
    diagonal_update,
    previous_factors,
    previous_readout,
    summed_diagonal_readout,
    transient_states,
)
from .turned import canonical, is_turned, stored_turned


_MISSING_READ = (
    "The update of `{site}`'s trace for {k} reads the trace of {j}, which is "
    "`None`: these traces come from another algorithm's `init` (D-RTRL keeps none "
    "for a state that no update reads). Start from this learner's `learner.init()`."
)

_MISSING_KEPT = (
    "The read-out of `{site}` from the updated traces needs the trace of {names}, "
    "which D-RTRL does not keep (no update reads that state's previous value, and "
    "its own read-out uses the traces before the update). A wrapper that reads out "
    "from the updated traces should subclass `etrace.AbstractWrappedAlgorithm`, "
    "whose `init` keeps them."
)

# The methods whose shipped versions the shortcuts (the read-out from the
# previous traces, turned and dropped traces, chunks) reproduce.
METHODS = (
    "update",
    "update_unit",
    "gradients",
    "gradient_unit",
    "summed_gradients",
    "summed_gradient_unit",
)


def _check_readable(unit: Unit, trace, group) -> None:
    """Every trace the update reads is there (`None` only where no state's update
    reads it): traces from another algorithm's `init` may lack one."""
    names = unit.group.leaf_names
    for k, eps in enumerate(trace):
        for j, other in enumerate(trace):
            if eps is None or other is not None:
                continue
            if group is None or group.couples(k, j):
                raise EtraceError(
                    _MISSING_READ.format(site=unit.site.name, k=names[k], j=names[j])
                )


def _check_kept(unit: Unit, trace) -> None:
    """The read-out from the updated traces needs every state's trace."""
    missing = [k for k, eps in enumerate(trace) if eps is None]
    if missing:
        names = ", ".join(unit.group.leaf_names[k] for k in missing)
        raise EtraceError(_MISSING_KEPT.format(site=unit.site.name, names=names))


class AbstractDiagonalAlgorithm(AbstractUnitAlgorithm):
    """An algorithm whose per-unit trace is D-RTRL's (`D_RTRL`, the OSTL variants,
    `OSTTP`): they differ in the Jacobian the trace recurs with or in the learning
    signal, not in the trace.

    Its trace is stored dense (`dense`), turned for a weight with few inputs
    (`turned`), or at a masked weight's non-zeros (`masked`); a spiking group's
    gradient is read out from the traces before the update, with no trace kept for
    the spike; and `online_grad` can advance it in chunks (`chunk`). All of these
    shortcuts hold for the shipped recurrence and read-out only: a subclass that
    replaces one of their methods gets plain dense traces read out after its own
    update."""

    def _shipped(self, *more: str) -> bool:
        return not overrides(self, AbstractDiagonalAlgorithm, *METHODS, *more)

    def stores_sparse(self, unit: Unit) -> bool:
        """Whether `unit`'s trace is kept at its weight's non-zeros only: for a
        weight with structural zeros (a constant mask), unless disabled."""
        return unit.site.pattern is not None and getattr(self, "sparse", True)

    def reads_previous(self, graph: Graph) -> bool:
        # Unchanged shipped methods only. Only worth it for a group with a state
        # whose previous value nothing reads (a spike): its trace is then never
        # read. Otherwise the read-out of the updated traces is cheaper, because
        # XLA can update them in place only when nothing reads the previous
        # traces afterwards.
        return (
            not self.full_diagonal
            and self._shipped("gradients_from_previous", "reads_previous")
            and any(transient_states(g) for g in graph.groups)
        )

    def _untraced(self, unit: Unit, full: bool) -> tuple[int, ...]:
        """The states whose trace is not kept: those no state's update reads (a
        spike), where the gradient is read from the previous traces."""
        if full or overrides(self, AbstractDiagonalAlgorithm, "init_unit"):
            return ()
        if not self.reads_previous(Graph((unit.group,), (unit,))):
            return ()
        return transient_states(unit.group)

    def _unit_init(self, unit: Unit, full: bool):
        untraced = self._untraced(unit, full)
        if self.stores_sparse(unit):
            return masked.sparse_init(unit, untraced)
        in_out = unit.site.w_perm == (1, 0)
        turned = not full and turns(unit.shape, in_out) and self._shipped("init_unit")
        return diagonal_init(unit, untraced, turned)

    def init_unit(self, unit: Unit) -> tuple[Inexact[Array, "*trace"] | None, ...]:
        return self._unit_init(unit, full=False)

    def init_full(self, graph: Graph) -> dict[str, Any]:
        if overrides(self, AbstractDiagonalAlgorithm, "init_unit", "init"):
            return self.init(graph)
        return {u.name: self._unit_init(u, full=True) for u in graph.units}

    def transposed_gradients(self, graph, traces) -> frozenset[str]:
        return frozenset(
            u.name
            for u in graph.units
            if not self.stores_sparse(u) and stored_turned(u, traces.get(u.name))
        )

    def update(self, graph, traces, jac):
        if self.full_diagonal:
            jac = dataclasses.replace(jac, D=jac.H)
        return super().update(graph, traces, jac)

    def update_unit(self, unit, trace, D, Df, x):
        # `D` is the group's diagonal Jacobian, whose structural zeros the group
        # records, unless the recurrence uses the full diagonal blocks `H`.
        group = None if self.full_diagonal else unit.group
        _check_readable(unit, trace, group)
        if self.stores_sparse(unit):
            return masked.sparse_update(unit, trace, D, Df, x, group)
        return diagonal_update(trace, D, Df, x, group, is_turned(unit, trace))

    def gradient_unit(self, unit, trace, signal, Df, x):
        del Df, x
        _check_kept(unit, trace)
        if self.stores_sparse(unit):
            return masked.sparse_readout(unit, trace, signal)
        return diagonal_readout(trace, signal, is_turned(unit, trace))

    def summed_gradient_unit(self, unit, trace, signal, Df, x):
        del Df, x
        if overrides(self, AbstractDiagonalAlgorithm, "gradient_unit"):
            return None
        _check_kept(unit, trace)
        if self.stores_sparse(unit):
            return masked.summed_sparse_readout(unit, trace, signal)
        return summed_diagonal_readout(trace, signal, is_turned(unit, trace))

    def gradients_from_previous(self, graph, traces, signal, jac, *, summed=False):
        axis = 1 if summed else 0
        out = {}
        for u in graph.units:
            D = u.gather(jac.D[u.group.name], axis=axis)
            c = u.gather(signal[u.group.name], axis=axis)
            s, cdf = previous_factors(D, c, jac.Df[u.name], u.group)
            x, trace = jac.x[u.name], traces[u.name]
            if self.stores_sparse(u):
                grad = masked.sparse_previous_readout(u, trace, s, cdf, x, summed)
            else:
                turned = is_turned(u, trace)
                grad = previous_readout(trace, s, cdf, x, summed, turned)
            out[u.name] = grad
        return out

    def view(self, unit: Unit, trace: Any) -> Any:
        return canonical(unit, trace)

    def summary_note(self, graph: Graph, path: str) -> str | None:
        dropped = sorted(
            {
                u.group.leaf_names[k]
                for u in graph.units_of(path)
                for k in self._untraced(u, full=False)
            }
        )
        if not dropped:
            return None
        names = ", ".join(dropped)
        return (
            f"no trace kept for {names}: the update reads its previous value only "
            "through a weight or not at all, so the gradient is read from the traces "
            "before the update"
        )

    def chunk_refusal(self, graph: Graph) -> str | None:
        if not self._shipped("init_unit"):
            return super().chunk_refusal(graph)
        for u in graph.units:
            if self.stores_sparse(u):
                return (
                    f"`{u.site.name}` keeps its trace at its mask's non-zeros, which "
                    "a chunk does not advance: pass `D_RTRL(sparse=False)` to keep "
                    "it dense, or leave `chunk` out."
                )
        return None

    def chunk_record(self, graph, jac):
        return chunk.record(graph, jac, self.full_diagonal)

    def chunk_update(self, graph, traces, records):
        return chunk.update(graph, traces, records)

    def chunk_gradients(self, graph, traces, records, signals, *, summed=False):
        return chunk.gradients(graph, traces, records, signals, summed)
