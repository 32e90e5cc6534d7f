"""The one list of the algorithms etrace ships, which testing, fuzzing and the
documentation read.

Each `Entry` names an algorithm class and says how to use it without knowing it:
configured instances for the tests that hold for every algorithm, the ranges its
hyper-parameters are drawn from (by `etrace.testing.algorithms`, a hypothesis
strategy, and by the fuzzer, as storable keyword values), whether its cost grows
with the square of the hidden size, and, in words, where it is exact. The rule
itself is the class's `exact_regime(facts)` method, which
`etrace.testing.exact_regime` calls.

Adding an algorithm takes:

1. its file in `etrace/_algorithm/`, with the class and its `exact_regime` (or
    none, where it is never exact);
2. one `Entry` in `ALGORITHMS` below;
3. one re-export in `etrace/__init__.py`.

The tests check that every public algorithm class has an entry, that every entry's
rule is reached, and that the strategies draw every entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .base import AbstractAlgorithm
from .d_rtrl import D_RTRL
from .dni import DNI
from .eprop import EProp
from .es_d_rtrl import ES_D_RTRL
from .helpers import FixedRandomFeedback
from .kf_rtrl import KF_RTRL
from .ostl import OSTLFeedforward, OSTLRecurrent
from .osttp import OSTTP
from .otpe import OTPE
from .ottt import OTTT
from .rflo import RFLO
from .rtrl import RTRL
from .snap import SnAp
from .three_factor import ThreeFactor
from .uoro import UORO


# -- ranges of hyper-parameters ------------------------------------------------------
# Each draws storable values (None, bools, ints, floats, strings) as a hypothesis
# strategy; `st` is `hypothesis.strategies`, passed in so that hypothesis stays an
# optional dependency.


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of `values`; `dense`: those that make the algorithm whole-state (left
    out of a draw without dense algorithms)."""

    values: tuple[Any, ...]
    dense: tuple[Any, ...] = ()

    def strategy(self, st: Any, *, dense: bool = True) -> Any:
        # Compared with their types: `1 == True`.
        left_out = {(type(v), v) for v in ([] if dense else self.dense)}
        return st.sampled_from([v for v in self.values if (type(v), v) not in left_out])


