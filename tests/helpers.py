"""Comparisons and drivers shared by the tests; model families live in
`etrace.testing`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.extend.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings

import etrace
from etrace._algorithm import registry
from etrace.testing._families import (  # noqa: F401
    ALIFNet,
    build,
    data,
    f64,
    firing_rate,
    GRUNet,
    Leaky,
    LIF,
    LIFNet,
    LSTMNet,
    spike,
    Stack,
    VanillaRNN,
)


# The configured instances of every shipped algorithm (at least one per class), for
# tests that hold for all: the registry's.
ALGORITHMS = registry.INSTANCES


def modulators(learner, xs):
    """Per-step scalar modulators shaped like `xs` without its feature axis (time,
    and the batch if any), for an algorithm whose learning signal is a modulator;
    `None` for the others."""
    if learner.algorithm.learning_signal != "modulator":
        return None
    shape = jnp.shape(xs)[:-1]
    return jnp.cos(jnp.arange(math.prod(shape))).reshape(shape).astype(xs.dtype)


def sweep(fast: int, slow: int, **strategies):
    """One property as two tests: `fast` examples in the default run and `slow`
    under the `slow` marker (`nox -s slow`).

    Each example compiles its own programs (seconds each), so the default run
    keeps a few for breadth and the slow run searches wider::

        test_x, test_x_sweep = sweep(4, 40, n=st.integers(1, 5))(_check_x)
    """

    def make(check):
        def with_budget(n):
            return settings(max_examples=n, deadline=None)(given(**strategies)(check))

        return with_budget(fast), pytest.mark.slow(with_budget(slow))

    return make


def all_eqns(jaxpr) -> Iterator[Any]:
    """Every equation of `jaxpr` and of the jaxprs inside it (a scan's body, a
    cond's branches, a custom rule's function), depth first."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from all_eqns(sub)


def mse(y, target):
    return 0.5 * jnp.sum((y - target) ** 2)


def rel_err(a, b) -> float:
    a = np.ravel(np.asarray(a))
    b = np.ravel(np.asarray(b))
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def leaf_errors(a, b) -> dict[str, float]:
    out = {}
    pairs = jtu.tree_flatten_with_path(a)[0]
    for (path, x), y in zip(pairs, jtu.tree_leaves(b)):
        out[jtu.keystr(path)] = rel_err(x, y)
    return out


def tree_allclose(a, b, rtol=1e-9) -> bool:
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    return all(e <= rtol for e in leaf_errors(a, b).values())


def select(tree, where: Callable[[Any], Any]):
    return where(tree)


def per_step_grads(learner, loss_fn, model, trace_state, xs, ys, reset_traces=False):
    """The online gradient driven one step at a time in Python (no scan). With a
    batched trace state, `xs` and `ys` carry the batch on axis 1 and each step's
    loss is the batch mean, as in `etrace.online_grad`."""
    batched = jnp.ndim(trace_state.t) == 1
    step = jax.vmap(learner.step, (None, 0, 0)) if batched else learner.step

    # One compiled step, called once per time step (eagerly, every primitive of
    # the step would compile apart).
    @eqx.filter_jit
    @eqx.filter_grad(has_aux=True)
    def grad_of_step(m, ts, x, y):
        out, ts = step(m, ts, x)
        if batched:
            return jnp.mean(jax.vmap(loss_fn)(out, y)), ts
        return loss_fn(out, y), ts

    total = None
    for x, y in zip(xs, ys):
        if reset_traces:
            zero = learner.reset(trace_state)
            trace_state = etrace.TraceState(trace_state.state, zero.traces, zero.t)
        g, trace_state = grad_of_step(model, trace_state, x, y)
        total = g if total is None else jtu.tree_map(jnp.add, total, g)
    return total, trace_state
