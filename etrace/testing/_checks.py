"""Gradient checks against the BPTT oracle, for users' own test suites."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu

from .._learner import Learner, TraceState
from .._sequence import bptt_grad, gradient_table, online_grad
from ._liveness import liveness


def _format(rows: dict[str, tuple[float, ...]], selected: set[str], rtol: float) -> str:
    head = ("parameter", "rel. error", "cosine", "|online|", "|bptt|", "")
    body = []
    for path, (err, cos, na, nb) in rows.items():
        mark = ""
        if path in selected:
            mark = "FAIL" if err > rtol else "ok"
        body.append((path, f"{err:.3e}", f"{cos:.6f}", f"{na:.3e}", f"{nb:.3e}", mark))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [head] + body
    )


def _selected(rows: dict[str, Any], params: Any) -> set[str]:
    if params is None:
        return set(rows)
    if isinstance(params, str):
        params = [params]
    chosen = set()
    for path in rows:
        for prefix in params:
            if (
                path == prefix
                or path.startswith(prefix + ".")
                or path.startswith(prefix + "[")
            ):
                chosen.add(path)
    if not chosen:
        raise AssertionError(
            f"`params={list(params)!r}` selects no parameter; the parameters are "
            f"{sorted(rows)}."
        )
    return chosen


def _run(learner, loss_fn, model, trace_state, xs, targets, mask, require_live):
    batched = jnp.ndim(trace_state.t) == 1
    if require_live:
        state = trace_state.state
        sample_xs = xs
        if batched:
            state = jtu.tree_map(lambda a: a[0], state)
            sample_xs = jtu.tree_map(lambda a: a[:, 0], xs)
        report = liveness(model, sample_xs, state=state)
        if not report.live:
            raise AssertionError(
                "The comparison would be vacuous: the network is not live on this "
                f"data.\n{report}\nScale the input or the weights so that neurons "
                "spike sometimes but not always, or pass `require_live=False`."
            )
    online, _, _ = online_grad(
        learner, loss_fn, model, trace_state, xs, targets, mask=mask
    )
    exact, _ = bptt_grad(
        loss_fn, model, trace_state.state, xs, targets, mask=mask, batched=batched
    )
    return gradient_table(online, exact)


def assert_matches_bptt(
    learner: Learner,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    trace_state: TraceState,
    xs: Any,
    targets: Any,
    *,
    params: str | Sequence[str] | None = None,
    rtol: float = 1e-9,
    mask: Any = None,
    require_live: bool = True,
) -> dict[str, tuple[float, ...]]:
    """Asserts that the online gradient of a sequence equals BPTT's.

    The online gradient is driven step by step (`etrace.online_grad`: one gradient per
    step, never a reverse pass over the whole sequence, which would make every
    algorithm look exact). Run it in float64 (`etrace.testing.float64`).

    **Arguments:**

    - `learner`, `loss_fn`, `model`, `trace_state`, `xs`, `targets`, `mask`: as for
        `etrace.online_grad`.
    - `params`: parameter paths (or path prefixes such as `"l2"` or `"readout"`) to
        check; all parameters by default.
    - `rtol`: the largest relative error `|g - g_bptt| / |g_bptt|` allowed.
    - `require_live`: refuse a comparison on a network that never or always spikes
        (see `liveness`).

    **Returns:**

    The per-parameter table `{path: (rel_error, cosine, |online|, |bptt|)}`.

    **Raises:**

    `AssertionError` with the table when a selected parameter differs.
    """
    rows = _run(learner, loss_fn, model, trace_state, xs, targets, mask, require_live)
    selected = _selected(rows, params)
    bad = [p for p in selected if rows[p][0] > rtol]
    if bad:
        raise AssertionError(
            f"The online gradient differs from BPTT for {sorted(bad)} (rtol={rtol}):\n"
            + _format(rows, selected, rtol)
        )
    return rows


def assert_differs_from_bptt(
    learner: Learner,
    loss_fn: Callable[[Any, Any], Any],
    model: Any,
    trace_state: TraceState,
    xs: Any,
    targets: Any,
    *,
    params: str | Sequence[str] | None = None,
    rtol: float = 1e-6,
    mask: Any = None,
    require_live: bool = True,
) -> dict[str, tuple[float, ...]]:
    """The negative control: asserts that some selected parameter differs from BPTT.

    Pins an approximation: if an algorithm that should be approximate on this model
    suddenly equals BPTT, either the model no longer exercises the approximation or
    the test has become vacuous.

    **Arguments:** as for `assert_matches_bptt`; `rtol` is the relative error that at
    least one selected parameter must exceed.

    **Returns:**

    The per-parameter table.

    **Raises:**

    `AssertionError` with the table when every selected parameter agrees.
    """
    rows = _run(learner, loss_fn, model, trace_state, xs, targets, mask, require_live)
    selected = _selected(rows, params)
    if not any(rows[p][0] > rtol for p in selected):
        raise AssertionError(
            f"Expected the online gradient to differ from BPTT (rtol={rtol}) for "
            f"some of {sorted(selected)}, but all agree:\n"
            + _format(rows, selected, rtol)
        )
    return rows
