"""The model configurations of the training benchmarks, shared by every library.

Plain Python with no dependencies, so that `training.py` (etrace) and
`peer_braintrace.py` (braintrace, in its own environment) measure the same sizes,
and `compare_peer.py` can match their rows. Also the command-line options that
select sizes, the timing helper and the table printer those scripts share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any


MiB = 2**20
ALGORITHMS = ("D-RTRL", "ES-D-RTRL", "BPTT")
# ES-D-RTRL's smoothing factor `a` (the same number in both libraries).
ES_DECAY = 0.9
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family and the sizes it is measured at."""

    name: str
    description: str
    inputs: int
    outputs: int
    batch: int
    hidden: tuple[int, ...]
    lengths: tuple[int, ...]
    quick_hidden: tuple[int, ...]
    quick_lengths: tuple[int, ...]


FAMILIES = {
    "gru": Family(
        name="GRU",
        description="GRU cell (10 inputs) with a linear readout (8 outputs), "
        "per-step mean squared error",
        inputs=10,
        outputs=8,
        batch=64,
        hidden=(64, 128, 256),
        lengths=(70, 270),
        quick_hidden=(64,),
        quick_lengths=(70,),
    ),
    "lif": Family(
        name="LIF",
        description="recurrent LIF layer (64 inputs; input and own spikes through "
        "one linear map), linear map and leaky readout (10 outputs), "
        "per-step mean squared error",
        inputs=64,
        outputs=10,
        batch=32,
        hidden=(128, 512),
        lengths=(100, 400),
        quick_hidden=(128,),
        quick_lengths=(100,),
    ),
}


@dataclasses.dataclass(frozen=True)
class Config:
    family: Family
    hidden: int
    length: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.family.name, self.hidden, self.family.batch, self.length)


