"""The batched `learner.step` against `etrace.online_grad`, timed in turn.

The pure per-step API is the first thing a user writes: a loss of
`learner.step(model, trace_state, x)`, differentiated with respect to the model.
Here three training steps of `training.py` (same models, sizes, data, Adam update)
take the gradient of the summed per-step loss of one batch of sequences in three
ways, with the same gradients:

* `online_grad`: `etrace.online_grad` (`training.online_step`);
* `batched step`: a `lax.scan` over the batched step (a trace state from
  `learner.init(batch_size=B)`, inputs with a leading batch axis), each step's
  batch-mean loss differentiated and the gradients added up, the trace state
  passed through `learner.after_read_out`, as the documentation writes it;
* `vmap step` (with `--vmap`): the same over `jax.vmap(learner.step, in_axes=(None,
  0, 0))` of an unbatched step, where each example's read-out forms its own
  gradient before autodiff sums them.

The compiled steps of one configuration and algorithm are called in turn, in one
process: `--rounds` rounds, each timing `--calls` calls of every step, so that
their ratio is taken under the same machine state. Time it on one core
(`taskset -c 0`).

```
taskset -c 0 python benchmarks/per_step.py
taskset -c 0 python benchmarks/per_step.py --models lif --lif-hidden 512 \\
    --lif-lengths 100 --algorithms D-RTRL --vmap
```

Prints a table and writes `benchmarks/results/per_step.json`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import training
from configs import (
    add_size_options,
    Config,
    format_table,
    LEARNING_RATE,
    row,
    selected,
    timed,
)

import etrace


RESULTS = pathlib.Path(__file__).parent / "results" / "per_step.json"
NAMES = ("D-RTRL", "ES-D-RTRL")
ONLINE, BATCHED, VMAPPED = "online_grad", "batched step", "vmap step"


def runs(config: Config, name: str, vmapped: bool) -> dict[str, Callable[[], Any]]:
    """Per way of taking the gradient, one call of its compiled training step,
    parameters and optimiser state carried from call to call."""
    model, state = training.build(config)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(LEARNING_RATE)
    args = (params, optim.init(params), *training.data(config))
    x0 = jnp.zeros(config.family.inputs, jnp.float32)
    algorithm = training.algorithms()[name]
    learner, _ = etrace.compile(model, x0, state=state, algorithm=algorithm)
    steps = {
        ONLINE: training.online_step(learner, static, optim),
        BATCHED: training.per_step_training(learner, static, optim),
    }
    if vmapped:
        steps[VMAPPED] = training.per_step_training(learner, static, optim, True)
    out = {}
    for way, step in steps.items():
        compiled = jax.jit(step).lower(*args).compile()
        carry = list(args[:2])

        def run(compiled=compiled, carry=carry) -> None:
            params, opt_state, loss = compiled(*carry, *args[2:])
            jax.block_until_ready((params, opt_state, loss))
            carry[:] = [params, opt_state]

        run()  # the first call allocates; not timed
        out[way] = run
    return out


def measure(
    config: Config, names: Sequence[str], rounds: int, calls: int, vmapped: bool
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        ways = runs(config, name, vmapped)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, run in ways.items():
                times[way].extend(timed(run)[1] for _ in range(calls))
        medians = {way: statistics.median(t) for way, t in times.items()}
        ratios = {
            way: [
                statistics.median(times[way][r * calls : (r + 1) * calls])
                / statistics.median(times[ONLINE][r * calls : (r + 1) * calls])
                for r in range(rounds)
            ]
            for way in ways
            if way != ONLINE
        }
        rows.append(
            row(config, name, seconds=medians, round_ratios=ratios, times=times)
        )
        shown = ", ".join(f"{w} {1e3 * s:.1f} ms" for w, s in medians.items())
        print(
            f"{config.family.name} H={config.hidden} T={config.length} {name}: {shown}",
            flush=True,
        )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    ways = [w for w in (ONLINE, BATCHED, VMAPPED) if w in rows[0]["seconds"]]
    head = (
        "model",
        "algorithm",
        "H",
        "T",
        *ways,
        *(f"{w} / {ONLINE}" for w in ways[1:]),
    )
    body = []
    for r in rows:
        s = r["seconds"]
        ratios = [
            f"{s[w] / s[ONLINE]:.2f} ({min(r['round_ratios'][w]):.2f}-"
            f"{max(r['round_ratios'][w]):.2f})"
            for w in ways[1:]
        ]
        body.append(
            (
                r["model"],
                r["algorithm"],
                str(r["hidden"]),
                str(r["T"]),
                *(f"{1e3 * s[w]:.1f} ms" for w in ways),
                *ratios,
            )
        )
    return format_table(head, body)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, algorithms=False)
    parser.add_argument("--algorithms", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--vmap", action="store_true", help="also time vmap step")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 2, 1
    rows = [
        r
        for c in selected(args)
        for r in measure(c, args.algorithms, args.rounds, args.calls, args.vmap)
    ]
    print(
        f"\nmedian over {args.rounds} rounds of {args.calls} calls, taken in turn; "
        "ratios: of the medians (of the rounds' medians, lowest to highest)"
    )
    print(table(rows))
    training.write_record(
        args.out, "per_step", rows, rounds=args.rounds, calls=args.calls
    )
    return rows


if __name__ == "__main__":
    main()
