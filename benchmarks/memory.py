"""Compiled memory of online gradients against BPTT, as sequence length grows.

For a GRU with a linear readout (stock Equinox layers), lowers and compiles the
gradient of a whole batch of sequences twice: online with `etrace.online_grad` (for
each algorithm this etrace provides) and by back-propagation through time with
`etrace.bptt_grad`. It reports XLA's temporary buffer size for each, from
`memory_analysis()` of the compiled computation; nothing is run. BPTT keeps every
step's activations for the backward pass, so its memory grows linearly in `T`; the
online gradient keeps only the traces and should stay flat.

```
python benchmarks/memory.py
python benchmarks/memory.py --lengths 100 1000 --hidden 64
```

Prints a table and writes `benchmarks/results/memory.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray

import etrace


MiB = 2**20
RESULTS = pathlib.Path(__file__).parent / "results" / "memory.json"


class Net(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, n_in: int, hidden: int, n_out: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.GRUCell(n_in, hidden, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden))

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


def mse(y: Float[Array, " n"], target: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.mean((y - target) ** 2)


def algorithms() -> dict[str, Any]:
    found = {"D-RTRL": etrace.D_RTRL()}
    # ES-D-RTRL may be missing from an older etrace; measure what there is.
    if hasattr(etrace, "ES_D_RTRL"):
        found["ES-D-RTRL"] = etrace.ES_D_RTRL(decay=0.9)
    return found


def temp_bytes(fn, params, static, *args) -> int:
    """XLA's temporary allocation for `fn(model, *args)`, compiled but not run."""

    # The model is split so that only its arrays are arguments of `jax.jit`; its
    # static parts (such as the `StateIndex` markers) are closed over.
    def wrapped(params, *args):
        return fn(eqx.combine(params, static), *args)

    compiled = jax.jit(wrapped).lower(params, *args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise SystemExit(f"The {jax.default_backend()} backend reports no memory use.")
    return int(analysis.temp_size_in_bytes)


def measure(
    length: int, batch: int, n_in: int, hidden: int, n_out: int, seed: int
) -> dict[str, Any]:
    model, state = eqx.nn.make_with_state(Net)(n_in, hidden, n_out, key=jr.key(seed))
    params, static = eqx.partition(model, eqx.is_array)
    # Shapes are all that lowering needs, so long sequences cost no host memory.
    xs = jax.ShapeDtypeStruct((length, batch, n_in), jnp.float32)
    targets = jax.ShapeDtypeStruct((length, batch, n_out), jnp.float32)

    online = {}
    for name, algorithm in algorithms().items():
        learner, _ = etrace.compile(
            model, jnp.zeros(n_in, jnp.float32), state=state, algorithm=algorithm
        )

        def online_fn(model, trace_state, xs, targets, learner=learner):
            grads, _, losses = etrace.online_grad(
                learner, mse, model, trace_state, xs, targets
            )
            return grads, losses

        ts = learner.init(batch_size=batch)
        online[name] = temp_bytes(online_fn, params, static, ts, xs, targets)

    def bptt_fn(model, state, xs, targets):
        return etrace.bptt_grad(mse, model, state, xs, targets, batched=True)

    batched = jtu.tree_map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), state)
    bptt = temp_bytes(bptt_fn, params, static, batched, xs, targets)
    return {"T": length, "online_temp_bytes": online, "bptt_temp_bytes": bptt}


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["online_temp_bytes"])
    head = ["T", *(f"{n} MiB" for n in names), "BPTT MiB"]
    body = [
        [
            str(r["T"]),
            *(f"{r['online_temp_bytes'][n] / MiB:.3f}" for n in names),
            f"{r['bptt_temp_bytes'] / MiB:.3f}",
        ]
        for r in rows
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *body]
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[100, 1000, 10000], help="T values"
    )
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--outputs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)

    config = dict(
        model="GRUCell + Linear",
        hidden=args.hidden,
        batch=args.batch,
        inputs=args.inputs,
        outputs=args.outputs,
        dtype="float32",
    )
    print(", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    rows = []
    for length in args.lengths:
        rows.append(
            measure(
                length, args.batch, args.inputs, args.hidden, args.outputs, args.seed
            )
        )
        print(f"T={length} compiled", flush=True)
    print("\ncompiled temporary memory (XLA memory_analysis().temp_size_in_bytes)")
    print(table(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(
        benchmark="memory",
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        jax=jax.__version__,
        equinox=eqx.__version__,
        etrace=etrace.__version__,
        python=platform.python_version(),
        config=config,
        results=rows,
    )
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
