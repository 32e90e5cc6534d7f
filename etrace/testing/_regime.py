"""Whether an algorithm should equal BPTT on a model, from its compiled graph.

Each algorithm declares where it is exact in its own `exact_regime(facts)`, from the
building blocks of `RegimeFacts`; `register_exact_regime` adds or replaces a rule for
a type from outside the class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import EtraceError
from .._graph import Graph, Group
from .._learner import compile as _compile, Learner


@dataclasses.dataclass(frozen=True)
class Regime:
    """The verdict of `exact_regime`.

    **Attributes:**

    - `exact`: whether the online gradient of every parameter should equal BPTT.
    - `params`: per parameter path, whether that parameter's gradient should.
    - `reasons`: sentences explaining every inexact part (empty when exact).
    """

    exact: bool
    params: dict[str, bool]
    reasons: tuple[str, ...]

    def __bool__(self) -> bool:
        return self.exact

    def __str__(self) -> str:
        if self.exact:
            return "exact: every parameter's online gradient equals BPTT"
        return "not exact:\n" + "\n".join(f"  - {r}" for r in self.reasons)


def _one_step_reason(read: str) -> str:
    return (
        "a value from inside the recurrent update is read before it is stored as "
        f"state ({read}): that path is one-step"
    )


class RegimeFacts:
    """What the compiled graph of one model says about exactness: the building
    blocks of every algorithm's `exact_regime(facts)`.

    An algorithm states its rule by combining these: a base verdict (`diagonal`,
    `full`), then `restrict` or `inexact` for what its own approximation drops,
    with the groups it concerns (`with_memory`, `downstream`, `receiving_signal`).

    **Attributes:**

    - `learner`: the compiled `Learner`, for rules the building blocks do not cover.
    - `graph`: its analysed `Graph`.
    - `paths`: every parameter path, in the model's order.
    - `one_step_read`: the first value read from inside the recurrent update before
        it is stored as state (a one-step path), or `None`.
    """

    def __init__(self, learner: Learner):
        self.learner = learner
        self.graph: Graph = learner.graph
        self.paths: tuple[str, ...] = tuple(learner.compiled.layout.paths)
        reads = learner.compiled.plan.one_step_reads
        self.one_step_read: str | None = reads[0] if reads else None

    # -- base verdicts ---------------------------------------------------------------

    def full(self) -> Regime:
        """RTRL's verdict: exact unless a value is read from inside an update
        (one-step)."""
        if self.one_step_read is None:
            return Regime(True, {p: True for p in self.paths}, ())
        reason = _one_step_reason(self.one_step_read)
        return Regime(False, {p: False for p in self.paths}, (reason,))

    def diagonal(self, *, full_diagonal: bool = False) -> Regime:
        """D-RTRL's verdict: exact for a group whose recurrences are all
        element-wise; with `full_diagonal` (the neurons' full diagonal blocks `H`),
        also for one-neuron groups with recurrent weights."""
        groups = self.graph.groups
        inexact = self._diagonal_losses(full_diagonal)
        reasons = [inexact[g] for g in sorted(inexact)]
        if self.one_step_read is not None:
            reasons.append(_one_step_reason(self.one_step_read))
        roles = self.learner.compiled.roles
        params = {}
        for k, path in enumerate(self.paths):
            if roles[k][0] == "one-step*":
                params[path] = False
                reasons.append(
                    f"`{path}` reaches the hidden state only through another weight "
                    "op and is learned one-step"
                )
                continue
            feeds = {
                groups.index(u.group) for u in self.graph.units if k in u.site.params
            }
            params[path] = self.one_step_read is None and not (feeds & set(inexact))
        return Regime(all(params.values()), params, tuple(reasons))

    def _diagonal_losses(self, full_diagonal: bool) -> dict[int, str]:
        """Per group index, the first path the diagonal traces drop, in words."""
        x_deps = self.learner.compiled.connections.x_deps
        inexact: dict[int, str] = {}
        for u in self.graph.units:
            prev, new = x_deps[u.name]
            for gi, g in enumerate(self.graph.groups):
                if prev >> gi & 1 and u.group is g:
                    if full_diagonal and g.n == 1:
                        continue  # the neuron's block is the whole Jacobian
                    inexact.setdefault(
                        gi,
                        f"`{u.site.name}` reads the previous state of `{g.name}`: a "
                        "recurrent weight, whose paths the diagonal traces drop",
                    )
                elif (prev >> gi & 1 or new >> gi & 1) and u.group is not g:
                    inexact.setdefault(
                        gi,
                        f"`{g.name}` drives the hidden group `{u.group.name}` through "
                        f"`{u.site.name}`: its learning signal misses that group's "
                        "memory",
                    )
                elif new >> gi & 1:
                    inexact.setdefault(
                        gi,
                        f"`{u.site.name}` reads the new state of its own group "
                        f"`{g.name}`: a same-step path through a weight",
                    )
        return inexact

    # -- groups ----------------------------------------------------------------------

    def memoryless(self, group: Group) -> bool:
        """Whether `group`'s update never reads its previous state."""
        return self._memoryless(self.graph.groups.index(group))

    def _memoryless(self, g: int) -> bool:
        c = self.learner.compiled
        prev = {c.state_vars[j] for j in self.graph.groups[g].leaves}
        eqns = c.program.eqns
        reads = any(a in prev for i in c.regions.group_tail[g] for a in eqns[i].ins)
        passthrough = any(s in prev for s in c.regions.sinks[g])
        return not reads and not passthrough

    def with_memory(self) -> list[Group]:
        """The hidden groups whose update reads their previous state."""
        groups = self.graph.groups
        return [g for i, g in enumerate(groups) if not self._memoryless(i)]

    def downstream(self) -> list[Group]:
        """The hidden groups that feed another hidden group."""
        return [g for g in self.graph.groups if self.graph.downstream.get(g.name)]

    def receiving_signal(self) -> list[Group]:
        """The hidden groups whose output a weight reads: those that receive a
        feedback signal (random feedback, a target projection)."""
        return [g for g in self.graph.groups if self.graph.outputs.get(g.name)]

    def traced_paths(self, groups: Iterable[Group] | None = None) -> set[str]:
        """The paths of the parameters traced into `groups` (default: any group)."""
        names = None if groups is None else {g.name for g in groups}
        return {
            self.paths[k]
            for u in self.graph.units
            if names is None or u.group.name in names
            for k in u.site.params
        }

    # -- refinements -----------------------------------------------------------------

    def inexact(self, regime: Regime, reason: str, paths: Iterable[str]) -> Regime:
        """`regime`, not exact for `reason`, with the parameters at `paths` made
        inexact."""
        paths = set(paths)
        params = {p: ok and p not in paths for p, ok in regime.params.items()}
        return Regime(False, params, regime.reasons + (reason,))

    def restrict(self, regime: Regime, groups: Iterable[Group], reason: str) -> Regime:
        """`regime`, with the parameters traced into `groups` made inexact for
        `reason`; unchanged where `groups` is empty."""
        groups = list(groups)
        if not groups:
            return regime
        return self.inexact(regime, reason, self.traced_paths(groups))


_RULES: dict[type, Callable[[Learner, Any], Regime]] = {}


def register_exact_regime(
    algorithm_type: type, rule: Callable[[Learner, Any], Regime]
) -> None:
    """Registers the exactness rule of an algorithm type (for custom algorithms).

    An algorithm class of your own may instead declare its rule in its
    `exact_regime(facts)` method (see `etrace.AbstractAlgorithm.exact_regime`); a
    registered rule takes precedence over that method, for `algorithm_type` and
    its subclasses that have no rule registered of their own.

    **Arguments:**

    - `algorithm_type`: the algorithm's class; the rule also applies to its
        subclasses that have no rule of their own.
    - `rule`: a function `rule(learner, algorithm) -> Regime` that says, from the
        compiled `learner`, where `algorithm` equals BPTT.
    """
    _RULES[algorithm_type] = rule


def exact_regime(
    algorithm: Any,
    model: Any,
    sample_input: Any = None,
    *,
    state: Any = None,
) -> Regime:
    """Says whether `algorithm` should equal BPTT on `model`, and why.

    The verdict comes from the compiled graph: which hidden groups exist, which weight
    ops read previous or new hidden states (recurrent weights, stacked temporal
    layers), and which parameters are learned one-step. The rule is the one
    registered with `register_exact_regime` for the algorithm's type (or the
    nearest of its base classes), else the algorithm's own
    `exact_regime(facts)` method.

    **Arguments:**

    - `algorithm`: an algorithm instance, e.g. `etrace.D_RTRL()`.
    - `model`: the model, or a `Learner` already compiled for it (then
        `sample_input` and `state` are not needed).
    - `sample_input`, `state`: as for `etrace.compile`.

    **Returns:**

    A `Regime` (truthy when exact) with per-parameter verdicts and reasons.
    """
    if isinstance(model, Learner):
        learner = model
    else:
        if sample_input is None:
            raise EtraceError(
                "`exact_regime` needs `sample_input` (one unbatched time step) to "
                "analyse a model; or pass a compiled `Learner` instead of the model."
            )
        learner, _ = _compile(model, sample_input, algorithm=algorithm, state=state)
    for kind in type(algorithm).__mro__:
        if kind in _RULES:
            return _RULES[kind](learner, algorithm)
    regime = algorithm.exact_regime(RegimeFacts(learner))
    if regime is not None:
        return regime
    return Regime(
        False,
        {p: False for p in learner.compiled.layout.paths},
        (f"no exactness rule is registered for {type(algorithm).__name__}",),
    )
