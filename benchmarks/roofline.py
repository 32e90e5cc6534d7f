"""One trace update against the memory-bandwidth roofline.

For the models of `training.py` (GRU and recurrent LIF, the same sizes and
batches) and for D-RTRL and ES-D-RTRL, times one step of the algorithm's trace
recurrence, `algorithm.update(graph, traces, jac)`, for the whole batch: the traces
and this step's Jacobians (`D`, `Df`, `x`) are given as arrays, so nothing else is
computed. Against it, in the same run, a plain fused multiply-add `a * x + y` over
float32 arrays of the batch's trace size. The FMA reads two such arrays and
writes one; a trace update must at least read and write the traces once, so the
FMA's time is a floor for the update's. The roofline fraction is
FMA time / update time (1 means the update runs at the speed of the FMA).

Also timed: the full step without a gradient (`jax.vmap(learner.step)`: forward
pass, Jacobians and trace update) and the model's own step without traces
(`jax.vmap(model)`). Their difference is all that online learning adds to a
step: the Jacobians and the trace update, compiled together. There XLA can fuse
the update with the computation of `D` and `Df` and fold what is constant in them
(a LIF neuron's `d v / d z` is zero), which it cannot do for the isolated update,
which gets them as arrays; the difference can be smaller than the isolated update.
FMA / (step - forward) is the roofline fraction of that in-step cost.

Each timing is the median over `--repeats` calls (default 31, 5 with `--quick`)
of a compiled function, after a first untimed call; the four functions of a row
(update, FMA, step, forward) are called in turn, so that a drift of the
machine's speed moves them together. The traces (or the FMA's `x`) are donated
to the call and its result is fed to the next, so buffers are reused as in a
training loop instead of being allocated at every call. When one call of the
update takes under a millisecond, its dispatch would dominate, so every timing
of that row instead runs `inner` iterations inside one jitted `lax.fori_loop`
per call and is divided by `inner`, chosen to make a call last about a
millisecond (`--inner` fixes it). The shapes of the Jacobians come from tracing
the real `learner.step` with a wrapper algorithm that records what `update`
receives (`etrace.AbstractWrappedAlgorithm`).

```
python benchmarks/roofline.py
python benchmarks/roofline.py --quick
```

Prints a table and writes `benchmarks/results/roofline.json`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from configs import (
    add_size_options,
    Config,
    format_table,
    median_time,
    MiB,
    selected,
    timed,
)
from training import algorithms, broadcast, build, data, write_record

import etrace


RESULTS = pathlib.Path(__file__).parent / "results" / "roofline.json"
# At least this many iterations per call, in a loop: a single call of a large
# update whose outputs XLA cannot write over its donated inputs pays for fresh
# output buffers (page faults of tens of MB) that a training loop never sees.
MIN_INNER = 4

# What `update` received while `learner.step` was traced: one entry per hidden
# group, (graph restricted to the group, shapes of its traces, shapes of `jac`).
_RECORDED: list[tuple[Any, Any, Any]] = []


def _shapes(tree: Any) -> Any:
    return jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class _Record(etrace.AbstractWrappedAlgorithm):
    """Runs `inner`, and records the shapes its `update` is called with.

    Recording changes neither the update nor the read-out, so the traces and the
    read-out stay `inner`'s (a wrapper that overrides `update` otherwise reads out
    from the updated traces, and has D-RTRL keep the spike's trace for it)."""

    inner: etrace.AbstractAlgorithm

    def init(self, graph):
        return self.inner.init(graph)

    def update(self, graph, traces, jac):
        _RECORDED.append((graph, _shapes(traces), _shapes(jac)))
        return self.inner.update(graph, traces, jac)

    def gradients_from_previous(self, graph, traces, signal, jac, *, summed=False):
        return self.inner.gradients_from_previous(
            graph, traces, signal, jac, summed=summed
        )


