"""Pieces the training examples share: the training loop with its progress bar and
timings, the memory figure reported per method, the summary table and the plots, the
digits data set as sequences, and stacks of residual blocks around recurrent layers.

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
from jaxtyping import Array, Complex, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits
from tqdm import tqdm

import etrace
import etrace.nn as enn


N_DIGITS = 10  # classes of scikit-learn's digits


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


def compiled_bytes(f: Callable, *args: Any) -> int:
    """The memory XLA plans for `jax.jit(f)(*args)`: its arguments, outputs and
    temporaries, from the compiled executable (nothing runs)."""
    stats = jax.jit(f).lower(*args).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
    )


def load_digits_split(seed: int, n_train: int) -> tuple[jax.Array, ...]:
    """scikit-learn's 8x8 digits scaled to [0, 1], shuffled with `seed` and split
    into `(train images, train labels, test images, test labels)`."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[:n_train], order[n_train:]
    parts = (images[train], labels[train], images[test], labels[test])
    return tuple(jnp.asarray(a) for a in parts)


def digit_sequences(images: Float[Array, "B 64"], steps: int) -> Float[Array, "T B P"]:
    """Images as sequences, time first: `steps` steps of `64 // steps` pixels."""
    return jnp.transpose(images.reshape(images.shape[0], steps, -1), (1, 0, 2))


def sample_digits(key, images, labels, batch: int, steps: int):
    """A random batch of digit sequences (without replacement) and their labels at
    every step."""
    idx = jr.choice(key, images.shape[0], (batch,), replace=False)
    xs = digit_sequences(images[idx], steps)
    return xs, jnp.broadcast_to(labels[idx], (steps, batch))


def last_step(steps: int) -> Float[Array, " T"]:
    """The per-step loss mask that scores the last step only."""
    return (jnp.arange(steps) == steps - 1).astype(jnp.float32)


@eqx.filter_jit(donate="all-except-first")
def digits_train_step(fixed, model, opt_state, key):
    """One Adam step on a batch of digits named at the last step; `fixed` is
    `(gradient, optim, images, labels, batch, steps)`."""
    gradient, optim, images, labels, batch, steps = fixed
    key, data_key = jr.split(key)
    xs, targets = sample_digits(data_key, images, labels, batch, steps)
    grads, losses = gradient(model, xs, targets, last_step(steps))
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, key, losses[-1]


@eqx.filter_jit
def digits_accuracy(model, state, images, labels, steps: int) -> Float[Array, ""]:
    """Accuracy of the prediction at the last step, from a plain forward pass."""
    xs = digit_sequences(images, steps)

    def body(s, x):
        y, s = jax.vmap(model)(x, s)
        return s, y

    _, ys = jax.lax.scan(body, broadcast(state, xs.shape[1]), xs)
    return jnp.mean(jnp.argmax(ys[-1], axis=-1) == labels)


class LRUCell(eqx.Module):
    """`etrace.nn.LRU` as a cell for `etrace.nn.Block`: called as `cell(x, h) ->
    (y, h')` with the LRU's real output `y` and its new complex state `h'`, which has
    as many units as the input has features."""

    lru: enn.LRU

    @property
    def input_size(self) -> int:
        return self.lru.input_size

    @property
    def hidden_size(self) -> int:
        return self.lru.hidden_size

    def __call__(self, x: Float[Array, " n"], h: Complex[Array, " n"]):
        h = self.lru(x, h)
        return self.lru.output(x, h), h


def lru_block(width: int, *, r_min: float, r_max: float, key: PRNGKeyArray):
    """A residual `etrace.nn.Block` around an LRU of `width` complex units."""
    k_lru, k_block = jr.split(key)
    cell = LRUCell(enn.LRU(width, width, r_min=r_min, r_max=r_max, key=k_lru))
    block = enn.Block(cell, key=k_block)
    # The block sizes its state after a real cell; the LRU's state is complex.
    index = eqx.nn.StateIndex(cell.lru.initial_hidden())
    return eqx.tree_at(lambda b: b.index, block, index)


def lru_stack(
    n_in: int,
    width: int,
    depth: int,
    n_out: int,
    *,
    r_min: float = 0.9,
    r_max: float = 0.999,
    key: PRNGKeyArray,
) -> eqx.nn.Sequential:
    """An embedding, `depth` LRU blocks, a layer norm and a linear readout; build it
    with `eqx.nn.make_with_state`."""
    keys = jr.split(key, depth + 2)
    blocks = [lru_block(width, r_min=r_min, r_max=r_max, key=k) for k in keys[:depth]]
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(n_in, width, key=keys[-2]),
            *blocks,
            eqx.nn.LayerNorm(width, use_weight=False, use_bias=False),
            eqx.nn.Linear(width, n_out, key=keys[-1]),
        ]
    )
