"""An online-trained recurrent block inside a larger Equinox model, with a frozen
part and checkpoints that resume exactly.

The model reads scikit-learn's 8x8 digits one row per step (8 steps per digit):

    row (8) -> frozen random projection -> MLP encoder -> GRU cell -> linear head

* The **projection** is an `eqx.nn.Linear` that is never trained. It is split off
  with `eqx.partition` and a filter spec built with `eqx.tree_at`; only the other
  part is differentiated and handed to optax, the usual Equinox way to freeze
  weights. The learner is compiled for the whole model and runs the recombined one
  (`eqx.combine`).
* The **encoder** (`eqx.nn.MLP`) and the **head** are trained in the same optax step
  as the GRU, from the same call to `learner.step`: differentiating a loss of the
  step's output gives every trainable leaf its gradient. `print(learner)` shows
  their roles. The head reaches no hidden state: it gets the ordinary gradient of
  the step ("one-step"). The encoder's output reaches the GRU's state only through
  the GRU's input weights, which carry the traces; the encoder itself has no trace
  and is marked "one-step*", and `etrace.compile` says so with an
  `etrace.EtraceWarning` (printed below, not an error). "one-step*" means: at
  step `t` the encoder receives the gradient of step `t`'s loss through the path
  of step `t` only (back through the GRU's input weights at `t`), not through the
  effect its output at earlier steps had on today's hidden state. It is the
  gradient that truncated BPTT with a window of one step would give it. Any number
  of feed-forward layers may sit before a traced block this way; to trace a layer
  over time, give it a hidden state of its own.
* The **GRU** (`eqx.nn.GRUCell`) is trained with D-RTRL traces (`--algorithm` picks
  another).

Training is online on streams: `--batch` streams of digits run side by side and the
hidden state and the traces are **never reset** between digits. Each optimiser step
takes the next digit of every stream (8 steps of `learner.step`, the gradient of
the loss at the digit's last row, summed as `etrace.online_grad` does) and applies
one Adam update. The trace state is therefore part of the training state, like the
model and the optimiser moments.

**Checkpoints.** At step `--checkpoint-at` the script writes the trainable part of
the model, the optax state, the trace state and the step counter with
`eqx.tree_serialise_leaves`, and keeps training to `--steps`. Then, as a restarted
process would, it rebuilds the model from the seed (the frozen projection comes
back as it was), reads the checkpoint into that skeleton with
`eqx.tree_deserialise_leaves`, and trains again from there. The two
final models are compared leaf by leaf: resuming reproduces the uninterrupted run
exactly (every data batch is drawn from `fold_in(key, step)`, so the step counter
is all the data pipeline needs). As a control, a third run resumes the model and
optimiser but starts from a fresh trace state (`learner.init`: initial hidden
state, zero traces), and ends elsewhere.

The digits ship with scikit-learn (`sklearn.datasets.load_digits`): no download.

```
python examples/equinox_embedding.py              # about 30 s on 2 CPUs
python examples/equinox_embedding.py --algorithm es_d_rtrl
python examples/equinox_embedding.py --steps 4 --batch 4 --hidden 8
```
"""

from __future__ import annotations

import argparse
import math
import pathlib
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import _common  # shared with the other examples
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import matplotlib
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits
from tqdm import tqdm

import etrace


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


ROW = 8  # pixels per row, and rows (steps) per digit
N_CLASSES = 10


class Classifier(eqx.Module):
    """Frozen projection, MLP encoder, GRU and a linear head."""

    projection: eqx.nn.Linear
    encoder: eqx.nn.MLP
    cell: eqx.nn.GRUCell
    head: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, features: int, hidden: int, *, key: PRNGKeyArray):
        kp, ke, kc, kh = jr.split(key, 4)
        # float32 throughout, even where a caller has enabled x64.
        f32 = jnp.float32
        self.projection = eqx.nn.Linear(
            ROW, features, use_bias=False, dtype=f32, key=kp
        )
        self.encoder = eqx.nn.MLP(
            features,
            features,
            width_size=features,
            depth=1,
            activation=jax.nn.gelu,
            dtype=f32,
            key=ke,
        )
        self.cell = eqx.nn.GRUCell(features, hidden, dtype=f32, key=kc)
        self.head = eqx.nn.Linear(hidden, N_CLASSES, dtype=f32, key=kh)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden, f32))

    def __call__(self, row: Float[Array, " 8"], state: eqx.nn.State):
        features = self.encoder(jnp.tanh(self.projection(row)))
        h = self.cell(features, state.get(self.h))
        return self.head(h), state.set(self.h, h)