def _fill(shapes: Any, batch: int, key) -> Any:
    """Random arrays of `shapes` with a leading batch axis (integers are 0)."""
    leaves, treedef = jtu.tree_flatten(shapes)
    keys = jr.split(key, max(len(leaves), 1))
    out = []
    for s, k in zip(leaves, keys):
        shape = (batch, *s.shape)
        if jnp.issubdtype(s.dtype, jnp.floating):
            out.append(0.5 * jr.normal(k, shape, s.dtype))
        else:
            out.append(jnp.zeros(shape, s.dtype))
    return jtu.tree_unflatten(treedef, out)


def _varied(operands: Any, i: Any) -> Any:
    """`operands` scaled by a factor that depends on the iteration `i`, so that
    XLA cannot hoist what is computed from them alone out of the loop (a trace
    update's `Df (x) x` would then be one array computed once, not each step's)."""
    scale = 1 + 1e-6 * i.astype(jnp.float32)
    return jtu.tree_map(
        lambda a: (
            a * scale.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        ),
        operands,
    )


def runner(
    body: Callable, init: Any, operands: Any, inner: int, vary: bool = False
) -> Callable[[], None]:
    """A call of a compiled function that applies `body(carry, operands) -> carry`
    once, or `inner` times in a loop, after one untimed call.

    The carry is donated and fed back from call to call, so that its buffers are
    reused as in a training loop rather than allocated at every call. The
    operands are arguments of the compiled function, not constants in it; with
    `vary`, they change (slightly) from iteration to iteration, as a step's
    Jacobians do."""

    def loop(carry, operands):
        if inner == 1:
            return body(carry, operands)

        def one(i, c):
            return body(c, _varied(operands, i) if vary else operands)

        return jax.lax.fori_loop(0, inner, one, carry)

    compiled = jax.jit(loop, donate_argnums=0).lower(init, operands).compile()
    carry = [jtu.tree_map(jnp.copy, init)]

    def run():
        carry[0] = compiled(carry[0], operands)
        jax.block_until_ready(carry[0])

    run()
    return run


def per_iteration(
    body: Callable, init: Any, operands: Any, inner: int, count: int
) -> float:
    """Median seconds of one application of `body` (see `runner`)."""
    median, _ = median_time(runner(body, init, operands, inner), count)
    return median / inner


