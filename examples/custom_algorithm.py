"""Custom algorithms by wrapping: trace clipping and gradient-norm clipping.

Two wrappers around any shipped algorithm, each a few lines:

* `ClipTraces` clips every trace to `[-bound, bound]` after the inner update, a
  guard against exploding traces;
* `ClipGradNorm` rescales the read-out of each hidden group so that its norm is at
  most `max_norm` (per group and step; clip the summed gradient with optax's
  `clip_by_global_norm` if you want one global bound).

The script compiles a GRU with each of them, runs a sequence, and prints how the
traces and the gradients compare with plain D-RTRL.

```
python examples/custom_algorithm.py
```
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import etrace


class ClipTraces(etrace.AbstractWrappedAlgorithm):
    """Clips every trace to `[-bound, bound]` after the inner update."""

    inner: etrace.AbstractAlgorithm
    bound: float

    def update(self, graph, traces, jac):
        new = self.inner.update(graph, traces, jac)
        return jax.tree.map(lambda t: jnp.clip(t, -self.bound, self.bound), new)


class ClipGradNorm(etrace.AbstractWrappedAlgorithm):
    """Rescales each group's read-out to a norm of at most `max_norm`."""

    inner: etrace.AbstractAlgorithm
    max_norm: float

    def gradients(self, graph, traces, signal, jac):
        grads = self.inner.gradients(graph, traces, signal, jac)
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in grads.values()))
        scale = jnp.minimum(1.0, self.max_norm / jnp.maximum(norm, 1e-12))
        return {k: g * scale for k, g in grads.items()}


class Net(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __call__(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--bound", type=float, default=0.05, help="trace clip bound")
    parser.add_argument("--max-norm", type=float, default=0.01, help="grad-norm cap")
    args = parser.parse_args(argv)

    k1, k2, k3 = jr.split(jr.key(0), 3)
    model = Net(
        eqx.nn.GRUCell(3, args.hidden, key=k1), eqx.nn.Linear(args.hidden, 2, key=k2)
    )
    xs = jr.normal(k3, (args.length, 3))
    targets = jnp.sin(jnp.cumsum(xs[:, :2], axis=0))
    h0 = jnp.zeros(args.hidden)
    algorithms = {
        "D-RTRL": etrace.D_RTRL(),
        "ClipTraces(D-RTRL)": ClipTraces(etrace.D_RTRL(), args.bound),
        "ClipGradNorm(D-RTRL)": ClipGradNorm(etrace.D_RTRL(), args.max_norm),
    }
    summary = {}
    print(f"{'algorithm':<22} {'max |trace|':>12} {'|grad cell|':>12}")
    for name, algorithm in algorithms.items():
        learner, ts = etrace.compile(model, xs[0], state=h0, algorithm=algorithm)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, targets)
        biggest = max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(ts.traces))
        cell = eqx.filter(grads.cell, eqx.is_array)
        norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(cell))))
        summary[name] = norm
        print(f"{name:<22} {biggest:12.4f} {norm:12.4f}")
    return summary


if __name__ == "__main__":
    main()
