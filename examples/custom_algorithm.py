"""Custom algorithms by wrapping: trace clipping and gradient-norm clipping.

Two wrappers around any shipped algorithm, each a few lines:

* `ClipTraces` clips every trace to `[-bound, bound]` after the inner update, a
  guard against exploding traces;
* `ClipGradNorm` rescales the read-out of each hidden group so that its norm is at
  most `max_norm` (per group and step; clip the summed gradient with optax's
  `clip_by_global_norm` if you want one global bound).

The script compiles a GRU with each of them, runs a sequence, and prints how the
traces and the gradients compare with plain D-RTRL: the largest trace entry at the
end, the norm of the GRU's gradient summed over the sequence, and the largest
per-step read-out norm. It saves a plot of the largest trace entry and of the
GRU's per-step gradient norm over time, with the two bounds marked.

```
python examples/custom_algorithm.py                  # about 15 s on 2 CPUs
python examples/custom_algorithm.py --bound 0.01 --plot clipping.png
```
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
from tqdm import tqdm

import etrace


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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


def norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    return jnp.sqrt(sum(jnp.sum(g**2) for g in leaves))


@eqx.filter_jit
def history(learner, model, trace_state, xs, targets):
    """Per step: the largest trace entry and the norm of the GRU's gradient."""

    def loss(model, ts, x, target):
        y, ts = learner.step(model, ts, x)
        return mse(y, target), ts

    def body(ts, inputs):
        grads, ts = eqx.filter_grad(loss, has_aux=True)(model, ts, *inputs)
        biggest = jnp.max(
            jnp.stack([jnp.max(jnp.abs(t)) for t in jax.tree.leaves(ts.traces)])
        )
        return ts, (biggest, norm(grads.cell))

    _, (biggest, grad_norm) = jax.lax.scan(body, trace_state, (xs, targets))
    return biggest, grad_norm


def plot(curves, bound: float, max_norm: float, out: str) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    # Curves that coincide (a wrapper that does not touch a quantity) stay visible:
    # wide solid first, then narrower dashed.
    styles = [dict(linewidth=3, alpha=0.6), dict(linestyle="--"), dict(linestyle="-.")]
    for (name, (biggest, grad_norm)), style in zip(curves.items(), styles * 2):
        top.plot(biggest, label=name, **style)
        bottom.plot(grad_norm, label=name, **style)
    top.axhline(bound, color="grey", linestyle="--", label="--bound")
    bottom.axhline(max_norm, color="grey", linestyle=":", label="--max-norm")
    top.set_ylabel("largest |trace| entry")
    bottom.set_ylabel("|gradient of the GRU|, per step")
    top.set_yscale("log")
    bottom.set_yscale("log")
    bottom.set_xlabel("time step")
    top.set_title("Wrapping D-RTRL: trace clipping and read-out norm clipping")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--bound", type=float, default=0.05, help="trace clip bound")
    parser.add_argument("--max-norm", type=float, default=0.01, help="grad-norm cap")
    parser.add_argument("--plot", default="custom_algorithm.png", help="output PNG")
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
    rows = []
    curves = {}
    for name, algorithm in tqdm(algorithms.items(), desc="algorithms"):
        learner, ts = etrace.compile(model, xs[0], state=h0, algorithm=algorithm)
        grads, ts, _ = etrace.online_grad(learner, mse, model, ts, xs, targets)
        biggest = max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(ts.traces))
        total = float(norm(grads.cell))
        per_step = history(learner, model, learner.init(), xs, targets)
        curves[name] = tuple(np.asarray(c) for c in per_step)
        summary[name] = total
        rows.append((name, biggest, total, float(jnp.max(per_step[1]))))
    print(
        f"\nGRU hidden {args.hidden}, {args.length} steps; --bound {args.bound}, "
        f"--max-norm {args.max_norm}"
    )
    print(
        f"{'algorithm':<22} {'max |trace|':>12} {'|grad cell|':>12} "
        f"{'max step |grad cell|':>21}"
    )
    for name, biggest, total, step_max in rows:
        print(f"{name:<22} {biggest:12.4f} {total:12.4f} {step_max:21.4f}")
    print(
        "max |trace|: largest trace entry after the sequence; |grad cell|: norm of "
        "the GRU's gradient summed over the sequence; max step |grad cell|: the "
        "largest per-step norm (at most --max-norm with ClipGradNorm)"
    )
    plot(curves, args.bound, args.max_norm, args.plot)
    print(f"saved {args.plot}")
    return summary


if __name__ == "__main__":
    main()