def trainable_spec(model: Classifier) -> Any:
    """`True` on the leaves optax trains, `False` on the frozen projection."""
    spec = jtu.tree_map(eqx.is_inexact_array, model)
    return eqx.tree_at(lambda m: m.projection.weight, spec, replace=False)


def cross_entropy(y: Float[Array, " K"], target: Int[Array, ""]) -> Float[Array, ""]:
    return optax.softmax_cross_entropy_with_integer_labels(y, target)


# Only the step's loss weights (the last row of a digit) and the batch of rows are
# data; the learner, optimiser and frozen part are fixed.
def digit_gradient(learner, trainable, frozen, trace_state, rows, labels):
    """The online gradient of one digit per stream, 8 steps, traces carried on.

    `rows` is `(8, B, 8)`, time first. Returns the gradient of the trainable part,
    the trace state after the digit, and the loss at the last row.
    """
    step = jax.vmap(learner.step, in_axes=(None, 0, 0))
    weights = jnp.zeros(ROW, jnp.float32).at[-1].set(1.0)

    def step_loss(trainable, ts, row, weight):
        model = eqx.combine(trainable, frozen)
        y, ts = step(model, ts, row)
        loss = jnp.mean(jax.vmap(cross_entropy)(y, labels))
        return weight * loss, (ts, loss)

    grad_fn = eqx.filter_grad(step_loss, has_aux=True)

    def body(carry, inputs):
        ts, total = carry
        row, weight = inputs
        grads, (ts, loss) = grad_fn(trainable, ts, row, weight)
        return (ts, jtu.tree_map(jnp.add, total, grads)), loss

    zeros = jtu.tree_map(jnp.zeros_like, trainable)
    (trace_state, grads), losses = jax.lax.scan(
        body, (trace_state, zeros), (rows, weights)
    )
    return grads, trace_state, losses[-1]


class TrainState(eqx.Module):
    """Everything that changes during training: the checkpoint's contents."""

    trainable: Any
    opt_state: Any
    trace_state: etrace.TraceState
    step: Int[Array, ""]


@eqx.filter_jit
def train_step(fixed, train_state: TrainState) -> tuple[TrainState, Array, Any]:
    learner, optim, frozen, key, images, labels, batch = fixed
    s = train_state
    idx = jr.choice(jr.fold_in(key, s.step), images.shape[0], (batch,))
    # (B, 64) images -> (8, B, 8): one row per step, time first.
    rows = jnp.transpose(images[idx].reshape(batch, ROW, ROW), (1, 0, 2))
    grads, trace_state, loss = digit_gradient(
        learner, s.trainable, frozen, s.trace_state, rows, labels[idx]
    )
    updates, opt_state = optim.update(grads, s.opt_state, s.trainable)
    trainable = eqx.apply_updates(s.trainable, updates)
    return TrainState(trainable, opt_state, trace_state, s.step + 1), loss, grads


def run(fixed, train_state: TrainState, stop: int, desc: str, checkpoint=None):
    """Trains until `train_state.step == stop`; optionally saves a checkpoint.

    `checkpoint` is `(step, path)`: where to write one on the way.
    """
    losses = []
    grad_norms = None
    start = int(train_state.step)
    first = time.perf_counter()
    compiled_at = first
    bar = tqdm(range(start, stop), desc=desc, unit="step")
    for i in bar:
        if checkpoint is not None and i == checkpoint[0]:
            eqx.tree_serialise_leaves(checkpoint[1], train_state)
        train_state, loss, grads = train_step(fixed, train_state)
        losses.append(loss)
        if i == start:
            loss.block_until_ready()
            compiled_at = time.perf_counter()
            # Gradient norm of each block at the first step: the encoder's and the
            # head's come from the same `learner.step` as the GRU's.
            grad_norms = {
                name: float(optax.global_norm(getattr(grads, name)))
                for name in ("encoder", "cell", "head")
            }
        if i % 50 == 0 or i == stop - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    jax.block_until_ready(train_state)
    end = time.perf_counter()
    steps = stop - start
    per_step = (end - compiled_at) / (steps - 1) if steps > 1 else end - first
    curve = np.asarray(jnp.stack(losses)) if losses else np.zeros(0)
    return train_state, curve, per_step, grad_norms


@eqx.filter_jit
def evaluate(model, state, streams):
    """Accuracy on test streams `(D, S, 64)`: D digits after one another per
    stream, the hidden state carried from digit to digit as in training."""
    n_digits, n_streams, _ = streams.shape
    # (D, S, 64) -> (D, 8, S, 8) -> (8 D, S, 8): one row per step, time first.
    rows = streams.reshape(n_digits, n_streams, ROW, ROW).transpose(0, 2, 1, 3)
    rows = rows.reshape(n_digits * ROW, n_streams, ROW)
    state = jtu.tree_map(lambda a: jnp.broadcast_to(a, (n_streams,) + a.shape), state)

    def body(s, row):
        y, s = jax.vmap(model)(row, s)
        return s, y

    _, ys = jax.lax.scan(body, state, rows)
    last = ys.reshape(n_digits, ROW, n_streams, N_CLASSES)[:, -1]
    return jnp.argmax(last, axis=-1)