def add_size_options(
    parser: argparse.ArgumentParser,
    extra: Sequence[str] = (),
    algorithms: bool = True,
    processes: bool = False,
) -> None:
    """The options shared by the training benchmarks of every library; `extra`:
    algorithm names only this library measures (run by default too);
    `algorithms=False` leaves out `--algorithms`, for a script that measures one;
    `processes=True` adds `--processes`, for a script whose `main` runs
    `in_processes` with it."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one small size per model and fewer repeats (a smoke run)",
    )
    parser.add_argument(
        "--cpu-clock",
        action="store_true",
        help="time by the process's CPU time instead of wall time (on a machine "
        "shared with other work; with taskset -c 0)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES)
    )
    parser.add_argument("--gru-hidden", type=int, nargs="+", help="GRU hidden sizes")
    parser.add_argument("--gru-lengths", type=int, nargs="+", help="GRU lengths T")
    parser.add_argument("--lif-hidden", type=int, nargs="+", help="LIF layer sizes")
    parser.add_argument("--lif-lengths", type=int, nargs="+", help="LIF lengths T")
    if algorithms:
        names = list(ALGORITHMS) + list(extra)
        parser.add_argument("--algorithms", nargs="+", choices=names, default=names)
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed runs after compilation, median reported (default 5, quick 2)",
    )
    if not processes:
        return
    parser.add_argument(
        "--processes",
        type=_at_least_one,
        default=1,
        help="measure in this many fresh processes, one after another, and report "
        "each row's median over them (on a small virtual machine a multi-threaded "
        "step can take one of two times from run to run: benchmarks/README.md)",
    )


def _at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def selected(args: argparse.Namespace) -> list[Config]:
    """The configurations chosen by the options of `add_size_options` (and, with
    `--cpu-clock`, `timed` switched to CPU time)."""
    if args.cpu_clock:
        use_cpu_clock()
    configs = []
    for name in args.models:
        family = FAMILIES[name]
        hidden = getattr(args, f"{name}_hidden") or (
            family.quick_hidden if args.quick else family.hidden
        )
        lengths = getattr(args, f"{name}_lengths") or (
            family.quick_lengths if args.quick else family.lengths
        )
        configs.extend(Config(family, h, t) for h in hidden for t in lengths)
    return configs


def repeats(args: argparse.Namespace) -> int:
    if args.repeats is not None:
        return args.repeats
    return 2 if args.quick else 5


KEY = ("model", "hidden", "batch", "T", "algorithm")


def merge_processes(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per measurement from the rows of several processes: every number the
    median over the processes that measured it, the fastest step the minimum, and
    each process's median step time under `step_seconds_processes`."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            groups.setdefault(tuple(r[k] for k in KEY), []).append(r)
    merged = []
    for rs in groups.values():
        out = dict(rs[0])
        for name, value in rs[0].items():
            numbers = [r.get(name) for r in rs]
            if name in KEY or isinstance(value, bool) or None in numbers:
                continue
            if all(isinstance(v, int) for v in numbers):  # bytes: a measured value
                out[name] = statistics.median_low(numbers)
            elif all(isinstance(v, (int, float)) for v in numbers):
                out[name] = statistics.median(numbers)
        if all("step_seconds_min" in r for r in rs):
            out["step_seconds_min"] = min(r["step_seconds_min"] for r in rs)
        out["step_seconds_processes"] = [r["step_seconds"] for r in rs]
        merged.append(out)
    return merged


def in_processes(
    script: str, argv: Sequence[str] | None, processes: int
) -> list[dict[str, Any]]:
    """Runs `script` with the arguments `argv` (the command line's if None) in
    `processes` fresh Python processes, one after another, and merges their rows
    (`merge_processes`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(processes):
            out = pathlib.Path(folder) / f"{i}.json"
            print(f"process {i + 1} of {processes}", flush=True)
            command = [sys.executable, script, *argv, "--processes", "1"]
            subprocess.run([*command, "--out", str(out)], check=True)
            runs.append(json.loads(out.read_text())["results"])
    return merge_processes(runs)


def measure_selected(
    script: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    measure: Callable[[Config, Sequence[str], int], list[dict[str, Any]]],
) -> tuple[list[dict[str, Any]], str]:
    """The rows of every configuration `args` selects, from `measure(config,
    algorithms, repeats)` in this process, or in `--processes` fresh processes of
    `script` (`in_processes`); and a line that says what each row's time is."""
    count = repeats(args)
    heading = f"median of {count} training steps after compilation, float32"
    if args.processes > 1:
        rows = in_processes(script, argv, args.processes)
        return rows, f"{heading}; each row the median over {args.processes} processes"
    rows = [r for c in selected(args) for r in measure(c, args.algorithms, count)]
    return rows, heading


# The clock `timed` reads: wall time, or after `use_cpu_clock()` the CPU time of
# the whole process (all its threads). On a process kept to one core the two agree
# on an idle machine; on a machine shared with other work the CPU time leaves out
# the time slices the process waited for, the larger part of the disturbance.
_clock = time.perf_counter


def use_cpu_clock() -> None:
    """Makes `timed` (and what uses it) read the process's CPU time."""
    global _clock
    _clock = time.process_time


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """`fn()`'s result and the seconds it took (wall time by default)."""
    start = _clock()
    out = fn()
    return out, _clock() - start


def median_time(run: Callable[[], Any], count: int) -> tuple[float, float]:
    """Median and minimum wall time of `count` calls of `run`, which must block
    until its result is ready."""
    times = [timed(run)[1] for _ in range(count)]
    return statistics.median(times), min(times)


def row(config: Config, algorithm: str, **measured: Any) -> dict[str, Any]:
    """One result row; the first five keys identify the measurement."""
    return {
        "model": config.family.name,
        "hidden": config.hidden,
        "batch": config.family.batch,
        "T": config.length,
        "algorithm": algorithm,
        **measured,
    }


def format_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns, the first two left-aligned."""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(r: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in [head, *body])


def training_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table printed by `training.py` and `peer_braintrace.py`."""
    head = ["model", "algorithm", "H", "B", "T", "step ms", "compile s", "temp MiB"]
    body = [
        [
            r["model"],
            r["algorithm"],
            str(r["hidden"]),
            str(r["batch"]),
            str(r["T"]),
            f"{1e3 * r['step_seconds']:.1f}",
            f"{r['compile_seconds']:.2f}",
            f"{r['temp_bytes'] / MiB:.2f}",
        ]
        for r in rows
    ]
    return format_table(head, body)
