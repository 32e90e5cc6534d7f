"""The frozen result of the analysis: everything `_step` and the `Learner` read."""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import _ir
from .._graph import Graph
from .connections import Connections
from .model import ModelLayout
from .plan import Plan, Regions
from .sites import Sites
from .trace import TracedStep


@dataclasses.dataclass(frozen=True, eq=False)
class Joint:
    """What whole-state algorithms evaluate: the equations upstream of any hidden
    state, the parameter-only variables, and the parameters (model-array indices)
    that reach a hidden state by any path."""

    upstream: frozenset[int]
    param_only: frozenset[int]
    params: tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Compiled:
    """The analysed step (static; hashed by identity).

    **Attributes:**

    - `step`: the traced program and the layout of its inputs and outputs.
    - `graph`: the groups and units the algorithms see.
    - `sites`: where each site's output and weight operation are.
    - `regions`: each group's update, sinks and upstream equations.
    - `plan`: the evaluation modes and order.
    - `connections`: how groups connect within the step.
    - `joint`: what whole-state algorithms evaluate.
    - `roles`: per model array, its role and why (see `Learner.summary`).
    - `skeleton`: the model with each array replaced by its index (`model.Leaf`).
    """

    step: TracedStep
    graph: Graph
    sites: Sites
    regions: Regions
    plan: Plan
    connections: Connections
    joint: Joint
    roles: tuple[tuple[str, str], ...]
    skeleton: Any

    @property
    def program(self) -> _ir.Program:
        return self.step.program

    @property
    def layout(self) -> ModelLayout:
        return self.step.layout

    @property
    def state_vars(self) -> list[int]:
        return self.step.state_vars