def max_difference(a: Any, b: Any) -> float:
    leaves = jtu.tree_leaves(jtu.tree_map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
    return float(max(leaves))


def plot(
    curve: np.ndarray, resumed: np.ndarray, control: np.ndarray, start: int, out: str
) -> None:
    fig, (ax, diff) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, min(25, len(curve) // 10))

    def smooth(c: np.ndarray) -> np.ndarray:
        return np.convolve(c, np.ones(window) / window, mode="valid")

    after = np.arange(start, start + len(resumed))
    ax.plot(
        np.arange(window - 1, len(curve)),
        smooth(curve),
        color="tab:blue",
        label="uninterrupted",
    )
    for label, c, style, color in (
        ("resumed from checkpoint", resumed, "--", "tab:orange"),
        ("resumed, fresh trace state", control, ":", "tab:green"),
    ):
        kw = dict(linestyle=style, color=color, label=label)
        ax.plot(after[window - 1 :], smooth(c), **kw)
        diff.plot(after, np.abs(c - curve[start:]), **kw)
    ax.axhline(math.log(N_CLASSES), color="grey", linestyle=":", label="chance")
    ax.axvline(start, color="black", linewidth=0.8)
    ax.set_xlabel("optimiser step (one digit per stream)")
    ax.set_ylabel("cross-entropy at the last row")
    ax.set_title("projection -> MLP -> GRU -> head, digits row by row", fontsize=10)
    ax.legend()
    diff.set_xlabel("optimiser step")
    diff.set_ylabel("|loss - uninterrupted loss|")
    diff.set_title("after the checkpoint", fontsize=10)
    diff.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


ALGORITHMS = {
    "d_rtrl": lambda args: etrace.D_RTRL(),
    "es_d_rtrl": lambda args: etrace.ES_D_RTRL(decay=args.decay),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps")
    parser.add_argument(
        "--checkpoint-at", type=int, default=None, help="default: half of --steps"
    )
    parser.add_argument("--batch", type=int, default=32, help="parallel streams")
    parser.add_argument("--hidden", type=int, default=64, help="GRU hidden size")
    parser.add_argument(
        "--features", type=int, default=32, help="projection and encoder width"
    )
    parser.add_argument(
        "--algorithm", choices=list(ALGORITHMS), default="d_rtrl", help="for the GRU"
    )
    parser.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL decay")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--train-size", type=int, default=1500, help="training images")
    parser.add_argument(
        "--digits-per-stream", type=int, default=9, help="test digits per stream"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint file (default: a temporary one)"
    )
    parser.add_argument("--plot", default="equinox_embedding.png", help="output PNG")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.checkpoint_at is None:
        args.checkpoint_at = args.steps // 2
    if not 0 < args.checkpoint_at < args.steps:
        parser.error("--checkpoint-at must lie strictly between 0 and --steps")
    if not 0 < args.train_size < 1797:
        parser.error("--train-size must lie between 1 and 1796")
    if not 1 <= args.digits_per_stream <= 1797 - args.train_size:
        parser.error("--digits-per-stream must lie between 1 and the test size")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains, checkpoints, resumes; returns the numbers of the summary."""
    args = parse_args(argv)
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(args.seed).permutation(len(labels))
    train_idx, test_idx = order[: args.train_size], order[args.train_size :]
    n_streams = len(test_idx) // args.digits_per_stream
    test_idx = test_idx[: n_streams * args.digits_per_stream]
    test_streams = jnp.asarray(images[test_idx]).reshape(
        args.digits_per_stream, n_streams, ROW * ROW
    )
    test_labels = labels[test_idx].reshape(args.digits_per_stream, n_streams)

    model_key, data_key = jr.split(jr.key(args.seed))
    model, state = eqx.nn.make_with_state(Classifier)(
        args.features, args.hidden, key=model_key
    )
    trainable, frozen = eqx.partition(model, trainable_spec(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", etrace.EtraceWarning)
        learner, _ = etrace.compile(
            model,
            jnp.zeros(ROW, jnp.float32),
            state=state,
            algorithm=ALGORITHMS[args.algorithm](args),
        )
    print(learner)
    for w in caught:
        print(f"\n{w.category.__name__}: {w.message}")
    optim = optax.adam(args.lr)
    train_images = jnp.asarray(images[train_idx])
    train_labels = jnp.asarray(labels[train_idx])

    def fixed_with(frozen: Any) -> tuple[Any, ...]:
        """What every training step shares."""
        return (
            learner,
            optim,
            frozen,
            data_key,
            train_images,
            train_labels,
            args.batch,
        )

    def fresh(trainable: Any) -> TrainState:
        return TrainState(
            trainable,
            optim.init(trainable),
            learner.init(batch_size=args.batch),
            jnp.zeros((), jnp.int32),
        )

    print(
        f"\ndigits row by row: {len(train_idx)} train / {len(test_idx)} test images; "
        f"{args.batch} streams, {args.steps} optimiser steps of one digit each, "
        f"checkpoint at step {args.checkpoint_at}; {args.algorithm} on the GRU",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(args.checkpoint or pathlib.Path(tmp) / "checkpoint.eqx")
        wall = time.perf_counter()
        full, curve, per_step, grad_norms = run(
            fixed_with(frozen),
            fresh(trainable),
            args.steps,
            "uninterrupted",
            checkpoint=(args.checkpoint_at, path),
        )
        # As a new process would: rebuild the model from the seed (the frozen
        # projection comes back as it was), and use it, fresh optimiser and trace
        # states as the skeleton that the checkpoint's leaves overwrite. Build it by
        # `make_with_state` like the original, which moves the initial hidden state
        # out of the model: a model built directly still holds it in `h` and would
        # have one leaf too many.
        rebuilt, _ = eqx.nn.make_with_state(Classifier)(
            args.features, args.hidden, key=model_key
        )
        skeleton_trainable, frozen_again = eqx.partition(
            rebuilt, trainable_spec(rebuilt)
        )
        skeleton = fresh(skeleton_trainable)
        restored = eqx.tree_deserialise_leaves(path, skeleton)
        size = path.stat().st_size
    fixed = fixed_with(frozen_again)
    resumed, resumed_curve, _, _ = run(fixed, restored, args.steps, "resumed")
    control = eqx.tree_at(
        lambda s: s.trace_state, restored, learner.init(batch_size=args.batch)
    )
    control, control_curve, _, _ = run(
        fixed, control, args.steps, "resumed, fresh trace state"
    )
    wall = time.perf_counter() - wall

    def accuracy(s: TrainState) -> float:
        predicted = evaluate(eqx.combine(s.trainable, frozen), state, test_streams)
        return float(np.mean(np.asarray(predicted) == test_labels))

    def count(tree: Any) -> int:
        return sum(x.size for x in jtu.tree_leaves(eqx.filter(tree, eqx.is_array)))

    summary = dict(
        losses=curve,
        accuracy=accuracy(full),
        loss=float(np.mean(curve[-50:])),
        seconds_per_step=per_step,
        resume_difference=max_difference(full.trainable, resumed.trainable),
        fresh_traces_difference=max_difference(full.trainable, control.trainable),
        resumed_accuracy=accuracy(resumed),
        fresh_traces_accuracy=accuracy(control),
        first_step_grad_norms=grad_norms,
        trainable_parameters=count(trainable),
        frozen_parameters=count(frozen),
        checkpoint_bytes=size,
    )

    print()
    head = ("run", "test acc.", "max |param - uninterrupted|")
    rows = [
        ("uninterrupted", f"{summary['accuracy']:.3f}", "-"),
        (
            f"resumed at step {args.checkpoint_at}",
            f"{summary['resumed_accuracy']:.3f}",
            f"{summary['resume_difference']:.3g}",
        ),
        (
            "resumed, fresh trace state",
            f"{summary['fresh_traces_accuracy']:.3f}",
            f"{summary['fresh_traces_difference']:.3g}",
        ),
    ]
    _common.print_table(head, rows)
    print(
        "resumed run identical to the uninterrupted one: "
        f"{'yes' if summary['resume_difference'] == 0 else 'NO'}"
    )
    norms = ", ".join(f"{k} {v:.3g}" for k, v in grad_norms.items())
    print(f"gradient norms at the first step: {norms}")
    print(
        f"parameters: {summary['trainable_parameters']} trained, "
        f"{summary['frozen_parameters']} frozen (the projection, never differentiated)"
    )
    print(
        f"train loss (last 50 steps) {summary['loss']:.3f}, "
        f"{per_step:.4f} s/step, checkpoint {size / 1024:.1f} KiB, "
        f"chance accuracy {1 / N_CLASSES:.2f}"
    )
    print(f"wall time {wall:.1f} s")

    plot(curve, resumed_curve, control_curve, args.checkpoint_at, args.plot)
    print(f"saved {args.plot}")
    return summary


if __name__ == "__main__":
    main()
