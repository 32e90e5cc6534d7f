"""Where one training step's time goes: the compiled kernels of its scan, one by one.

The training step of `training.py` (same models, sizes and algorithms, including
BPTT) is compiled, run once untimed, then called `--repeats` times under JAX's
profiler (`jax.profiler.trace`, written as a Perfetto trace to a temporary
directory). Every event of the trace that is one instruction of the compiled
program (a fusion, a matrix product, a copy; not the loops that contain them) is
summed per instruction and divided by the number of time steps run, and shown
with the JAX operation it computes (`origin`: `jvp(vmap())/dot_general` is a
product of the forward pass, `transpose(...)` a backward pass), so the
kernels of the scan body show their time per time step and `calls` near 1, and
those outside it (the optimiser update, the start of the scan) show
`calls = 1 / T`. Also reported: the step's median wall time from as many calls
outside the profiler, per time step, against the sum of the kernels (the rest is
the runtime's own work: dispatch, waits between kernels).

XLA on CPU names each kernel's event after its instruction; where a backend names
its events otherwise and none matches, the script stops and says so.

Whole-step times on a shared 2-vCPU machine vary by tens of percent between runs;
one kernel's time, read from the same trace as all the others, tells a change of
a few percent in one part of the step apart from that drift.

```
python benchmarks/kernels.py --models gru --gru-hidden 128 --gru-lengths 70
python benchmarks/kernels.py --models lif --lif-hidden 128 --lif-lengths 100 \\
    --algorithms ES-D-RTRL BPTT --top 10
```

Prints one table per step function and writes `benchmarks/results/kernels.json`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
from configs import (
    add_size_options,
    Config,
    format_table,
    repeats,
    row,
    selected,
    timed,
)
from training import (
    applies,
    BF16,
    CHUNKED,
    compiled_run,
    EPROP,
    EPROP_PLAIN,
    write_record,
)


RESULTS = pathlib.Path(__file__).parent / "results" / "kernels.json"

# `%name = shape opcode(`, one instruction of XLA's text form of a program.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
# Instructions that run others (their events span their kernels'), or none.
_CONTAINERS = {"while", "call", "conditional", "tuple", "parameter", "constant"}


_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Path segments of JAX's `op_name` that every kernel of a step shares.
_PLAIN = re.compile(r"^(jit\([^)]*\)|while|body|closed_call)$")


def origin(line: str) -> str:
    """The JAX operation an instruction comes from, from its `op_name`: the
    transformations it is under and the primitive (`jvp(vmap())/dot_general`:
    the forward pass, under `online_grad`'s `vmap`; `transpose(...)`: a backward
    pass), with the enclosing jits and loops left out; empty without one."""
    m = _OP_NAME.search(line)
    if m is None:
        return ""
    parts = [p for p in m.group(1).split(";")[0].split("/") if not _PLAIN.match(p)]
    return "/".join(parts)


def instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """Name -> `(opcode, result shape, origin)` of every instruction of a compiled
    program's text, the containers left out; a fusion's opcode names its kind
    (`fusion/kLoop`, `fusion/kCustom` for a library call such as a matrix
    product), and its origin is that of the instruction it computes last."""
    out = {}
    roots: dict[str, str] = {}  # fused computation -> origin of its root
    computation = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head is not None:
            computation = head.group(1)
        if line.lstrip().startswith("ROOT ") and computation is not None:
            roots[computation] = origin(line)
        m = _INSTRUCTION.match(line)
        if m is None or m.group(3) in _CONTAINERS:
            continue
        name, shape, op = m.groups()
        where = origin(line)
        if op == "fusion":
            kind = re.search(r"kind=(\w+)", line)
            op = f"fusion/{kind.group(1)}" if kind else op
            called = re.search(r"calls=%([\w.\-]+)", line)
            if called is not None:
                where = roots.get(called.group(1)) or where
        out[name] = (op, shape.split("{")[0], where)
    return out


def trace_events(directory: pathlib.Path) -> list[dict[str, Any]]:
    """The complete (`"ph": "X"`) events of the Perfetto trace under `directory`."""
    (path,) = directory.rglob("*.trace.json.gz")
    with gzip.open(path, "rt") as f:
        record = json.load(f)
    events = record["traceEvents"] if isinstance(record, dict) else record
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def kernel_times(
    events: list[dict[str, Any]], known: dict[str, tuple[str, str, str]], steps: int
) -> list[dict[str, Any]]:
    """Per instruction of the program, its time and number of calls per time step
    (`steps` time steps run in all), slowest first."""
    total: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if e["name"] in known:
            total[e["name"]] += 1e-6 * float(e["dur"])  # microseconds
            calls[e["name"]] += 1
    rows = [
        {
            "kernel": name,
            "op": known[name][0],
            "shape": known[name][1],
            "origin": known[name][2],
            "seconds_per_step": total[name] / steps,
            "calls_per_step": calls[name] / steps,
        }
        for name in total
    ]
    return sorted(rows, key=lambda r: -r["seconds_per_step"])


def measure(config: Config, name: str, count: int) -> dict[str, Any]:
    run, compiled = compiled_run(config, name)  # first call made, untimed
    known = instructions(compiled.as_text())
    wall = statistics.median(timed(run)[1] for _ in range(count))
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(count):
                run()
        events = trace_events(pathlib.Path(directory))
    kernels = kernel_times(events, known, count * config.length)
    if not kernels:
        raise RuntimeError(
            "The profiler recorded no kernel of the compiled step: this JAX "
            "backend names its events otherwise."
        )
    return row(
        config,
        name,
        step_seconds=wall,
        step_seconds_per_time_step=wall / config.length,
        kernel_seconds_per_time_step=sum(k["seconds_per_step"] for k in kernels),
        kernels=kernels,
    )


def table(r: dict[str, Any], top: int) -> str:
    per_step = r["step_seconds_per_time_step"]
    body = [
        [
            k["kernel"],
            k["origin"],
            k["op"],
            k["shape"],
            f"{1e6 * k['seconds_per_step']:.2f}",
            f"{k['calls_per_step']:.2f}",
            f"{k['seconds_per_step'] / per_step:.1%}",
        ]
        for k in r["kernels"][:top]
    ]
    head = ["kernel", "origin", "op", "shape", "us / time step", "calls", "of step"]
    rest = len(r["kernels"]) - len(body)
    title = (
        f"{r['model']} H={r['hidden']} B={r['batch']} T={r['T']} {r['algorithm']}: "
        f"step {1e6 * per_step:.1f} us per time step, kernels "
        f"{1e6 * r['kernel_seconds_per_time_step']:.1f} us"
        + (f" ({rest} more kernels not shown)" if rest > 0 else "")
    )
    return f"{title}\n{format_table(head, body)}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, extra=(BF16, CHUNKED, EPROP, EPROP_PLAIN))
    parser.add_argument(
        "--top", type=int, default=20, help="kernels shown per table (default 20)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    count = repeats(args)
    rows = []
    for config in selected(args):
        for name in args.algorithms:
            if not applies(name, config):
                continue
            rows.append(measure(config, name, count))
            print(f"\n{table(rows[-1], args.top)}", flush=True)
    print(f"\n{count} profiled calls of each step after compilation, float32")
    write_record(args.out, "kernels", rows, repeats=count)
    return rows


if __name__ == "__main__":
    main()
