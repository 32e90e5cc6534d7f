"""`etrace.testing.assert_matches_bptt` is as sharp as its `rtol`: an online
gradient off by a relative error just above it fails, just below it passes."""

import pytest

import etrace
import etrace.testing as et

from ..helpers import data, mse


class Scaled(etrace.AbstractWrappedAlgorithm):
    """D-RTRL with every read-out scaled by `1 + delta`: an online gradient whose
    traced parameters are off by exactly the relative error `delta`."""

    inner: etrace.AbstractAlgorithm
    delta: float

    def gradients(self, graph, traces, signal, jac):
        grads = self.inner.gradients(graph, traces, signal, jac)
        return {k: g * (1 + self.delta) for k, g in grads.items()}


@pytest.mark.parametrize("rtol", [1e-9, 1e-6])
def test_fails_just_above_rtol_and_passes_just_below(rtol):
    # A leaky layer: D-RTRL's exact regime, so the only error is the one put in.
    model, state = et.build("leaky", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)

    def check(delta):
        algorithm = Scaled(etrace.D_RTRL(), delta)
        learner, ts = etrace.compile(model, xs[0], state=state, algorithm=algorithm)
        return et.assert_matches_bptt(
            learner, mse, model, ts, xs, ys, params="w", rtol=rtol
        )

    rows = check(0.5 * rtol)
    assert 0.4 * rtol < rows["w"][0] <= rtol  # the error put in is measured
    with pytest.raises(AssertionError, match=r"w .* FAIL"):
        check(2.0 * rtol)


def test_the_measured_error_is_the_relative_error():
    model, state = et.build("leaky", 2, 3, 2, 0)
    xs, ys = data(0, 6, 2, 2)
    learner, ts = etrace.compile(
        model, xs[0], state=state, algorithm=Scaled(etrace.D_RTRL(), 1e-3)
    )
    rows = et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params="readout", rtol=1e-9
    )
    assert rows["w"][0] == pytest.approx(1e-3, rel=1e-6)
    assert rows["readout.weight"][0] <= 1e-9  # untraced: untouched
