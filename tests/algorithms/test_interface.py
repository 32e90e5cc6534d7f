"""The algorithm interface: capabilities are declared class variables, read as
attributes; a misspelled one is an error when the class is created."""

from typing import ClassVar

import pytest

import etrace
from etrace._algorithm.base import CAPABILITIES


def test_every_capability_has_a_default_on_the_interface():
    for name, default in CAPABILITIES.items():
        assert getattr(etrace.AbstractAlgorithm, name) == default
    # A shipped algorithm reads as the interface says, through its own values.
    assert etrace.RTRL().routing == "joint" and etrace.D_RTRL().routing == "group"
    assert etrace.OSTLRecurrent().full_diagonal and not etrace.D_RTRL().full_diagonal
    assert etrace.OSTTP(recurrent=True).full_diagonal
    assert etrace.EProp(feedback="random").learning_signal == "error_feedback"
    assert etrace.EProp().learning_signal == "gradient"
    assert etrace.ThreeFactor().learning_signal == "modulator"


def test_a_wrapper_has_its_inner_algorithms_capabilities():
    class Wrapped(etrace.AbstractWrappedAlgorithm):
        inner: etrace.AbstractAlgorithm

    for inner in (etrace.RTRL(), etrace.OSTTP(), etrace.ES_D_RTRL(decay=0.5)):
        wrapped = Wrapped(inner)
        for name in CAPABILITIES:
            assert getattr(wrapped, name) == getattr(inner, name), name


@pytest.mark.parametrize(
    "body, match",
    [
        ("full_diagonl: ClassVar[bool] = True", "did you mean `full_diagonal`"),
        ("routng = 'joint'", "did you mean `routing`"),
        ("eps = 1e-3", "`Bad.eps` is not a capability.*annotate it"),
        ("learning_signal: ClassVar[str] = 'reward'", "learning_signal` must be one"),
    ],
)
def test_an_unknown_capability_is_an_error_at_class_creation(body, match):
    code = (
        "class Bad(etrace.AbstractUnitAlgorithm):\n"
        f"    {body}\n"
        "    def init_unit(self, unit): return ()\n"
        "    def update_unit(self, unit, trace, D, Df, x): return trace\n"
        "    def gradient_unit(self, unit, trace, signal, Df, x): return None\n"
    )
    with pytest.raises(etrace.EtraceError, match=match):
        exec(code, {"etrace": etrace, "ClassVar": ClassVar})


def test_fields_methods_properties_and_private_names_are_not_capabilities():
    class Fine(etrace.AbstractUnitAlgorithm):
        eps: float = 1e-3  # a field: a hyper-parameter
        routing: ClassVar[str] = "group"  # a capability, declared
        _TABLE: ClassVar[tuple[int, ...]] = (1, 2)  # private

        @property
        def full_diagonal(self) -> bool:  # pyright: ignore[reportIncompatibleVariableOverride]
            return self.eps > 1

        def helper(self):
            return self._TABLE

        def init_unit(self, unit):
            return ()

        def update_unit(self, unit, trace, D, Df, x):
            return trace

        def gradient_unit(self, unit, trace, signal, Df, x):
            return None

    assert Fine().eps == 1e-3 and not Fine().full_diagonal
