"""Two checkouts of etrace timed in turn: the training steps of `training.py`
compiled once by each, then timed round by round, one checkout after the other,
so that both medians are taken under the same machine state.

Each checkout runs in its own worker process (two versions of one package cannot
share a process); the worker that is not timing waits on its input, so only one
runs at a time. Run it on one core:

    taskset -c 0 python benchmarks/versions.py --before ../old --after .

The steps are `training.py`'s (forward over `T` steps, per-step gradients through
`etrace.online_grad`, Adam update), built by this checkout's `training.py` against
each checkout's library.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import configs


HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results" / "versions.json"
# (family, hidden, length) of the configurations measured by default.
DEFAULT = (("gru", 128, 270), ("gru", 256, 270), ("lif", 512, 100), ("lif", 512, 400))


def worker() -> None:
    """Reads `compile KEY FAMILY HIDDEN LENGTH METHOD` and `time KEY COUNT` lines,
    answers each with one JSON line."""
    import training

    runs = {}
    for line in sys.stdin:
        words = line.split()
        if words[0] == "compile":
            key, family, hidden, length, method = words[1:]
            config = configs.Config(configs.FAMILIES[family], int(hidden), int(length))
            runs[key], _ = training.compiled_run(config, method)
            answer: dict[str, Any] = {"key": key}
        else:
            key, count = words[1], int(words[2])
            times = [configs.timed(runs[key])[1] for _ in range(count)]
            answer = {"key": key, "times": times}
        print(json.dumps(answer), flush=True)


class Worker:
    """A worker process importing etrace from `tree`."""

    def __init__(self, tree: pathlib.Path, cpu_clock: bool):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(HERE)]))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker"] + ["--cpu-clock"] * cpu_clock,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, line: str) -> dict[str, Any]:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", type=pathlib.Path)
    parser.add_argument("--after", type=pathlib.Path, default=HERE.parent)
    parser.add_argument("--methods", nargs="+", default=["D-RTRL", "ES-D-RTRL"])
    parser.add_argument(
        "--cpu-clock", action="store_true", help="time by the processes' CPU time"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=3, help="calls per round")
    args = parser.parse_args(argv)
    if args.cpu_clock:
        configs.use_cpu_clock()
    if args.worker:
        worker()
        return []
    if args.before is None:
        parser.error("--before is required")
    workers = {
        "before": Worker(args.before, args.cpu_clock),
        "after": Worker(args.after, args.cpu_clock),
    }
    keys = [
        (f"{f}-{h}-{t}-{m}", f, h, t, m) for f, h, t in DEFAULT for m in args.methods
    ]
    times: dict[tuple[str, str], list[float]] = {}
    for key, *spec in keys:
        for name, w in workers.items():
            w.ask(" ".join(["compile", key, *map(str, spec)]))
            times[name, key] = []
    for _ in range(args.rounds):
        for key, *_ in keys:
            for name, w in workers.items():
                times[name, key] += w.ask(f"time {key} {args.count}")["times"]
    for w in workers.values():
        w.close()
    rows = []
    for key, family, hidden, length, method in keys:
        before = statistics.median(times["before", key])
        after = statistics.median(times["after", key])
        rows.append(
            {
                "model": configs.FAMILIES[family].name,
                "hidden": hidden,
                "length": length,
                "algorithm": method,
                "before_ms": 1e3 * before,
                "after_ms": 1e3 * after,
                "ratio": after / before,
            }
        )
    head = ["model", "algorithm", "H", "T", "before ms", "after ms", "after/before"]
    body = [
        [r["model"], r["algorithm"], str(r["hidden"]), str(r["length"])]
        + [f"{r['before_ms']:.1f}", f"{r['after_ms']:.1f}", f"{r['ratio']:.3f}"]
        for r in rows
    ]
    print(configs.format_table(head, body))
    RESULTS.parent.mkdir(exist_ok=True)
    record = {
        "before": str(args.before),
        "after": str(args.after),
        "clock": "cpu" if args.cpu_clock else "wall",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
