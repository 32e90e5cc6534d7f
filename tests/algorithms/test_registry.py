"""The registry of algorithms: every public algorithm has an entry, every entry's
exactness rule is reached, and the strategies draw every entry."""

import inspect

import hypothesis
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings

import etrace
import etrace.testing as et
from etrace._algorithm import registry
from etrace.testing import _regime, _strategies


ENTRIES = registry.ALGORITHMS
NO_RULE = "no exactness rule is registered for"


def _unregistered(entries) -> list[type]:
    """The public algorithm classes of `etrace` (not abstract, not wrappers) that
    no entry of `entries` names."""
    public = {
        value
        for value in vars(etrace).values()
        if isinstance(value, type)
        and issubclass(value, etrace.AbstractAlgorithm)
        and not inspect.isabstract(value)
        and not issubclass(value, etrace.AbstractWrappedAlgorithm)
    }
    return sorted(public - {e.cls for e in entries}, key=lambda c: c.__name__)


def _without(entry):
    return tuple(e for e in ENTRIES if e is not entry)


def _whole_state(algorithm) -> bool:
    return algorithm.routing == "joint" or algorithm.full_diagonal


def test_every_public_algorithm_has_an_entry():
    assert _unregistered(ENTRIES) == []


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_an_entry_left_out_is_caught(entry):
    assert _unregistered(_without(entry)) == [entry.cls]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_entries_agree_with_their_classes(entry):
    assert getattr(etrace, entry.name) is entry.cls
    assert entry.instances
    assert all(type(a) is entry.cls for a in entry.instances.values())
    # `exact` is None exactly where the class declares no rule.
    declares = entry.cls.exact_regime is not etrace.AbstractAlgorithm.exact_regime
    assert declares == (entry.exact is not None)
    if entry.dense:
        assert all(_whole_state(a) for a in entry.instances.values())


def test_names_and_keys_are_unique():
    assert list(registry.BY_NAME) == [e.name for e in ENTRIES]
    assert len(registry.INSTANCES) == sum(len(e.instances) for e in ENTRIES)
    with pytest.raises(ValueError, match="Two registry entries"):
        registry.by_name(ENTRIES + ENTRIES[:1])


def _stack():
    model, state = et.build("stack", 2, 3, 2, 0)
    return model, state, jnp.zeros(2)


@pytest.mark.parametrize("name", list(registry.INSTANCES))
def test_every_rule_is_reached_through_exact_regime(name):
    algorithm = registry.INSTANCES[name]
    entry = registry.BY_NAME[type(algorithm).__name__]
    model, state, x0 = _stack()
    learner, _ = etrace.compile(model, x0, state=state, algorithm=algorithm)
    regime = et.exact_regime(algorithm, learner)
    assert set(regime.params) == set(learner.compiled.layout.paths)
    if entry.exact is None:
        assert not regime and NO_RULE in str(regime)
        return
    assert NO_RULE not in str(regime)
    assert regime == algorithm.exact_regime(_regime.RegimeFacts(learner))


def test_registered_rules_take_precedence(monkeypatch):
    monkeypatch.setattr(_regime, "_RULES", {})

    class Mine(etrace.D_RTRL):
        pass

    class Theirs(Mine):
        pass

    model, state, x0 = _stack()
    learner, _ = etrace.compile(model, x0, state=state)
    inherited = et.exact_regime(Theirs(), learner)
    assert inherited == et.exact_regime(etrace.D_RTRL(), learner)
    mine = et.Regime(True, {}, ())
    et.register_exact_regime(Mine, lambda learner, algorithm: mine)
    assert et.exact_regime(Theirs(), learner) is mine
    assert et.exact_regime(etrace.D_RTRL(), learner) == inherited


def test_wrappers_and_their_rules():
    class Clip(etrace.AbstractWrappedAlgorithm):
        inner: etrace.AbstractAlgorithm

        def update(self, graph, traces, jac):
            new = self.inner.update(graph, traces, jac)
            return jax.tree.map(lambda t: jnp.clip(t, -1.0, 1.0), new)

    model, state, x0 = _stack()
    learner, _ = etrace.compile(model, x0, state=state)
    plain = et.exact_regime(etrace.D_RTRL(), learner)
    # Only the stored dtype changes: D-RTRL's verdict, to rounding.
    assert et.exact_regime(etrace.ReducedPrecision(etrace.D_RTRL()), learner) == plain
    clipped = et.exact_regime(Clip(etrace.D_RTRL()), learner)
    assert not clipped and f"{NO_RULE} Clip" in str(clipped)


def _finds(strategy, cls) -> bool:
    try:
        hypothesis.find(
            strategy,
            lambda a: type(a) is cls,
            settings=settings(max_examples=300, database=None),
        )
    except hypothesis.errors.NoSuchExample:
        return False
    return True


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_strategies_draw_every_entry(entry):
    modulated = entry.cls.learning_signal == "modulator"
    assert _finds(et.algorithms(modulated=True), entry.cls)
    assert _finds(et.algorithms(dense=False, modulated=True), entry.cls) == (
        not entry.dense
    )
    # A loss-driven test draws only what learns from the loss.
    assert _finds(et.algorithms(), entry.cls) == (not modulated)


def test_strategies_miss_an_entry_left_out():
    entry = registry.BY_NAME["OTPE"]
    assert _finds(_strategies._algorithms(ENTRIES, dense=True), entry.cls)
    assert not _finds(_strategies._algorithms(_without(entry), dense=True), entry.cls)


@settings(max_examples=60, deadline=None)
@given(algorithm=et.algorithms(dense=False))
def test_strategies_without_dense_draw_no_whole_state_algorithm(algorithm):
    assert not _whole_state(algorithm)
