"""Measured results: runs the copy-task, spiking-digits and evidence-accumulation
examples with their default settings and writes `docs/results.md`.

Each example is imported from `examples/` and its `main` is called with no options
besides where to save its plot, exactly what `python examples/<name>.py` runs. The
numbers come from what `main` returns: per method, the evaluation accuracy (and
loss where the example has one), the training loss over the last 50 steps, the
seconds per training step after compilation, and the memory per example (an
online algorithm's eligibility traces, from the shapes of `learner.init()`; for
BPTT the hidden state of every step of the sequence, the least its backward pass
has to keep). The page also records the machine and the library versions, and the
command that regenerates it.

```
nox -s results                     # in a fresh environment
python benchmarks/results.py       # with etrace and the `examples` extra installed
python benchmarks/results.py --tasks evidence_accumulation --out /tmp/results.md
python benchmarks/results.py --render-only   # the page again from the saved JSON
```

Plots go to `benchmarks/results/` and all numbers, loss curves included, to
`benchmarks/results/results.json` (both ignored by git).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = pathlib.Path(__file__).parent / "results"
COMMAND = "nox -s results"

# Per task: the table title, what the example does (its sizes are listed from its
# own defaults), the option naming its PNG, how it labels its methods, whether it
# reports an evaluation loss, and chance level from its settings.
TASKS: dict[str, dict[str, Any]] = {
    "copying_task": dict(
        title="Copy task (LRU stack and GRU)",
        what=(
            "A stack of two residual blocks around `etrace.nn.LRU` (embedding and "
            "linear readout; rows `LRU ...`) and a GRU (stock `eqx.nn.GRUCell`) "
            "with a linear readout reproduce a sequence of random symbols after a "
            "delay; cross-entropy on the recall steps only. Accuracy per recalled "
            "symbol on 1000 held-out sequences. The x BPTT columns divide by the "
            "GRU's BPTT."
        ),
        plot_option="--out",
        labels={
            "d_rtrl": "D-RTRL",
            "es_d_rtrl": "ES-D-RTRL",
            "lru_d_rtrl": "LRU D-RTRL",
            "lru_bptt": "LRU BPTT",
        },
        has_test_loss=True,
        chance=lambda a: (
            f"accuracy {1 / a.alphabet:.3f}, loss {math.log(a.alphabet):.3f}"
        ),
    ),
    "snn_digits": dict(
        title="Spiking digits (recurrent LIF)",
        what=(
            "scikit-learn's 8x8 digits as Bernoulli spike trains; a recurrent layer "
            "of LIF neurons with a leaky readout; cross-entropy on the second half "
            "of the sequence. Accuracy on the held-out images."
        ),
        plot_option="--plot",
        labels={"es_d_rtrl": "ES-D-RTRL", "eprop": "e-prop (kappa = readout leak)"},
        has_test_loss=False,
        chance=lambda a: "accuracy 0.100",
    ),
    "evidence_accumulation": dict(
        title="Evidence accumulation (LSNN: LIF + ALIF)",
        what=(
            "The cue-accumulation task of e-prop (Bellec et al. 2020), scaled down: "
            "left/right cues as Poisson bursts, a delay, then a recall cue; a "
            "recurrent layer of LIF and ALIF neurons with a leaky readout; "
            "cross-entropy on the recall window only; Adam with global-norm "
            "clipping. Accuracy on held-out sequences."
        ),
        plot_option="--plot",
        labels={"eprop": "e-prop (kappa = readout leak)", "es_d_rtrl": "ES-D-RTRL"},
        has_test_loss=True,
        chance=lambda a: f"accuracy 0.500, loss {math.log(2):.3f}",
    ),
}


def load(name: str) -> Any:
    """Imports `examples/<name>.py` as a module."""
    path = ROOT / "examples" / f"{name}.py"
    # As when the script runs: its folder is importable (`examples/_common.py`).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "versions": {
            p: version(p)
            for p in ("jax", "jaxlib", "equinox", "optax", "etrace", "scikit-learn")
        },
    }


def run_task(
    name: str, plots: pathlib.Path, options: Sequence[str] = ()
) -> dict[str, Any]:
    """Runs one example (with its defaults, unless `options` change some); returns
    its settings, its numbers and the wall time."""
    task = TASKS[name]
    module = load(name)
    plot = plots / f"{name}.png"
    argv = [*options, task["plot_option"], str(plot)]
    settings = vars(module.parse_args(argv))
    start = time.perf_counter()
    results = module.main(argv)
    wall = time.perf_counter() - start
    methods = {}
    for method, r in results.items():
        losses = np.asarray(r["losses"])
        methods[method] = {
            "accuracy": r["accuracy"],
            "test_loss": r["loss"] if task["has_test_loss"] else None,
            "train_loss": float(np.mean(losses[-50:])),
            "seconds_per_step": r["seconds_per_step"],
            "compile_seconds": r["compile_seconds"],
            "memory_bytes": r["memory_bytes"],
            "firing_rate": r.get("firing_rate"),
            "losses": losses.tolist(),
        }
    settings.pop(task["plot_option"].lstrip("-"))
    return {
        "wall_seconds": wall,
        "plot": str(plot),
        "settings": settings,
        "chance": task["chance"](argparse.Namespace(**settings)),
        "methods": methods,
    }


def describe(settings: dict[str, Any]) -> str:
    """The example's settings as command-line options."""
    parts = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        parts.append(f"`--{key.replace('_', '-')} {value}`")
    return ", ".join(parts)


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.2f} MiB"