@dataclasses.dataclass(frozen=True)
class Integers:
    """An int in `[low, high]`."""

    low: int
    high: int

    def strategy(self, st: Any, *, dense: bool = True) -> Any:
        del dense
        return st.integers(self.low, self.high)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A float `i / per` for an int `i` in `[low, high]`: on a grid, so that a drawn
    value reads as written (`0.35`) and a stored case stays readable."""

    low: int
    high: int
    per: int = 20

    def strategy(self, st: Any, *, dense: bool = True) -> Any:
        del dense
        return st.integers(self.low, self.high).map(lambda i: i / self.per)


@dataclasses.dataclass(frozen=True)
class Maybe:
    """`None`, or a value of `inner`."""

    inner: Choice | Integers | Grid

    def strategy(self, st: Any, *, dense: bool = True) -> Any:
        return st.none() | self.inner.strategy(st, dense=dense)


Range = Choice | Integers | Grid | Maybe
BOOL = Choice((False, True))
DECAY = Grid(0, 18)  # 0, 0.05, ..., 0.9


# -- entries -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Entry:
    """One shipped algorithm.

    **Attributes:**

    - `cls`: the algorithm class; its name (`name`) is what fuzz cases store.
    - `instances`: configured instances by a short key (`"snap2"`), for the tests
        that hold for every algorithm; several per class where its variants differ.
    - `draws`: per constructor keyword, the range it is drawn from; a tuple of such
        dicts where the keywords come in exclusive forms (ES-D-RTRL's `decay` or
        `rank`), one drawn per algorithm.
    - `convert`: per stored keyword whose value is not the constructor's argument,
        `(keyword, make)`: the constructor gets `keyword=make(value)` (OSTTP stores
        `feedback_seed` for `feedback=FixedRandomFeedback(seed)`).
    - `dense`: whether its cost grows with the square of the hidden size (a
        whole-state algorithm), whatever its hyper-parameters; a value that makes
        it so is marked in its `Choice` instead (OSTTP's `recurrent=True`).
    - `exact`: where it equals BPTT, in words, as its `exact_regime` decides it;
        `None` where it declares no rule (never exact).
    """

    cls: type[AbstractAlgorithm]
    instances: Mapping[str, AbstractAlgorithm]
    draws: Mapping[str, Range] | tuple[Mapping[str, Range], ...] = ()
    convert: Mapping[str, tuple[str, Callable[[Any], Any]]] = dataclasses.field(
        default_factory=dict
    )
    dense: bool = False
    exact: str | None = None

    def __post_init__(self):
        for key, instance in self.instances.items():
            if type(instance) is not self.cls:
                raise TypeError(
                    f"The instance {key!r} of the entry of {self.name} is a "
                    f"{type(instance).__name__}."
                )

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def forms(self) -> tuple[Mapping[str, Range], ...]:
        """`draws` as a tuple of forms (one empty form without hyper-parameters)."""
        draws = self.draws
        return (draws,) if isinstance(draws, Mapping) else draws or ({},)

    def build(self, kwargs: Mapping[str, Any]) -> AbstractAlgorithm:
        """The algorithm from storable keyword values (as `values` draws them)."""
        args = {}
        for key, value in kwargs.items():
            keyword, make = self.convert.get(key, (key, None))
            args[keyword] = value if make is None else make(value)
        return self.cls(**args)

    def values(self, st: Any, *, dense: bool = True) -> Any:
        """A strategy of storable keyword dicts; without `dense`, none that makes
        the algorithm whole-state."""
        return st.one_of(
            *[
                st.fixed_dictionaries(
                    {k: r.strategy(st, dense=dense) for k, r in form.items()}
                )
                for form in self.forms
            ]
        )

    def strategy(self, st: Any, *, dense: bool = True) -> Any:
        """A strategy of algorithms with drawn hyper-parameters."""
        return self.values(st, dense=dense).map(self.build)


ALGORITHMS: tuple[Entry, ...] = (
    Entry(
        D_RTRL,
        {"d_rtrl": D_RTRL()},
        {"sparse": Choice((True, False))},
        exact="where every recurrence is element-wise: one temporal layer, no "
        "hidden-to-hidden weight, a readout without state of its own",
    ),
    Entry(
        ES_D_RTRL,
        {"es_d_rtrl": ES_D_RTRL(decay=0.6, bias_correction=True)},
        (
            {"decay": DECAY, "bias_correction": BOOL},
            {"rank": Integers(1, 8), "bias_correction": BOOL},
        ),
        exact="where D-RTRL is, with `decay=0` and no hidden group with memory",
    ),
    Entry(
        RTRL,
        {"rtrl": RTRL()},
        dense=True,
        exact="always, unless a value from inside the recurrent update is read "
        "before it is stored as state",
    ),
    Entry(
        SnAp,
        {"snap2": SnAp(2)},
        {"n": Integers(1, 4), "sparse": Choice((None, True, False))},
        dense=True,
        exact="where RTRL is, once `n - 1` reaches the diameter of the unit graph",
    ),
    Entry(UORO, {"uoro": UORO(seed=3)}, {"seed": Integers(0, 2**16)}, dense=True),
    Entry(
        KF_RTRL,
        {"kf_rtrl": KF_RTRL(seed=3)},
        {"seed": Integers(0, 2**16)},
        dense=True,
    ),
    Entry(
        DNI,
        {"dni": DNI(every=3)},
        {"every": Integers(1, 6)},
        dense=True,
    ),
    Entry(
        EProp,
        {"eprop": EProp(feedback="random", kappa=0.5)},
        {
            "feedback": Choice(("symmetric", "random")),
            "kappa": Maybe(Grid(1, 18)),
        },
        exact="where D-RTRL is, for the groups that neither the kappa filter nor "
        "random feedback reaches",
    ),
    Entry(
        OSTLFeedforward,
        {"ostl_feedforward": OSTLFeedforward()},
        exact="where D-RTRL is: one feed-forward layer",
    ),
    Entry(
        OSTLRecurrent,
        {"ostl_recurrent": OSTLRecurrent()},
        dense=True,
        exact="where D-RTRL is, and for one-neuron groups with recurrent weights",
    ),
    Entry(
        OTTT,
        {"ottt": OTTT(decay=0.7)},
        {"decay": DECAY, "mode": Choice(("A", "O"))},
        exact="where D-RTRL is, for groups without memory (with memory only where "
        "the neurons' diagonal Jacobian is `decay`, which is not checked)",
    ),
    Entry(
        OTPE,
        {"otpe": OTPE(0.7), "f_otpe": OTPE(0.7, approx=True)},
        {"decay": DECAY, "approx": BOOL},
        exact="where D-RTRL is, for groups that feed no hidden group (F-OTPE: and "
        "that have no memory)",
    ),
    Entry(
        OSTTP,
        {"osttp": OSTTP(recurrent=True)},
        {
            "feedback_seed": Integers(0, 99),
            "recurrent": Choice((False, True), dense=(True,)),
        },
        convert={"feedback_seed": ("feedback", FixedRandomFeedback)},
        exact="for the parameters of groups that receive no target projection (the "
        "readout's), where D-RTRL is (with `recurrent`, where OSTLRecurrent is)",
    ),
    Entry(
        ThreeFactor,
        {"three_factor": ThreeFactor()},
        exact="for the parameters without a trace (the readout's): the traced ones "
        "are read out with the modulator",
    ),
    Entry(
        RFLO,
        {"rflo": RFLO(4.0), "rflo_symmetric": RFLO(4.0, "symmetric")},
        {
            "tau": Choice((1.0, 2.0, 4.0, 10.0)),
            "feedback": Choice(("random", "symmetric")),
        },
        exact="where D-RTRL is, for groups without memory and without random "
        "feedback (with memory only where the diagonal Jacobian is the leak, which "
        "is not checked)",
    ),
)


def by_name(entries: tuple[Entry, ...] = ALGORITHMS) -> dict[str, Entry]:
    """The entries by class name."""
    out = {}
    for entry in entries:
        if entry.name in out:
            raise ValueError(f"Two registry entries for {entry.name}.")
        out[entry.name] = entry
    return out


def instances(entries: tuple[Entry, ...] = ALGORITHMS) -> dict[str, AbstractAlgorithm]:
    """Every entry's configured instances, by key."""
    out: dict[str, AbstractAlgorithm] = {}
    for entry in entries:
        for key, instance in entry.instances.items():
            if key in out:
                raise ValueError(f"Two registry instances named {key!r}.")
            out[key] = instance
    return out


BY_NAME = by_name()
INSTANCES = instances()
