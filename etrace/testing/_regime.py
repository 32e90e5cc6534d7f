"""Whether an algorithm should equal BPTT on a model, from its compiled graph."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from .._algorithm.d_rtrl import D_RTRL
from .._algorithm.eprop import EProp
from .._algorithm.es_d_rtrl import ES_D_RTRL
from .._algorithm.ostl import OSTLFeedforward, OSTLRecurrent
from .._algorithm.osttp import OSTTP
from .._algorithm.otpe import OTPE
from .._algorithm.ottt import OTTT
from .._algorithm.rtrl import RTRL
from .._algorithm.snap import _masks, SnAp
from .._errors import EtraceError
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


def _diagonal_rule(
    learner: Learner, algorithm: Any, *, full_diagonal: bool = False
) -> Regime:
    """D-RTRL is exact for a group whose recurrences are all element-wise (with the
    full diagonal blocks `H`, also for one-neuron groups with recurrent weights)."""
    del algorithm
    c = learner.compiled
    groups = learner.graph.groups
    inexact: dict[int, str] = {}
    for u in learner.graph.units:
        prev, new = c.connections.x_deps[u.name]
        for gi, g in enumerate(groups):
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
                    f"`{u.site.name}`: its learning signal misses that group's memory",
                )
            elif new >> gi & 1:
                inexact.setdefault(
                    gi,
                    f"`{u.site.name}` reads the new state of its own group "
                    f"`{g.name}`: a same-step path through a weight",
                )
    reasons = [inexact[g] for g in sorted(inexact)]
    if c.plan.one_step_reads:
        reasons.append(
            "a value from inside the recurrent update is read before it is stored "
            f"as state ({c.plan.one_step_reads[0]}): that path is one-step"
        )
    params = {}
    for k, path in enumerate(c.layout.paths):
        role, _ = c.roles[k]
        if role == "one-step*":
            params[path] = False
            reasons.append(
                f"`{path}` reaches the hidden state only through another weight op "
                "and is learned one-step"
            )
            continue
        feeds = {
            groups.index(u.group) for u in learner.graph.units if k in u.site.params
        }
        params[path] = not c.plan.one_step_reads and not (feeds & set(inexact))
    return Regime(all(params.values()), params, tuple(reasons))


def _memoryless(learner: Learner, g: int) -> bool:
    """Whether a group's update never reads its previous state."""
    c = learner.compiled
    prev = {c.state_vars[j] for j in learner.graph.groups[g].leaves}
    program = c.program
    reads = any(a in prev for i in c.regions.group_tail[g] for a in program.eqns[i].ins)
    passthrough = any(s in prev for s in c.regions.sinks[g])
    return not reads and not passthrough


def _smoothed_rule(learner: Learner, algorithm: Any) -> Regime:
    """ES-D-RTRL is exact where D-RTRL is and, in addition, nothing has memory."""
    base = _diagonal_rule(learner, algorithm)
    decay = getattr(algorithm, "decay", 0.0)
    groups = learner.graph.groups
    remembering = [g.name for i, g in enumerate(groups) if not _memoryless(learner, i)]
    if decay == 0.0 and not remembering:
        return base
    reasons = list(base.reasons)
    if remembering:
        reasons.append(
            f"the hidden group(s) {remembering} have memory: the factorised input "
            "and output traces each carry history, so their product is not the "
            "D-RTRL trace"
        )
    else:
        reasons.append(
            f"decay {decay} > 0 on memoryless layers smooths the gradient over time"
        )
    traced = {
        learner.compiled.layout.paths[k]
        for u in learner.graph.units
        for k in u.site.params
    }
    params = {p: ok and p not in traced for p, ok in base.params.items()}
    return Regime(False, params, tuple(reasons))


def _full_rule(learner: Learner, algorithm: Any) -> Regime:
    """RTRL is exact unless a value is read from inside an update (one-step)."""
    del algorithm
    c = learner.compiled
    if not c.plan.one_step_reads:
        return Regime(True, {p: True for p in c.layout.paths}, ())
    reason = (
        "a value from inside the recurrent update is read before it is stored as "
        f"state ({c.plan.one_step_reads[0]}): that path is one-step"
    )
    return Regime(False, {p: False for p in c.layout.paths}, (reason,))


def _sparse_rule(learner: Learner, algorithm: Any) -> Regime:
    """SnAp-n is RTRL once its mask covers everything reachable."""
    base = _full_rule(learner, algorithm)
    graph = learner.graph
    full = _masks(graph, graph.hidden_size + 1)
    mine = _masks(graph, algorithm.n)
    cut = [p for p in full if (full[p] != mine[p]).any()]
    if not cut:
        return base
    reason = (
        f"SnAp({algorithm.n}) drops sensitivities that the unit graph reaches in more "
        f"than {algorithm.n - 1} step(s), for {cut}"
    )
    params = {p: ok and p not in cut for p, ok in base.params.items()}
    return Regime(False, params, base.reasons + (reason,))


