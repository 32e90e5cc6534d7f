"""The copy task: an LRU stack and a GRU trained online with eligibility traces,
against BPTT.

Each sequence shows `length` random symbols, then `delay` blanks, then a recall cue;
on the `length` steps after the cue the network must reproduce the symbols in order.
The loss is the cross-entropy on those recall steps only: they get weight 1 in the
per-step `mask`, every other step weight 0 (the state still advances there). Since
every sequence of a batch has the same layout, a per-step mask is all that is
needed.

Two models (`--models`): a stack of two residual `etrace.nn.Block`s around
`etrace.nn.LRU` (a complex diagonal recurrence) between an embedding and a linear
readout, and a GRU built from stock Equinox layers. Each is trained from the same
initial network with Adam on gradients computed online by `etrace.online_grad` and
by back-propagation through time with `etrace.bptt_grad`: the LRU stack with D-RTRL,
the GRU with D-RTRL and ES-D-RTRL (where the installed etrace has it). Every method
sees the same stream of batches. The script prints the recall loss and accuracy of
each on held-out sequences and the time per training step, and saves the
training-loss curves.

On the LRU's element-wise recurrence D-RTRL's diagonal trace is the whole influence
of a weight on the state, so the online gradient of the top block is exact; the
GRU's recurrent weights couple its neurons, and D-RTRL keeps only the diagonal of
that influence.

```
python examples/copying_task.py                       # about a minute on 2 CPUs
python examples/copying_task.py --models gru          # the GRU alone
python examples/copying_task.py --steps 3 --hidden 8  # smoke test
```
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import _common  # shared with the other examples
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

import etrace


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Net(eqx.Module):
    """A GRU with a linear readout, its hidden state declared the Equinox way."""

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


# Hashable, so `eqx.filter_jit` treats it as static and the shapes it implies are
# known at trace time.
@dataclasses.dataclass(frozen=True)
class CopyTask:
    """The layout of one batch of copy-task sequences.

    Input channels are the `alphabet` symbols, then blank, then the recall cue.
    """

    alphabet: int
    length: int
    delay: int
    batch: int

    @property
    def n_in(self) -> int:
        return self.alphabet + 2

    @property
    def cue(self) -> int:
        return self.length + self.delay

    @property
    def num_steps(self) -> int:
        return self.cue + 1 + self.length

    def mask(self) -> Float[Array, " T"]:
        return (jnp.arange(self.num_steps) > self.cue).astype(jnp.float32)

    def sample(
        self, key: PRNGKeyArray, batch: int | None = None
    ) -> tuple[Float[Array, "T B C"], Int[Array, "T B"]]:
        """Inputs `(T, B, alphabet + 2)` and integer targets `(T, B)`, time first."""
        batch = self.batch if batch is None else batch
        symbols = jr.randint(key, (self.length, batch), 0, self.alphabet, jnp.int32)
        blank = jnp.full((self.num_steps, batch), self.alphabet, jnp.int32)
        tokens = (
            blank.at[: self.length].set(symbols).at[self.cue].set(self.alphabet + 1)
        )
        xs = jax.nn.one_hot(tokens, self.n_in, dtype=jnp.float32)
        # Targets off the recall steps carry zero weight; 0 is just a valid label.
        targets = jnp.zeros((self.num_steps, batch), jnp.int32)
        targets = targets.at[self.cue + 1 :].set(symbols)
        return xs, targets


# Everything but the gradient method (which holds the learner's initial state, shared
# between calls) is replaced by the outputs, so donating it lets XLA update the
# parameters, the optimiser moments and the key in place.
@eqx.filter_jit(donate="all-except-first")
def train_step(gradient, task, optim, model, opt_state, key):
    key, data_key = jr.split(key)
    xs, targets = task.sample(data_key)
    mask = task.mask()
    grads, losses = gradient(model, xs, targets, mask)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    loss = jnp.sum(losses * mask) / jnp.sum(mask)
    return model, opt_state, key, loss


@eqx.filter_jit
def evaluate(model, state, task, xs, targets):
    """Recall cross-entropy and accuracy, from a plain forward pass."""

    def body(s, x):
        y, s = jax.vmap(model)(x, s)
        return s, y

    _, ys = jax.lax.scan(body, _common.broadcast(state, xs.shape[1]), xs)
    weight = task.mask()[:, None] / (jnp.sum(task.mask()) * xs.shape[1])
    loss = jnp.sum(jax.vmap(jax.vmap(_common.cross_entropy))(ys, targets) * weight)
    accuracy = jnp.sum((jnp.argmax(ys, axis=-1) == targets) * weight)
    return loss, accuracy


def available_algorithms(decay: float) -> dict[str, Any]:
    algorithms = {"d_rtrl": etrace.D_RTRL()}
    # ES-D-RTRL may be missing from an older etrace; the example then runs without it.
    if hasattr(etrace, "ES_D_RTRL"):
        algorithms["es_d_rtrl"] = etrace.ES_D_RTRL(decay=decay)
    return algorithms


LABELS = {
    "d_rtrl": "GRU D-RTRL",
    "es_d_rtrl": "GRU ES-D-RTRL",
    "bptt": "GRU BPTT",
    "lru_d_rtrl": "LRU D-RTRL",
    "lru_bptt": "LRU BPTT",
}


def train(name, gradient, task, optim, model, key, steps):
    """Trains a copy of `model`; returns it, the loss curve and timings."""

    def step(model, opt_state, key):
        return train_step(gradient, task, optim, model, opt_state, key)

    return _common.train(LABELS[name], step, optim, model, key, steps)


def plot(results: dict[str, dict[str, Any]], chance: float, out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    _common.plot_losses(ax, results, LABELS)
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.set_ylabel("recall cross-entropy")
    ax.set_title("Copy task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["lru", "gru"],
        default=["lru", "gru"],
        help="the LRU stack (D-RTRL, BPTT) and the GRU (every method)",
    )
    parser.add_argument(
        "--hidden", type=int, default=64, help="GRU hidden size, LRU stack width"
    )
    parser.add_argument(
        "--lru-steps",
        type=int,
        default=300,
        help="training steps of the LRU stack (at most --steps; it learns fast)",
    )
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--length", type=int, default=5, help="symbols to copy")
    parser.add_argument("--delay", type=int, default=10, help="blanks before the cue")
    parser.add_argument("--alphabet", type=int, default=8, help="number of symbols")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="copying_task.png", help="loss-curve PNG")
    parser.add_argument(
        "--algorithms",
        nargs="+",
        choices=["bptt", "d_rtrl", "es_d_rtrl"],
        default=None,
        help="GRU methods to train (default: every one this etrace has, and bptt)",
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.lru_steps) < 1:
        parser.error("--steps and --lru-steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the comparison; returns, per method (`lru_*` for the LRU stack), its
    loss curve and final numbers."""
    args = parse_args(argv)
    online = available_algorithms(args.decay)
    names = args.algorithms or [*online, "bptt"]
    missing = [n for n in names if n != "bptt" and n not in online]
    if missing:
        raise SystemExit(f"This version of etrace does not provide {missing}.")

    task = CopyTask(args.alphabet, args.length, args.delay, args.batch)
    model_key, data_key, eval_key = jr.split(jr.key(args.seed), 3)
    models = {
        "gru": eqx.nn.make_with_state(Net)(
            task.n_in, args.hidden, args.alphabet, key=model_key
        ),
        "lru": eqx.nn.make_with_state(_common.lru_stack)(
            task.n_in, args.hidden, 2, args.alphabet, key=jr.fold_in(model_key, 1)
        ),
    }
    runs = [("lru", m) for m in ("d_rtrl", "bptt") if "lru" in args.models]
    runs += [("gru", m) for m in names if "gru" in args.models]
    optim = optax.adam(args.lr)
    eval_xs, eval_targets = task.sample(eval_key, batch=1000)
    chance = math.log(args.alphabet)
    print(
        f"copy task: {args.length} symbols of {args.alphabet}, delay {args.delay}, "
        f"T={task.num_steps}; GRU hidden {args.hidden} / LRU stack width "
        f"{args.hidden}, batch {args.batch}, {args.steps} steps (LRU stack "
        f"{min(args.steps, args.lru_steps)}); chance loss "
        f"{chance:.3f}",
        flush=True,
    )

    results = {}
    wall = time.perf_counter()
    for kind, method in runs:
        name = method if kind == "gru" else f"lru_{method}"
        model, state = models[kind]
        if method == "bptt":
            gradient = eqx.Partial(_common.bptt_gradient, state)
            memory = _common.memory_bytes(None, state, task.num_steps)
        else:
            sample = jnp.zeros(task.n_in, jnp.float32)
            # The LRU stack's embedding and lower MLP are learned one-step, which
            # `etrace.compile` warns about; `learner.summary()` lists them.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", etrace.EtraceWarning)
                learner, _ = etrace.compile(
                    model, sample, state=state, algorithm=online[method]
                )
            gradient = eqx.Partial(_common.online_gradient, learner)
            memory = _common.memory_bytes(learner, state, task.num_steps)
        steps = args.steps if kind == "gru" else min(args.steps, args.lru_steps)
        trained, losses, compile_s, per_step = train(
            name, gradient, task, optim, model, data_key, steps
        )
        loss, accuracy = evaluate(trained, state, task, eval_xs, eval_targets)
        results[name] = dict(
            losses=losses,
            loss=float(loss),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
            compile_seconds=compile_s,
            memory_bytes=memory,
        )
    wall = time.perf_counter() - wall

    head = ("method", "eval loss", "recall acc.", "s/step", "first call s")
    rows = [
        (
            LABELS[n],
            f"{r['loss']:.3f}",
            f"{r['accuracy']:.3f}",
            f"{r['seconds_per_step']:.4f}",
            f"{r['compile_seconds']:.1f}",
        )
        for n, r in results.items()
    ]
    _common.print_table(head, rows)
    print(f"chance loss {chance:.3f}, accuracy {1 / args.alphabet:.3f}")
    print(f"wall time {wall:.1f} s")

    plot(results, chance, args.out)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
