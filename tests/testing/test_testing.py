"""etrace.testing itself: the checks fail when they should, and say why."""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import etrace
import etrace.testing as et

from ..helpers import data, mse


def _setup(family, hidden=4, length=6, seed=0, scale=1.5):
    model, state = et.build(family, 3, hidden, 2, seed)
    xs, ys = data(seed, length, 3, 2, scale=scale)
    learner, ts = etrace.compile(model, xs[0], state=state)
    return learner, model, ts, xs, ys, state


def test_matches_fails_with_table_on_an_approximation():
    learner, model, ts, xs, ys, _ = _setup("rnn")
    with pytest.raises(
        AssertionError, match=r"(?s)differs from BPTT.*rec.weight.*FAIL"
    ):
        et.assert_matches_bptt(learner, mse, model, ts, xs, ys)
    # ... and passes on the parameters that are exact.
    rows = et.assert_matches_bptt(learner, mse, model, ts, xs, ys, params="readout")
    assert rows["readout.weight"][0] <= 1e-9


def test_differs_fails_when_everything_agrees():
    learner, model, ts, xs, ys, _ = _setup("leaky")
    with pytest.raises(AssertionError, match="all agree"):
        et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys)


def test_params_that_select_nothing():
    learner, model, ts, xs, ys, _ = _setup("leaky")
    with pytest.raises(AssertionError, match="selects no parameter"):
        et.assert_matches_bptt(learner, mse, model, ts, xs, ys, params="nope")


def test_vacuous_spiking_comparison_is_refused():
    learner, model, ts, xs, ys, state = _setup("lif")
    silent = 0.0 * xs
    report = et.liveness(model, silent, state=state)
    assert not report.live and "never fires" in str(report)
    with pytest.raises(AssertionError, match="vacuous"):
        et.assert_matches_bptt(learner, mse, model, ts, silent, ys)


def test_liveness_reports_rates_and_saturation():
    _, model, _, xs, _, state = _setup("alif", scale=2.0)
    report = et.liveness(model, xs, state=state)
    assert report.rates and all(0 <= r <= 1 for r in report.rates.values())
    assert report.saturation  # the sigmoids of the decays


def test_batched_checks():
    model, state = et.build("lif", 3, 4, 2, 1)
    xs, ys = data(1, 5, 3, 2, scale=2.0, batch=3)
    learner, _ = etrace.compile(model, xs[0, 0], state=state)
    et.assert_matches_bptt(learner, mse, model, learner.init(batch_size=3), xs, ys)


@pytest.mark.parametrize(
    "family, exact",
    [
        ("leaky", True),
        ("lif", True),
        ("alif", True),
        ("stack", False),
        ("rnn", False),
        ("gru", False),
        ("lstm", False),
    ],
)
def test_exact_regime_agrees_with_the_oracle(family, exact):
    learner, model, ts, xs, ys, _ = _setup(family, scale=2.0)
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert bool(regime) is exact
    assert ("exact" in str(regime)) and (exact or "not exact" in str(regime))
    exact_params = [p for p, ok in regime.params.items() if ok]
    rows = et.assert_matches_bptt(
        learner, mse, model, ts, xs, ys, params=exact_params, require_live=False
    )
    if not exact:
        inexact = [p for p, ok in regime.params.items() if not ok]
        assert inexact
        assert any(rows[p][0] > 1e-6 for p in inexact)


def test_exact_regime_needs_sample_input_for_a_model():
    model, _ = et.build("leaky", 3, 4, 2, 0)
    with pytest.raises(etrace.EtraceError, match="sample_input"):
        et.exact_regime(etrace.D_RTRL(), model)


def test_exact_regime_unknown_algorithm():
    class Mine(etrace.D_RTRL.__mro__[1]):  # an AbstractUnitAlgorithm of our own
        def init_unit(self, unit):
            return jnp.zeros(())

        def update_unit(self, unit, trace, D, Df, x):
            return trace

        def gradient_unit(self, unit, trace, signal, Df, x):
            return jnp.zeros((unit.site.b, unit.site.fw, unit.site.c))

    learner, *_ = _setup("leaky")
    regime = et.exact_regime(Mine(), learner)
    assert not regime and "no exactness rule" in str(regime)


def test_float64_context_restores():
    before = jax.config.read("jax_enable_x64")
    with et.float64():
        assert jnp.zeros(1).dtype == jnp.float64
    assert jax.config.read("jax_enable_x64") == before


@settings(max_examples=3, deadline=None)
@given(case=et.model_families(("gru", "lstm", "rnn")), algorithm=et.algorithms())
def test_strategies_draw_readable_cases(case, algorithm):
    assert "seed=" in repr(case)
    model, state = case.build()
    learner, ts = etrace.compile(
        model, case.sample_input, state=state, algorithm=algorithm
    )
    assert learner.graph.units
    xs, ys = data(case.seed, 3, case.n_in, case.n_out)
    grads, _, _ = etrace.online_grad(learner, mse, model, ts, xs, ys)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_imports_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import etrace.testing as et\n"
        "try:\n"
        "    et.model_families()\n"
        "except ImportError as e:\n"
        "    print('ok' if 'pip install hypothesis' in str(e) else e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_recurrent_input_computed_in_the_update_is_not_a_one_step_read():
    class Rec(eqx.Module):
        w: jax.Array
        u: jax.Array
        r: jax.Array

        def __call__(self, x, h):
            z = jnp.tanh(h)
            h = 0.5 * z + self.w @ x + self.u @ z
            return self.r @ h, h

    k = jax.random.split(jax.random.key(0), 3)
    model = Rec(
        *(jax.random.normal(kk, s) for kk, s in zip(k, [(3, 2), (3, 3), (2, 3)]))
    )
    # Warnings are errors in this suite: compiling must not warn.
    learner, ts = etrace.compile(model, jnp.zeros(2), state=jnp.zeros(3))
    regime = et.exact_regime(etrace.D_RTRL(), learner)
    assert regime.params == {"w": False, "u": False, "r": True}
    xs, ys = data(0, 5, 2, 2)
    et.assert_matches_bptt(learner, mse, model, ts, xs, ys, params="r")
    et.assert_differs_from_bptt(learner, mse, model, ts, xs, ys, params="u")


def test_liveness_keeps_layers_of_one_class_apart():
    model, state = et.build("stack", 3, 4, 2, 0)
    xs, _ = data(0, 8, 3, 2, scale=2.0)
    dead = eqx.tree_at(lambda m: m.l1.thr, model, model.l1.thr + 100.0)
    report = et.liveness(dead, xs, state=state)
    assert len(report.rates) >= 2
    assert not report.live