def _restrict(base: Regime, learner: Learner, groups: Any, reason: str) -> Regime:
    """`base`, with the parameters traced into `groups` made inexact for `reason`."""
    if not groups:
        return base
    names = {g.name for g in groups}
    paths = learner.compiled.layout.paths
    hit = {
        paths[k]
        for u in learner.graph.units
        if u.group.name in names
        for k in u.site.params
    }
    params = {p: ok and p not in hit for p, ok in base.params.items()}
    return Regime(False, params, base.reasons + (reason,))


def _downstream_groups(learner: Learner) -> list[Any]:
    graph = learner.graph
    return [g for g in graph.groups if graph.downstream.get(g.name)]


def _signal_groups(learner: Learner) -> list[Any]:
    graph = learner.graph
    return [g for g in graph.groups if graph.outputs.get(g.name)]


def _eprop_rule(learner: Learner, algorithm: Any) -> Regime:
    """e-prop: D-RTRL's verdict, unless a filter or random feedback is involved."""
    base = _diagonal_rule(learner, algorithm)
    if algorithm.kappa is not None:
        base = _restrict(
            base,
            learner,
            _downstream_groups(learner),
            f"the kappa filter ({algorithm.kappa.kappa}) is exact only if it equals "
            "the leak of the downstream layer that integrates the filtered group "
            "(a leaky readout `y = kappa y + W z`); that is not checked here",
        )
    if algorithm.feedback is not None:
        base = _restrict(
            base,
            learner,
            _signal_groups(learner),
            "random feedback replaces the readout's transpose: the learning signal "
            "is not the gradient",
        )
    return base


def _ostl_rule(learner: Learner, algorithm: Any) -> Regime:
    return _diagonal_rule(
        learner, algorithm, full_diagonal=isinstance(algorithm, OSTLRecurrent)
    )


def _ottt_rule(learner: Learner, algorithm: Any) -> Regime:
    base = _diagonal_rule(learner, algorithm)
    groups = [
        g for i, g in enumerate(learner.graph.groups) if not _memoryless(learner, i)
    ]
    return _restrict(
        base,
        learner,
        groups,
        "OTTT's presynaptic trace is the eligibility only where the neurons' "
        "diagonal Jacobian is the constant `decay` (a LIF layer with detached reset "
        "and that leak); that is not checked here",
    )


def _otpe_rule(learner: Learner, algorithm: Any) -> Regime:
    base = _diagonal_rule(learner, algorithm)
    base = _restrict(
        base,
        learner,
        _downstream_groups(learner),
        "the postsynaptic estimate is exact only if `decay` equals the leak of the "
        "downstream layer and that layer is a leaky integrator; not checked here",
    )
    if algorithm.approx:
        groups = [
            g for i, g in enumerate(learner.graph.groups) if not _memoryless(learner, i)
        ]
        base = _restrict(
            base,
            learner,
            groups,
            "F-OTPE factorises the trace: exact only where D = decay and Df is "
            "constant over time",
        )
    return base


def _osttp_rule(learner: Learner, algorithm: Any) -> Regime:
    base = _diagonal_rule(
        learner, algorithm, full_diagonal=getattr(algorithm, "recurrent", False)
    )
    return _restrict(
        base,
        learner,
        _signal_groups(learner),
        "OSTTP's learning signal is a random projection of the target, not the "
        "gradient",
    )


_RULES: dict[type, Callable[[Learner, Any], Regime]] = {
    RTRL: _full_rule,
    SnAp: _sparse_rule,
    D_RTRL: _diagonal_rule,
    ES_D_RTRL: _smoothed_rule,
    EProp: _eprop_rule,
    OSTLFeedforward: _ostl_rule,
    OSTLRecurrent: _ostl_rule,
    OTTT: _ottt_rule,
    OTPE: _otpe_rule,
    OSTTP: _osttp_rule,
}


def register_exact_regime(
    algorithm_type: type, rule: Callable[[Learner, Any], Regime]
) -> None:
    """Registers the exactness rule of an algorithm type (for custom algorithms).

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
    layers), and which parameters are learned one-step.

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
    return Regime(
        False,
        {p: False for p in learner.compiled.layout.paths},
        (f"no exactness rule is registered for {type(algorithm).__name__}",),
    )
