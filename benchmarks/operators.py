"""Trace memory per example and time per training step for the weight operators.

One recurrent layer of leaky tanh neurons, `h = a h + tanh(op(W, x) + U h)` or
without `U`, fed through each operator of `docs/operators.md`: a dense product (the
reference), a fixed mask at 10% density (sparse and dense D-RTRL traces), a
low-rank product `A @ (B @ x)` (re-associated), a 2-D convolution (kernel shared
over positions) and an embedding look-up. For D-RTRL and ES-D-RTRL: the bytes of
the traces of one example (from shapes, nothing allocated) and the median wall time
of one jitted training step on a batch, float32.

```
python benchmarks/operators.py
python benchmarks/operators.py --hidden 128 --batch 8 --repeats 5
```

Prints a table and writes `benchmarks/results/operators.json`.
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
import numpy as np
from algorithms import batch_step_time, trace_bytes

import etrace


RESULTS = pathlib.Path(__file__).parent / "results" / "operators.json"


class Layer(eqx.Module):
    """`h = 0.9 h + tanh(drive(x))`, read out by a sum over neurons."""

    drive: Any
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = 0.9 * h + jnp.tanh(self.drive(x).reshape(h.shape))
        return self.readout(h.reshape(-1)), h


class Masked(eqx.Module):
    weight: jax.Array
    mask: jax.Array

    def __call__(self, x):
        return jnp.where(self.mask, self.weight, 0.0) @ x


class LowRank(eqx.Module):
    a: jax.Array
    b: jax.Array

    def __call__(self, x):
        return self.a @ (self.b @ x)


def cases(hidden: int, key) -> dict[str, tuple[Any, Any, Any]]:
    """name -> (drive, sample input, hidden-state shape)."""
    k = jr.split(key, 6)
    side = int(np.sqrt(hidden // 16))
    mask = jr.bernoulli(k[1], 0.1, (hidden, hidden))
    return {
        "dense W @ x": (
            eqx.nn.Linear(hidden, hidden, use_bias=False, key=k[0]),
            jnp.zeros(hidden),
            (hidden,),
        ),
        "masked 10%": (
            Masked(jr.normal(k[2], (hidden, hidden)) / np.sqrt(hidden), mask),
            jnp.zeros(hidden),
            (hidden,),
        ),
        "low-rank R=8": (
            LowRank(jr.normal(k[3], (hidden, 8)), jr.normal(k[4], (8, hidden))),
            jnp.zeros(hidden),
            (hidden,),
        ),
        f"conv 3x3, 4->16 ch, {side}x{side}": (
            eqx.nn.Conv2d(4, 16, 3, padding=1, key=k[5]),
            jnp.zeros((4, side, side)),
            (16, side, side),
        ),
        "embedding 64 x H": (
            eqx.nn.Embedding(64, hidden, key=k[0]),
            jnp.zeros((), jnp.int32),
            (hidden,),
        ),
    }


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    algorithms = {
        "D-RTRL": etrace.D_RTRL(),
        "D-RTRL dense": etrace.D_RTRL(sparse=False),
        "ES-D-RTRL": etrace.ES_D_RTRL(decay=0.9),
    }
    rows = []
    for name, (drive, x0, shape) in cases(args.hidden, jr.key(0)).items():
        n = int(np.prod(shape))
        model = Layer(drive, eqx.nn.Linear(n, 4, key=jr.key(1)))
        model = jax.tree.map(
            lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model
        )
        if jnp.issubdtype(x0.dtype, jnp.integer):
            x = jr.randint(jr.key(2), (args.batch,), 0, 64)
        else:
            x = jr.normal(jr.key(2), (args.batch, *x0.shape), jnp.float32)
        y = jr.normal(jr.key(3), (args.batch, 4), jnp.float32)
        for alg_name, algorithm in algorithms.items():
            if alg_name == "D-RTRL dense" and name != "masked 10%":
                continue
            learner, _ = etrace.compile(
                model, x0, state=jnp.zeros(shape, jnp.float32), algorithm=algorithm
            )
            row = {
                "operator": name,
                "algorithm": alg_name,
                "trace_bytes_per_example": trace_bytes(learner),
                "step_seconds": batch_step_time(learner, model, x, y, args.repeats),
            }
            rows.append(row)
            print(
                f"{name:<28} {alg_name:<13} trace/example "
                f"{row['trace_bytes_per_example'] / 2**20:9.3f} MiB   "
                f"step {1e3 * row['step_seconds']:8.2f} ms",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": "operators",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "etrace": etrace.__version__,
        "python": platform.python_version(),
        "hidden": args.hidden,
        "batch": args.batch,
        "dtype": "float32",
        "results": rows,
    }
    args.out.write_text(json.dumps(meta, indent=2))
    return rows


if __name__ == "__main__":
    main()
