"""Whether each CPU-specific kernel of `etrace/_kernels.py` still pays.

Every kernel there computes exactly what a plain form computes, written the way XLA
on CPU runs faster when it was measured. Here the training step of `training.py`
(`etrace.online_grad`, or with `--per-step` a scan over the batched
`learner.step`, and an Adam update; same models, sizes and data) is compiled
once with every kernel and once per kernel with that kernel replaced by its plain
form, and the compiled steps are called in turn, in one process: `--rounds` rounds
of `--calls` calls of each. A ratio above 1 (plain / kernel) is what the kernel
saves. Time it on one core (`taskset -c 0`).

The plain forms:

* `fused`: `a` itself (no kept-one multiply);
* `after`: the tree as it is (no order of the trace update after the read-out);
* `batch_sum`: `jnp.sum(a, axis=0)`;
* `sum_states`: `jnp.sum(a, axis=-1)`;
* `outer_product_sum`: an outer product per example, then `jnp.sum` over the batch;
* `tile`: a broadcast (never copies side by side);
* `turned_product`: the product as written (no weight turned);
* `turns`: no trace stored turned;

```
taskset -c 0 python benchmarks/kernels_ablation.py
taskset -c 0 python benchmarks/kernels_ablation.py --models lif --lif-hidden 512 \\
    --lif-lengths 100 --kernels after fused
```

Prints a table and writes `benchmarks/results/kernels_ablation.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import training
from configs import add_size_options, Config, format_table, row, selected, timed

from etrace import _kernels


RESULTS = pathlib.Path(__file__).parent / "results" / "kernels_ablation.json"
NAMES = ("D-RTRL", "ES-D-RTRL")


def _outer_product_sum(a: Any, b: Any, turned: bool = False) -> Any:
    out = jnp.sum(jnp.einsum("nbwf,nbfc->nbwc", a, b), axis=0)
    return jnp.swapaxes(out, -1, -2) if turned else out


def _tile(a: Any, copies: int, axis: int) -> Any:
    lead, rest = a.shape[:axis], a.shape[axis:]
    out = jnp.broadcast_to(jnp.expand_dims(a, axis), lead + (copies,) + rest)
    return out.reshape(lead + (copies * rest[0],) + rest[1:])


def _turned_product(bind, eqn, operands, w_pos):
    del w_pos
    return bind(eqn, *operands)[0]


PLAIN: dict[str, Callable[..., Any]] = {
    "fused": lambda a: a,
    "after": lambda tree, reads: tree,
    "batch_sum": lambda a: jnp.sum(a, axis=0),
    "sum_states": lambda a: jnp.sum(a, axis=-1),
    "outer_product_sum": _outer_product_sum,
    "tile": _tile,
    "turned_product": _turned_product,
    "turns": lambda shape, in_out=False: False,
}


@contextlib.contextmanager
def plain(name: str | None) -> Iterator[None]:
    """While tracing, the kernel `name` replaced by its plain form in every etrace
    module that imported it (the compiled program keeps what it was traced with)."""
    if name is None:
        yield
        return
    original = getattr(_kernels, name)
    patched = []
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("etrace"):
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, PLAIN[name])
                patched.append((module, attribute))
    try:
        yield
    finally:
        for module, attribute in patched:
            setattr(module, attribute, original)


def compiled(
    config: Config, name: str, kernel: str | None, per_step: bool = False
) -> Callable[[], Any]:
    """One call of the compiled training step, the kernel `kernel` plain."""
    step, args = training.step_function(config, name, per_step)
    with plain(kernel):
        program = jax.jit(step).lower(*args).compile()
    carry = list(args[:2])

    def run() -> None:
        params, opt_state, loss = program(*carry, *args[2:])
        jax.block_until_ready((params, opt_state, loss))
        carry[:] = [params, opt_state]

    run()
    return run


def measure(
    config: Config,
    names: Sequence[str],
    kernels: Sequence[str],
    rounds: int,
    calls: int,
    per_step: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        runs = {None: compiled(config, name, None, per_step)}
        runs.update({k: compiled(config, name, k, per_step) for k in kernels})
        times: dict[str | None, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                times[k].extend(timed(run)[1] for _ in range(calls))
        base = statistics.median(times[None])
        for k in kernels:
            ratio = statistics.median(times[k]) / base
            rows.append(
                row(
                    config,
                    name,
                    kernel=k,
                    path="batched step" if per_step else "online_grad",
                    seconds=base,
                    plain_seconds=statistics.median(times[k]),
                    ratio=ratio,
                )
            )
            print(
                f"{config.family.name} H={config.hidden} T={config.length} {name} "
                f"{k}: {1e3 * base:.1f} ms with, {ratio:.3f}x without",
                flush=True,
            )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, algorithms=False)
    parser.add_argument("--algorithms", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument(
        "--kernels", nargs="+", choices=sorted(PLAIN), default=sorted(PLAIN)
    )
    parser.add_argument(
        "--per-step",
        action="store_true",
        help="time the scan over the batched learner.step (training.per_step_training)"
        " instead of online_grad",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 1, 1
    rows = [
        r
        for c in selected(args)
        for r in measure(
            c, args.algorithms, args.kernels, args.rounds, args.calls, args.per_step
        )
    ]
    head = ("model", "algorithm", "H", "T", "kernel", "step", "plain / kernel")
    body = [
        (
            r["model"],
            r["algorithm"],
            str(r["hidden"]),
            str(r["T"]),
            r["kernel"],
            f"{1e3 * r['seconds']:.1f} ms",
            f"{r['ratio']:.3f}",
        )
        for r in rows
    ]
    print(f"\nmedians of {args.rounds * args.calls} calls each, in turn, float32")
    print(format_table(head, body))
    training.write_record(
        args.out, "kernels_ablation", rows, rounds=args.rounds, calls=args.calls
    )
    return rows


if __name__ == "__main__":
    main()
