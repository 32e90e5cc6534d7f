"""Pieces the training examples share: the training loop with its progress bar and
timings, the memory figure reported per method, the summary table and the plots.

The examples import it as `_common` (the folder of the running script is on
`sys.path`; loaders that import an example by path put `examples/` there too).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from tqdm import tqdm

import etrace


def memory_bytes(learner: etrace.Learner | None, state: Any, num_steps: int) -> int:
    """Per example: the online algorithm's traces, or for BPTT (`learner=None`) the
    hidden state of every step, the least its backward pass must keep."""
    if learner is None:
        leaves = jtu.tree_leaves(state)
        return num_steps * sum(x.size * x.dtype.itemsize for x in leaves)
    shapes = jax.eval_shape(learner.init)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(shapes.traces)
    )


def cross_entropy(y: Float[Array, " K"], target: Int[Array, ""]) -> Float[Array, ""]:
    return optax.softmax_cross_entropy_with_integer_labels(y, target)


def broadcast(tree: Any, batch: int) -> Any:
    return jtu.tree_map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), tree)


def online_gradient(learner, model, xs, targets, mask):
    """Online gradient of a batch of sequences, each from a fresh trace state."""
    trace_state = learner.init(batch_size=xs.shape[1])
    grads, _, losses = etrace.online_grad(
        learner, cross_entropy, model, trace_state, xs, targets, mask=mask
    )
    return grads, losses


def bptt_gradient(state, model, xs, targets, mask):
    """Exact gradient of a batch of sequences by back-propagation through time."""
    state = broadcast(state, xs.shape[1])
    return etrace.bptt_grad(
        cross_entropy, model, state, xs, targets, mask=mask, batched=True
    )


def train(
    label: str,
    step: Callable[..., tuple[Any, Any, Any, Any]],
    optim: Any,
    model: Any,
    key: Any,
    steps: int,
    every: int = 25,
) -> tuple[Any, np.ndarray, float, float]:
    """Trains a copy of `model` with `step(model, opt_state, key) -> (model,
    opt_state, key, loss)`; returns the model, the loss curve, the compile time and
    the seconds per step after compilation."""
    # Copies, so that donation cannot delete what the other methods start from.
    model = jtu.tree_map(lambda a: jnp.array(a) if eqx.is_array(a) else a, model)
    key = jr.clone(key)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    losses = []
    start = time.perf_counter()
    compiled_at = start
    bar = tqdm(range(steps), desc=f"{label:>9}", unit="step")
    for i in bar:
        model, opt_state, key, loss = step(model, opt_state, key)
        losses.append(loss)
        if i == 0:
            # The first call compiles; keep that out of the time per step.
            loss.block_until_ready()
            compiled_at = time.perf_counter()
        if i % every == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    jax.block_until_ready(losses)
    end = time.perf_counter()
    per_step = (end - compiled_at) / (steps - 1) if steps > 1 else end - start
    return model, np.asarray(jnp.stack(losses)), compiled_at - start, per_step


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints a table, the first column left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print()
    for row in [head, *rows]:
        first, *rest = zip(row, widths)
        print("  ".join([first[0].ljust(first[1])] + [c.rjust(w) for c, w in rest]))


def plot_losses(ax: Any, results: dict[str, dict[str, Any]], labels: dict) -> dict:
    """Each method's loss curve, faint, with a moving average on top; returns the
    colour of each method."""
    colors = {}
    for name, r in results.items():
        curve = r["losses"]
        window = max(1, min(25, len(curve) // 10))
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        (line,) = ax.plot(curve, alpha=0.25)
        colors[name] = line.get_color()
        ax.plot(
            np.arange(window - 1, len(curve)),
            smooth,
            color=colors[name],
            label=labels[name],
        )
    ax.set_xlabel("training step")
    return colors


def plot_accuracies(
    ax: Any, results: dict[str, dict[str, Any]], labels: dict, colors: dict, chance
) -> None:
    """A bar per method with its test accuracy, and the chance level."""
    names = list(results)
    accuracies = [results[n]["accuracy"] for n in names]
    ax.bar([labels[n] for n in names], accuracies, color=[colors[n] for n in names])
    for i, a in enumerate(accuracies):
        ax.text(i, a + 0.01, f"{a:.3f}", ha="center", va="bottom")
    ax.axhline(chance, color="grey", linestyle="--")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