def interleaved(runs: dict[str, Callable[[], None]], count: int) -> dict[str, float]:
    """Median seconds of a call of each of `runs`, called in turn `count` times
    over: on a machine whose speed drifts, the ratio of two timings taken this
    way moves much less than that of two taken one after the other."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(count):
        for name, run in runs.items():
            times[name].append(timed(run)[1])
    return {name: statistics.median(t) for name, t in times.items()}


def choose_inner(body: Callable, init: Any, operands: Any) -> int:
    """Iterations per call that make a call last about a millisecond."""
    single = per_iteration(body, init, operands, 1, 3)
    return max(MIN_INNER, min(100, math.ceil(1e-3 / single)))


def measure(
    config: Config, name: str, inner: int | None, count: int, key
) -> dict[str, Any]:
    model, state = build(config)
    batch = config.family.batch
    x0 = jnp.zeros(config.family.inputs, jnp.float32)
    algorithm = algorithms()[name]
    learner, _ = etrace.compile(model, x0, state=state, algorithm=_Record(algorithm))
    step = jax.vmap(learner.step, in_axes=(None, 0, 0))
    xs, _ = data(config)
    trace_state = learner.init(batch_size=batch)

    _RECORDED.clear()
    eqx.filter_eval_shape(step, model, trace_state, xs[0])
    recorded = list(_RECORDED)
    keys = jr.split(key, 2 * len(recorded))
    traces = [_fill(t, batch, k) for (_, t, _), k in zip(recorded, keys[0::2])]
    jacs = [_fill(j, batch, k) for (_, _, j), k in zip(recorded, keys[1::2])]
    graphs = [g for g, _, _ in recorded]

    def update_all(traces, jacs):
        def one(traces, jacs):
            return [algorithm.update(g, t, j) for g, t, j in zip(graphs, traces, jacs)]

        return jax.vmap(one)(traces, jacs)

    if inner is None:
        inner = choose_inner(update_all, traces, jacs)

    size = sum(math.prod(a.shape) for a in jtu.tree_leaves(traces))
    kx, ky = jr.split(jr.fold_in(key, 1))
    y = jr.normal(ky, (size,), jnp.float32)
    x = jr.normal(kx, (size,), jnp.float32)
    a = jnp.float32(0.999)

    # The full step without a gradient, with its real inputs and traces.
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def full(ts, operands):
        params, x = operands
        _, ts = step(eqx.combine(params, static), ts, x)
        return ts

    # The model's own step, no traces: what the online step adds is the rest.
    forward_model = jax.vmap(lambda m, x, s: m(x, s)[1], in_axes=(None, 0, 0))

    def forward(s, operands):
        params, x = operands
        return forward_model(eqx.combine(params, static), x, s)

    runs = {
        "update": runner(update_all, traces, jacs, inner, vary=True),
        "fma": runner(lambda x, ay: ay[0] * x + ay[1], x, (a, y), inner),
        "step": runner(full, trace_state, (params, xs[0]), inner),
        "forward": runner(forward, broadcast(state, batch), (params, xs[0]), inner),
    }
    seconds = {k: v / inner for k, v in interleaved(runs, count).items()}
    update_s, fma_s = seconds["update"], seconds["fma"]
    step_s, forward_s = seconds["step"], seconds["forward"]
    fma_bytes = 3 * size * 4
    return {
        "model": config.family.name,
        "hidden": config.hidden,
        "batch": batch,
        "algorithm": name,
        "trace_elements": size,
        "trace_bytes": size * 4,
        "update_seconds": update_s,
        "fma_seconds": fma_s,
        "step_seconds": step_s,
        "forward_seconds": forward_s,
        "inner": inner,
        "roofline_fraction": fma_s / update_s,
        # Everything the online step adds to the model's own step (Jacobians and
        # trace update, where XLA also sees the Jacobians' structural zeros).
        "step_fraction": fma_s / (step_s - forward_s) if step_s > forward_s else None,
        "fma_bytes_per_second": fma_bytes / fma_s,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "model",
        "algorithm",
        "H",
        "B",
        "traces MiB",
        "update ms",
        "FMA ms",
        "FMA/update",
        "FMA/(step-fwd)",
        "FMA GB/s",
        "step ms",
        "forward ms",
    ]
    body = [
        [
            r["model"],
            r["algorithm"],
            str(r["hidden"]),
            str(r["batch"]),
            f"{r['trace_bytes'] / MiB:.3f}",
            f"{1e3 * r['update_seconds']:.3f}",
            f"{1e3 * r['fma_seconds']:.3f}",
            f"{r['roofline_fraction']:.2f}",
            "-" if r["step_fraction"] is None else f"{r['step_fraction']:.2f}",
            f"{r['fma_bytes_per_second'] / 1e9:.1f}",
            f"{1e3 * r['step_seconds']:.3f}",
            f"{1e3 * r['forward_seconds']:.3f}",
        ]
        for r in rows
    ]
    return format_table(head, body)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser)
    parser.add_argument(
        "--inner", type=int, help="iterations per timed call (default: automatic)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    # Calls of about a millisecond: many are cheap, and the medians need them.
    count = args.repeats if args.repeats is not None else (5 if args.quick else 31)
    names = [n for n in args.algorithms if n != "BPTT"]

    # The sequence length does not enter a single step: one row per hidden size.
    configs = {(c.family.name, c.hidden): c for c in selected(args)}.values()
    rows = []
    for config in configs:
        for name in names:
            rows.append(measure(config, name, args.inner, count, jr.key(0)))
            r = rows[-1]
            print(
                f"{r['model']} H={r['hidden']} {name}: update "
                f"{1e3 * r['update_seconds']:.3f} ms, FMA "
                f"{1e3 * r['fma_seconds']:.3f} ms",
                flush=True,
            )
    print(
        f"\none step for the whole batch, median of {count} calls, float32; "
        "FMA = a * x + y over the traces' size"
    )
    print(table(rows))

    write_record(args.out, "roofline", rows, repeats=count)
    return rows


if __name__ == "__main__":
    main()
