"""etrace against braintrace in one process, their training steps timed in turn.

`training.py` and `peer_braintrace.py` measure each library in its own process,
one after the other. On a shared machine the speed of the whole machine drifts
between such runs (by up to 40% within minutes on the 2-vCPU machines these
figures come from), and a ratio of two medians taken minutes apart carries that
drift. Here both libraries' steps for one configuration and algorithm (the same
models, sizes, data and optimiser as in those scripts, built by their own
functions) are compiled in one Python process, then called in alternation:
`--rounds` rounds, each timing `--calls` calls of etrace's step and then as many
of braintrace's. Each library's time is the median of all its calls; the ratio
etrace / braintrace is also taken round by round, so that its spread shows how
much the machine moved while the pair was measured.

Needs etrace and braintrace in one environment (braintrace needs Python >= 3.12):
`nox -s bench_alternating` builds one; arguments after `--` go to the script.

```
python benchmarks/alternating.py
python benchmarks/alternating.py --models gru --gru-hidden 128 --gru-lengths 70 \\
    --algorithms ES-D-RTRL --rounds 9
```

Prints a table and writes `benchmarks/results/alternating.json`.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import brainstate
import jax
import peer_braintrace
import training
from configs import (
    add_size_options,
    Config,
    format_table,
    row,
    selected,
    timed,
)


RESULTS = pathlib.Path(__file__).parent / "results" / "alternating.json"


def etrace_run(
    config: Config, name: str, per_step: bool = False, concat_gru: bool = False
) -> Callable[[], Any]:
    """One call of `training.py`'s compiled step of `name` (or BPTT), parameters
    and optimiser state carried from call to call (`training.compiled_run`); with
    `per_step`, the step that scans the batched `learner.step` instead of
    `online_grad`; with `concat_gru`, on the GRU written as braintrace writes it."""
    return training.compiled_run(config, name, per_step, concat_gru)[0]


def braintrace_run(config: Config, name: str) -> Callable[[], Any]:
    """One call of `peer_braintrace.py`'s step of `name` (or BPTT); called twice
    here (brainstate compiles the step again on its second call)."""
    args = peer_braintrace.data(config)
    if name == "BPTT":
        step, _ = peer_braintrace.bptt_step(config)
    else:
        step, _ = peer_braintrace.online_step(config, name, args[0][0])

    def run() -> None:
        jax.block_until_ready(step(*args))

    run()
    run()
    return run


def alternate(
    runs: Sequence[Callable[[], Any]], rounds: int, calls: int
) -> list[list[float]]:
    """Per run, the wall times of `calls` calls in each of `rounds` rounds, the
    runs taking turns within every round (`times[i][r * calls + c]`)."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, out in zip(runs, times):
            out.extend(timed(run)[1] for _ in range(calls))
    return times


def ways(config: Config, name: str, per_step: bool) -> dict[str, tuple[bool, bool]]:
    """etrace's steps to time for `name`: `online_grad` (or BPTT), and with
    `per_step` the scan of the batched step; for the GRU, each also on the GRU
    written as braintrace writes it. Each as `(per_step, concat_gru)`."""
    if name == "BPTT":
        return {"etrace": (False, False)}
    out = {"online_grad": (False, False)}
    if per_step:
        out["batched step"] = (True, False)
    if config.family.name == "GRU":
        out["online_grad, concat GRU"] = (False, True)
        if per_step:
            out["batched step, concat GRU"] = (True, True)
    return out


def measure(
    config: Config, names: Sequence[str], rounds: int, calls: int, per_step: bool
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        mine = ways(config, name, per_step)
        runs = [etrace_run(config, name, *way) for way in mine.values()]
        *times, theirs = alternate([*runs, braintrace_run(config, name)], rounds, calls)
        for way, own in zip(mine, times):
            per_round = [
                statistics.median(own[r * calls : (r + 1) * calls])
                / statistics.median(theirs[r * calls : (r + 1) * calls])
                for r in range(rounds)
            ]
            rows.append(
                row(
                    config,
                    name,
                    way=way,
                    etrace_seconds=statistics.median(own),
                    braintrace_seconds=statistics.median(theirs),
                    ratio=statistics.median(own) / statistics.median(theirs),
                    round_ratios=per_round,
                    etrace_times=own,
                    braintrace_times=theirs,
                )
            )
            r = rows[-1]
            print(
                f"{config.family.name} H={config.hidden} T={config.length} {name} "
                f"({way}): etrace {1e3 * r['etrace_seconds']:.1f} ms, braintrace "
                f"{1e3 * r['braintrace_seconds']:.1f} ms, ratio {r['ratio']:.2f} "
                f"(rounds {min(per_round):.2f} to {max(per_round):.2f})",
                flush=True,
            )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "model",
        "algorithm",
        "etrace's step",
        "H",
        "T",
        "etrace",
        "braintrace",
        "ratio",
        "rounds",
    )
    body = [
        (
            r["model"],
            r["algorithm"],
            r["way"],
            str(r["hidden"]),
            str(r["T"]),
            f"{1e3 * r['etrace_seconds']:.1f} ms",
            f"{1e3 * r['braintrace_seconds']:.1f} ms",
            f"{r['ratio']:.2f}",
            f"{min(r['round_ratios']):.2f} to {max(r['round_ratios']):.2f}",
        )
        for r in rows
    ]
    return format_table(head, body)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of alternation (default 5)"
    )
    parser.add_argument(
        "--calls",
        type=int,
        default=2,
        help="calls of each library's step per round (default 2)",
    )
    parser.add_argument(
        "--per-step",
        action="store_true",
        help="also time etrace's step that scans the batched learner.step",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    if args.repeats is not None:
        parser.error(
            "--repeats: here --rounds and --calls set how often each step runs"
        )
    warnings.filterwarnings("ignore", module="braintrace")
    brainstate.environ.set(dt=1.0, precision=32)

    configs = selected(args)
    rows = [
        r
        for c in configs
        for r in measure(c, args.algorithms, args.rounds, args.calls, args.per_step)
    ]
    print(
        f"\nmedian of {args.rounds * args.calls} calls of each step, "
        f"{args.rounds} rounds of {args.calls} calls per library in turn, float32; "
        "ratio: etrace / braintrace (rounds: the ratio's range over the rounds)"
    )
    print(table(rows))
    versions = peer_braintrace.versions()
    training.write_record(
        args.out,
        "alternating",
        rows,
        braintrace={k: v for k, v in versions.items() if k != "jax"},
        rounds=args.rounds,
        calls=args.calls,
        models={c.family.name: c.family.description for c in configs},
    )
    return rows


if __name__ == "__main__":
    main()