def table(name: str, measured: dict[str, Any]) -> list[str]:
    """The markdown table of one task, BPTT last."""
    task = TASKS[name]
    methods = measured["methods"]
    bptt = methods.get("bptt")
    spiking = any(m["firing_rate"] is not None for m in methods.values())
    head = ["method", "accuracy"]
    if task["has_test_loss"]:
        head.append("eval. loss")
    head += ["train loss", "s / step", "x BPTT time", "memory / example"]
    head += ["x BPTT memory"] + (["firing rate"] if spiking else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    order = [m for m in methods if m != "bptt"] + (["bptt"] if bptt else [])
    for method in order:
        m = methods[method]
        label = "BPTT" if method == "bptt" else task["labels"].get(method, method)
        row = [label, f"{m['accuracy']:.3f}"]
        if task["has_test_loss"]:
            row.append(f"{m['test_loss']:.3f}")
        row.append(f"{m['train_loss']:.3f}")
        row.append(f"{m['seconds_per_step'] * 1e3:.1f} ms")
        row.append(
            f"{m['seconds_per_step'] / bptt['seconds_per_step']:.1f}" if bptt else "-"
        )
        row.append(size(m["memory_bytes"]))
        row.append(f"{m['memory_bytes'] / bptt['memory_bytes']:.2f}" if bptt else "-")
        if spiking:
            rate = m["firing_rate"]
            row.append("-" if rate is None else f"{rate:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(meta: dict[str, Any], tasks: dict[str, dict[str, Any]]) -> str:
    """The results page, as markdown."""
    m = meta["machine"]
    v = m["versions"]
    out = [
        "# Measured results",
        "",
        "Every number on this page was measured by `benchmarks/results.py`, which",
        "runs the examples below with their default settings and writes this page.",
        "Regenerate it with:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        "Each method trains the same initial network on the same stream of batches.",
        "Columns: **accuracy** (and **eval. loss**) on held-out data after training;",
        "**train loss**, the mean training loss of the last 50 steps; **s / step**,",
        "the wall time of one jitted training step (forward, gradient, Adam update)",
        "after compilation, averaged over the run; **memory / example**, for an",
        "online algorithm the bytes of its eligibility traces for one example (from",
        "the shapes of `learner.init()`; the hidden state, the same for every method,",
        "is not counted), and for BPTT the hidden state of every step of the",
        "sequence, the least its backward pass must keep (XLA keeps more: see",
        "`benchmarks/memory.py`). Online memory does not grow with the sequence",
        "length; BPTT's grows linearly. **x BPTT** columns divide by BPTT's value.",
        "Each task is one run with one seed, so small differences in accuracy",
        "between methods are not a ranking.",
        "",
        "## Machine",
        "",
        f"* {m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cpus']} usable), "
        f"{m['platform']}",
        f"* JAX backend `{m['backend']}` ({m['device']}), float32",
        f"* Python {m['python']}; jax {v['jax']}, jaxlib {v['jaxlib']}, "
        f"equinox {v['equinox']}, optax {v['optax']}, etrace {v['etrace']}, "
        f"scikit-learn {v['scikit-learn']}",
        f"* generated {meta['date']}; total wall time "
        f"{meta['wall_seconds'] / 60:.1f} min",
        "",
    ]
    for name, measured in tasks.items():
        task = TASKS[name]
        out += [
            f"## {task['title']}",
            "",
            task["what"],
            "",
            "```bash",
            f"python examples/{name}.py",
            "```",
            "",
            f"Defaults: {describe(measured['settings'])}.",
            "",
            *table(name, measured),
            "",
            f"Chance: {measured['chance']}.",
            f"Wall time of the whole example: {measured['wall_seconds']:.0f} s "
            "(every method, compilation included).",
            "",
        ]
    out += [
        "## Online LRU stack: long delays and pixel-by-pixel digits",
        "",
        "`examples/online_lru.py` takes too long for this page: its results,",
        "measured by hand, are on [Long delays online](long_delays.md).",
        "",
    ]
    return "\n".join(out).rstrip() + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=list(TASKS),
        default=list(TASKS),
        help="examples to run (default: all three)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=ROOT / "docs" / "results.md",
        help="the page to write",
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        default=RESULTS / "results.json",
        help="raw numbers and loss curves",
    )
    parser.add_argument(
        "--command", default=COMMAND, help="the command the page says regenerates it"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: write the page from the numbers saved in --json",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render_only:
        saved = json.loads(args.json.read_text())
        tasks = saved.pop("tasks")
        args.out.write_text(render(saved, tasks))
        print(f"wrote {args.out} from {args.json}")
        return {**saved, "tasks": tasks}
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        print(f"\n=== {name} ===", flush=True)
        tasks[name] = run_task(name, RESULTS)
    meta = {
        "command": args.command,
        "date": datetime.date.today().isoformat(),
        "wall_seconds": time.perf_counter() - start,
        "machine": machine(),
    }
    page = render(meta, tasks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "tasks": tasks}, indent=2))
    print(f"\nwrote {args.out} and {args.json}")
    return {**meta, "tasks": tasks}


if __name__ == "__main__":
    main()
