"""Compiled memory per device of a model-parallel training step, by mesh shape.

The recurrent LIF network of `examples/model_parallel.py` (input and recurrent
weights traced by D-RTRL, a linear readout), one training step (`online_grad` over
`T` steps and an Adam update), placed on a `(data, model)` mesh: the batch split
over `data` (`etrace.shard_batch`, `etrace.shard_traces(..., batch_axis=)`), the
traces, hidden state and traced weight rows split along neurons over `model`
(`etrace.shard_traces`, `etrace.shard_params`). For each mesh shape it compiles the
step and reports, per device, XLA's `memory_analysis()`: arguments plus
temporaries, and the bytes of the trace state a device holds. Nothing is run.

Without several accelerators it runs on four virtual CPU devices (set before JAX
starts unless `XLA_FLAGS` chooses a count):

```
python benchmarks/sharding.py
python benchmarks/sharding.py --hidden 256 512 --batch 8
```

Prints a table and writes `benchmarks/results/sharding.json`.
"""

from __future__ import annotations

import os


if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4"

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402

import etrace  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "examples"))
import model_parallel  # noqa: E402


MiB = 2**20
RESULTS = pathlib.Path(__file__).parent / "results" / "sharding.json"


def measure(hidden: int, batch: int, length: int, inputs: int) -> list[dict[str, Any]]:
    """One row per mesh shape that fits the devices."""
    model, state = model_parallel.build(inputs, hidden, 2, jr.key(0))
    learner, _ = etrace.compile(model, jnp.zeros(inputs), state=state)
    optimiser = optax.adam(1e-3)
    xs, ys = model_parallel.make_batch(jr.key(1), length, batch, inputs, 2)
    rows = []
    for shape in model_parallel.MESHES:
        if shape[0] * shape[1] > jax.device_count():
            continue
        mesh = model_parallel.mesh_of(shape)
        ts = learner.init(batch_size=batch)
        placed = model_parallel.place(learner, optimiser, model, ts, xs, ys, mesh)
        dynamic, static = eqx.partition(placed, eqx.is_array)
        step = model_parallel.make_train_step(learner, optimiser)

        def run(dynamic):
            return eqx.filter(step(*eqx.combine(dynamic, static)), eqx.is_array)

        analysis = jax.jit(run).lower(dynamic).compile().memory_analysis()
        traces = placed[2].traces
        rows.append(
            {
                "hidden": hidden,
                "mesh": f"{shape[0]}x{shape[1]}",
                "argument_bytes": int(analysis.argument_size_in_bytes),
                "temp_bytes": int(analysis.temp_size_in_bytes),
                "bytes_per_device": int(
                    analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                ),
                "trace_bytes_per_device": sum(
                    leaf.addressable_shards[0].data.nbytes
                    for leaf in jax.tree.leaves(traces)
                ),
            }
        )
        del placed, dynamic
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    rows = []
    for hidden in args.hidden:
        rows += measure(hidden, args.batch, args.length, args.inputs)
    print(
        f"LIF network, D-RTRL, batch {args.batch}, T = {args.length}, "
        f"{args.inputs} inputs, float32; {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; per device:"
    )
    print(
        f"{'H':>6} {'mesh':>5} {'args MiB':>9} {'temp MiB':>9} {'total MiB':>10} "
        f"{'of 1x1':>7} {'traces MiB':>11}"
    )
    for row in rows:
        base = next(
            r for r in rows if r["hidden"] == row["hidden"] and r["mesh"] == "1x1"
        )
        row["of_one_device"] = row["bytes_per_device"] / base["bytes_per_device"]
        print(
            f"{row['hidden']:>6} {row['mesh']:>5} {row['argument_bytes'] / MiB:>9.1f} "
            f"{row['temp_bytes'] / MiB:>9.1f} {row['bytes_per_device'] / MiB:>10.1f} "
            f"{row['of_one_device']:>7.2f} {row['trace_bytes_per_device'] / MiB:>11.1f}"
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "batch": args.batch,
        "length": args.length,
        "inputs": args.inputs,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "machine": platform.machine(),
        "jax": jax.__version__,
    }
    out.write_text(json.dumps({"settings": meta, "results": rows}, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
