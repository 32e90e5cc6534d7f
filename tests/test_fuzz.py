"""Fuzzing of the compiler and the runtime over random model architectures.

Each example draws an architecture (`tests/fuzz_models.py`), an algorithm and data.
`etrace.compile` must either refuse the model with `etrace.EtraceError` (and must do
so exactly for the architectures built to be refused) or accept it; an accepted model
must then keep the runtime's invariants in float64:

* the online gradient, the losses and the trace state are finite and the gradient
  has the model's structure;
* running the sequence in two chunks, carrying the trace state, gives the same
  gradient (summed) and the same final trace state as running it whole;
* a batch of two under `vmap` gives the mean of the per-example gradients and, per
  example, the per-example final trace state.

Any other exception is a failure. The cases in `tests/fuzz_corpus/` are replayed
first; see its README for how a failing case gets there. A failure whose message
holds the `signature` of a corpus case marked `xfail` (a known, unfixed bug) is
expected there, and the fuzzer discards the examples that hit it.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import event, given, HealthCheck, Phase, reject, settings

import etrace

from . import fuzz_models as fm


CORPUS = pathlib.Path(__file__).parent / "fuzz_corpus"
SAVE_VARIABLE = "ETRACE_FUZZ_SAVE"
RTOL = 1e-9


# --------------------------------------------------------------------------------
# One case.


def _numeric(tree):
    """The leaves of `tree` as float64 NumPy arrays (PRNG keys as their key data)."""
    out = []
    for leaf in jtu.tree_leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf, np.float64))
    return out


def _worst(a, b) -> float:
    """The largest relative difference, leaf by leaf, `|a - b| / |b|` (absolute
    where `b` is zero); infinite when the structures or shapes differ."""
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(_numeric(a), _numeric(b)):
        if x.shape != y.shape:
            return float("inf")
        scale = np.linalg.norm(y)
        worst = max(worst, float(np.linalg.norm(x - y) / (scale if scale else 1.0)))
    return worst


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(x)) for x in _numeric(tree))


def _index(tree, i):
    return jtu.tree_map(lambda a: a[i], tree)


def _modulators(learner, trace_state, xs):
    """For an algorithm whose learning signal is a modulator, one per step (and
    example): a function of the inputs, so that it follows them into chunks and
    examples; `None` for the others."""
    if learner.algorithm.learning_signal != "modulator":
        return None
    lead = 2 if jnp.ndim(trace_state.t) == 1 else 1  # time, and the batch
    leaf = jnp.asarray(jtu.tree_leaves(xs)[0], jnp.float64)
    return jnp.tanh(jnp.sum(leaf, axis=tuple(range(lead, leaf.ndim))) + 0.5)


@eqx.filter_jit
def _runs(learner, model, xs, targets, half):
    """Every run the invariants compare, in one compiled program.

    **Returns:**

    - `single`: `online_grad` of each example alone from `learner.init()`, run one
        example after the other (`lax.map`), stacked on axis 0;
    - `chunked`: `(gradient, trace state)` of example 0 run as two chunks of
        `half` steps, the trace state carried from the first to the second, and the
        two chunks' gradients summed;
    - `batched`: `online_grad` of the whole batch from `learner.init(batch_size=B)`.
    """

    def run(trace_state, x, target):
        return etrace.online_grad(
            learner,
            fm.loss,
            model,
            trace_state,
            x,
            target,
            modulators=_modulators(learner, trace_state, x),
        )

    per_example = jtu.tree_map(lambda a: jnp.moveaxis(a, 1, 0), (xs, targets))
    single = jax.lax.map(lambda e: run(learner.init(), *e), per_example)

    x0, y0 = _index(per_example, 0)
    chunks = jtu.tree_map(lambda a: a.reshape((2, half) + a.shape[1:]), (x0, y0))

    def chunk(trace_state, e):
        grads, trace_state, _ = run(trace_state, *e)
        return trace_state, grads

    end, grads = jax.lax.scan(chunk, learner.init(), chunks)
    summed = jtu.tree_map(lambda g: g[0] + g[1], grads)
    batched = run(learner.init(batch_size=2), xs, targets)
    return single, (summed, end), batched


def check_case(case: fm.FuzzCase) -> str:
    """Runs one case; returns `"refused"` or `"passed"`.

    **Raises:**

    `AssertionError` when an invariant fails, when a model built to be refused
    compiles, or when `compile` refuses a model that it should accept (neither
    `must_refuse` nor `may_refuse`); any exception from etrace other than an
    `EtraceError` raised by `compile` propagates.
    """
    try:
        return _check_case(case)
    finally:
        # Every compiled program holds memory mappings of its own; hundreds of
        # cases would reach the kernel's limit on them, where XLA fails.
        jax.clear_caches()


def _check_case(case: fm.FuzzCase) -> str:
    arch = case.architecture
    model, state, sample = fm.build(arch)
    # The model must run as plain JAX: an error here is the fuzzer's, not etrace's.
    eqx.filter_eval_shape(model, sample, state)
    with warnings.catch_warnings():
        # The one-step warnings are expected for encoders; they are not failures.
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        try:
            learner, _ = etrace.compile(
                model, sample, state=state, algorithm=case.algorithm.build()
            )
        except etrace.EtraceError as error:
            if arch.must_refuse or arch.may_refuse:
                return "refused"
            raise AssertionError(
                f"`compile` refused a model it should accept: {error}"
            ) from error
        if arch.must_refuse:
            raise AssertionError("`compile` accepted a model it must refuse.")
        xs, targets = fm.data(case, batch=2)
        runs = _runs(learner, model, xs, targets, case.length // 2)
    _check_invariants(model, *runs)
    return "passed"


def _check_invariants(model, single, chunked, batched) -> None:
    whole, ts_whole, losses = _index(single, 0)
    params = eqx.filter(model, eqx.is_inexact_array)
    assert jtu.tree_structure(whole) == jtu.tree_structure(params)
    assert _finite(single[0]), "the online gradient is not finite"
    assert _finite(single[2]), "the losses are not finite"
    assert _finite(single[1]), "the trace state is not finite"

    error = _worst(chunked[0], whole)
    assert error <= RTOL, f"chunked gradient differs from whole: {error:.3e}"
    error = _worst(chunked[1], ts_whole)
    assert error <= RTOL, f"chunked trace state differs from whole: {error:.3e}"

    grads, ts_batched, _ = batched
    mean = jtu.tree_map(lambda g: g.mean(axis=0), single[0])
    error = _worst(grads, mean)
    assert error <= RTOL, f"vmapped gradient differs from the loop's mean: {error:.3e}"
    error = _worst(ts_batched, single[1])
    assert error <= RTOL, f"vmapped trace state differs from the loop's: {error:.3e}"


class KnownBug(Exception):
    """A failure that matches the signature of a bug recorded in the corpus."""


def _known_bugs() -> dict[str, str]:
    """`{signature: reason}` of the corpus cases marked `xfail`."""
    bugs = {}
    for path in CORPUS.glob("*.json"):
        entry = json.loads(path.read_text())
        if entry.get("xfail") and entry.get("signature"):
            bugs[entry["signature"]] = entry["xfail"]
    return bugs


KNOWN_BUGS = _known_bugs()


def _check_and_record(case: fm.FuzzCase) -> str:
    """`check_case` for the fuzzer.

    An example that fails with a known bug (`KNOWN_BUGS`) is discarded. On any other
    failure, with `ETRACE_FUZZ_SAVE` set, the case is written into the corpus as
    `failing-<exception type>.json` (overwritten by later failures of the same type,
    so that it ends up holding the shrunk example).
    """
    event(f"algorithm {case.algorithm.name}")
    try:
        outcome = check_case(case)
        event(outcome)
        return outcome
    except Exception as error:
        if any(signature in str(error) for signature in KNOWN_BUGS):
            reject()
        if os.environ.get(SAVE_VARIABLE):
            path = CORPUS / f"failing-{type(error).__name__}.json"
            note = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            path.write_text(case.dumps(note=note))
        raise


# --------------------------------------------------------------------------------
# The corpus.


def _corpus():
    for path in sorted(CORPUS.glob("*.json")):
        entry = json.loads(path.read_text())
        marks = []
        if entry.get("xfail"):
            marks.append(
                pytest.mark.xfail(strict=True, reason=entry["xfail"], raises=KnownBug)
            )
        yield pytest.param(path, marks=marks, id=path.stem)


CORPUS_CASES = list(_corpus())


@pytest.mark.parametrize("path", CORPUS_CASES)
def test_corpus_case(path):
    entry = json.loads(path.read_text())
    try:
        outcome = check_case(fm.FuzzCase.from_json(entry))
    except Exception as error:
        # A case marked `xfail` must fail with its own bug, not with another one.
        signature = entry.get("signature")
        if entry.get("xfail") and signature and signature in str(error):
            raise KnownBug(entry["xfail"]) from error
        raise
    if "expect" in entry:
        assert outcome == entry["expect"]


def test_corpus_covers_every_kind():
    cases = [
        fm.FuzzCase.from_json(json.loads(param.values[0].read_text()))
        for param in CORPUS_CASES
    ]
    archs = [case.architecture for case in cases]
    layers = [layer for arch in archs for layer in arch.layers]
    assert {layer.kind for layer in layers} == set(fm.LAYER_KINDS)
    assert {layer.weight for layer in layers} == set(fm.WEIGHTS)
    assert {layer.refusal for layer in layers} - {None} == set(fm.REFUSALS)
    assert {arch.input for arch in archs} == set(fm.INPUTS)
    assert {arch.readout for arch in archs} == set(fm.READOUTS)
    assert {arch.encoder for arch in archs} == set(fm.ENCODERS)
    assert {case.algorithm.name for case in cases} == set(fm.ALGORITHMS)


def test_cases_round_trip_through_json():
    layers = (
        fm.LayerSpec("alif", 4, "masked", recurrent=True, reset="hard", learn=True),
        fm.LayerSpec("leaky", 2, "einsum", refusal="mean"),
    )
    arch = fm.Architecture(
        "tuple", 2, "mlp", 3, "gelu", layers, "leaky", 2, 7, readout_all=True
    )
    algorithm = fm.AlgorithmSpec("OSTTP", (("feedback_seed", 3), ("recurrent", True)))
    case = fm.FuzzCase(arch, algorithm, data_seed=11, length=4)
    assert fm.FuzzCase.from_json(json.loads(case.dumps(note="x"))) == case
    assert isinstance(case.algorithm.build(), etrace.OSTTP)


@settings(max_examples=40, deadline=None)
@given(spec=fm.algorithm_specs())
def test_algorithm_specs_build_and_round_trip_through_json(spec):
    stored = fm.AlgorithmSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert stored == spec
    assert type(stored.build()).__name__ == spec.name


# --------------------------------------------------------------------------------
# Fuzzing.

# Each example compiles its own programs (a few seconds), so the budgets are small.
# The fast run does not shrink a failure (each shrinking step compiles again); the
# slow run does, and its shrunk case is the one to store in the corpus.
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


@settings(
    max_examples=4,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=_HEALTH,
)
@given(case=fm.fuzz_cases(algorithms=("D_RTRL", "ES_D_RTRL", "RTRL", "EProp")))
def test_fuzz_core_algorithms(case):
    _check_and_record(case)


@settings(max_examples=20, deadline=None, suppress_health_check=_HEALTH)
@given(arch=fm.architectures())
def test_drawn_architectures_run_as_plain_jax(arch):
    """The fuzzer's own consistency (layer sizes, inputs, state), without etrace:
    every drawn architecture builds and runs one step, with the output shape the
    targets have."""
    model, state, sample = fm.build(arch)
    y, new_state = eqx.filter_eval_shape(model, sample, state)
    case = fm.FuzzCase(arch, fm.AlgorithmSpec("D_RTRL"), data_seed=0, length=2)
    _, targets = fm.data(case, batch=1)
    assert jtu.tree_map(jnp.shape, y) == jtu.tree_map(lambda a: a.shape[2:], targets)
    assert jtu.tree_structure(new_state) == jtu.tree_structure(state)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=_HEALTH)
@given(case=fm.fuzz_cases())
def test_fuzz_every_algorithm(case):
    _check_and_record(case)
