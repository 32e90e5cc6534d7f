"""Trace memory per example and time per training step, for every algorithm.

A GRU (`eqx.nn.GRUCell`, stock Equinox) with a linear readout, at several hidden
sizes. For each algorithm: the bytes of its traces for one example (from the shapes
of `learner.init()`, nothing allocated) and the median wall time of one jitted
training step on a batch (`vmap` of `learner.step`, gradient of the batch-mean loss,
trace state carried), after compilation; and the median wall time per time step of
a jitted `etrace.online_grad` over `--length` steps of a batch, where the read-out
sums over the batch itself. The algorithms whose traces are dense in
the hidden size times the parameters (RTRL; SnAp(2) and SnAp(3), whose patterns
cover a GRU's whole state), and KF-RTRL, whose step takes one pullback per hidden
value and one Jacobian-vector product per output of each weight, are timed only up
to `--max-dense-hidden`, as is DNI over RTRL (RTRL's traces and each group's
predictor, restarted every 8 steps); their memory is always reported.

```
python benchmarks/algorithms.py
python benchmarks/algorithms.py --hidden 32 128 --repeats 20
```

Prints a table and writes `benchmarks/results/algorithms.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import etrace


RESULTS = pathlib.Path(__file__).parent / "results" / "algorithms.json"
DENSE = ("RTRL", "SnAp(2)", "SnAp(3)", "KF-RTRL", "DNI")


class Net(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def algorithms() -> dict[str, etrace.AbstractAlgorithm]:
    return {
        "D-RTRL": etrace.D_RTRL(),
        "ES-D-RTRL": etrace.ES_D_RTRL(decay=0.9),
        "RTRL": etrace.RTRL(),
        "SnAp(1)": etrace.SnAp(1),
        "SnAp(2)": etrace.SnAp(2),
        "SnAp(3)": etrace.SnAp(3),
        "UORO": etrace.UORO(),
        "KF-RTRL": etrace.KF_RTRL(),
        "DNI": etrace.DNI(etrace.RTRL(), every=8),
    }


def trace_bytes(learner: etrace.Learner) -> int:
    shapes = jax.eval_shape(learner.init)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(shapes.traces)
    )


def step_time(learner, model, batch, n_in, repeats) -> float:
    x = jr.normal(jr.key(1), (batch, n_in), jnp.float32)
    y = jr.normal(jr.key(2), (batch, n_in), jnp.float32)
    return batch_step_time(learner, model, x, y, repeats)


def batch_step_time(learner, model, x, y, repeats) -> float:
    """Median seconds of one jitted training step on the batch `x` (leading axis),
    trace state carried, after compilation."""
    step = jax.vmap(learner.step, in_axes=(None, 0, 0))

    @eqx.filter_jit
    def train_step(model, ts, x, y):
        def loss(m):
            out, ts2 = step(m, ts, x)
            return jnp.mean((out - y) ** 2), ts2

        grads, ts = eqx.filter_grad(loss, has_aux=True)(model)
        return grads, ts

    ts = learner.init(batch_size=len(y))
    grads, ts = jax.block_until_ready(train_step(model, ts, x, y))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        grads, ts = jax.block_until_ready(train_step(model, ts, x, y))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def online_step_time(learner, model, batch, n_in, length, repeats) -> float:
    """Median seconds per time step of a jitted `etrace.online_grad` over `length`
    steps of a batch (fresh traces), after compilation: the path where the
    read-out sums over the batch itself (`summed_gradients`)."""
    xs = jr.normal(jr.key(1), (length, batch, n_in), jnp.float32)
    ys = jr.normal(jr.key(2), (length, batch, n_in), jnp.float32)

    def mse(y, target):
        return jnp.mean((y - target) ** 2)

    @eqx.filter_jit
    def run(model, xs, ys):
        ts = learner.init(batch_size=batch)
        return etrace.online_grad(learner, mse, model, ts, xs, ys)[0]

    jax.block_until_ready(run(model, xs, ys))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(model, xs, ys))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / length


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-dense-hidden", type=int, default=128)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)

    rows = []
    for hidden in args.hidden:
        k1, k2 = jr.split(jr.key(0))
        model = Net(
            eqx.nn.GRUCell(args.inputs, hidden, key=k1),
            eqx.nn.Linear(hidden, args.inputs, key=k2),
        )
        # float32 whatever the x64 setting, to measure what users run.
        model = jax.tree.map(
            lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model
        )
        for name, algorithm in algorithms().items():
            learner, _ = etrace.compile(
                model,
                jnp.zeros(args.inputs, jnp.float32),
                state=jnp.zeros(hidden, jnp.float32),
                algorithm=algorithm,
            )
            row: dict[str, Any] = {
                "hidden": hidden,
                "algorithm": name,
                "trace_bytes_per_example": trace_bytes(learner),
                "step_seconds": None,
                "online_step_seconds": None,
            }
            if name not in DENSE or hidden <= args.max_dense_hidden:
                row["step_seconds"] = step_time(
                    learner, model, args.batch, args.inputs, args.repeats
                )
                row["online_step_seconds"] = online_step_time(
                    learner, model, args.batch, args.inputs, args.length, args.repeats
                )
            rows.append(row)

            def ms(seconds):
                return "skipped" if seconds is None else f"{1e3 * seconds:.2f} ms"

            print(
                f"H={hidden:<4} {name:<10} trace/example "
                f"{row['trace_bytes_per_example'] / 2**20:10.3f} MiB   "
                f"step {ms(row['step_seconds'])}   "
                f"online_grad {ms(row['online_step_seconds'])} per step",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "algorithms",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "etrace": etrace.__version__,
        "python": platform.python_version(),
        "batch": args.batch,
        "inputs": args.inputs,
        "dtype": "float32",
        "results": rows,
    }
    args.out.write_text(json.dumps(meta, indent=2))
    return rows


if __name__ == "__main__":
    main()
