"""Spiking digits: a recurrent LIF/ALIF network trained online with ES-D-RTRL and
e-prop, against BPTT, on scikit-learn's 8x8 handwritten digits.

Each of the 64 pixels of an image becomes an input channel that spikes at every step
with probability `max_rate * intensity` (Bernoulli rate coding, a fresh draw for
every training batch). A recurrent layer of LIF (or ALIF) neurons reads the input and
its own previous spikes through one `eqx.nn.Linear`, as on the `docs/nn.md` page; a
linear map and a leaky integrator (`etrace.nn.LeakyRateReadout`) read the spikes out
into 10 class scores. The loss is the cross-entropy of the readout at every step of
the second half of the sequence (a per-step `mask`: the first half lets the readout
integrate evidence), the same for every method. The prediction is the arg-max of the
readout averaged over those steps.

The same initial network is trained with Adam from gradients computed online by
`etrace.online_grad` (ES-D-RTRL, and e-prop with its filter set to the readout's
leak) and by back-propagation through time with `etrace.bptt_grad`. Every method sees
the same stream of batches and spike trains. The script prints test accuracy, final
training loss, seconds per training step and the hidden layer's firing rate of each
method, and saves the training-loss curves and test accuracies.

The digits ship with scikit-learn (`sklearn.datasets.load_digits`): no download.

```
python examples/snn_digits.py                     # about 30 s on 2 CPUs
python examples/snn_digits.py --neuron alif       # adaptive thresholds, ~75 s
python examples/snn_digits.py --steps 3 --batch 8 --hidden 16 --time-steps 6
```
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import _common  # shared with the other examples
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray
from sklearn.datasets import load_digits

import etrace
import etrace.nn as enn


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


N_IN = 64
N_CLASSES = 10
TAU = 10.0  # membrane time constant, in steps
KAPPA = math.exp(-1 / 5.0)  # the readout's leak: a 5-step time constant


class SpikingNet(eqx.Module):
    """A recurrent spiking layer, a linear map and a leaky readout.

    The recurrent layer reads `[x^t; z^{t-1}]` through one `eqx.nn.Linear`, so its
    weight is recurrent: the online algorithms approximate its gradient.
    """

    synapses: eqx.nn.Linear
    neuron: enn.LIF | enn.ALIF
    readout: eqx.nn.Linear
    output: enn.LeakyRateReadout

    def __init__(self, hidden: int, neuron: str, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        # float32 throughout, even where a caller has enabled x64.
        f32 = jnp.float32
        synapses = eqx.nn.Linear(N_IN + hidden, hidden, dtype=f32, key=k1)
        # Stock initialisation, with the input weights scaled up so that rate-coded
        # digits drive the layer over threshold from the first step of training.
        scale = jnp.concatenate([jnp.full(N_IN, 3.0, f32), jnp.ones(hidden, f32)])
        self.synapses = eqx.tree_at(
            lambda s: s.weight, synapses, synapses.weight * scale[None, :]
        )
        if neuron == "lif":
            self.neuron = enn.LIF(hidden, tau=TAU, threshold=0.5, dtype=f32)
        else:
            self.neuron = enn.ALIF(
                hidden, tau=TAU, tau_adapt=20.0, beta=0.5, threshold=0.5, dtype=f32
            )
        self.readout = eqx.nn.Linear(hidden, N_CLASSES, dtype=f32, key=k2)
        self.output = enn.LeakyRateReadout(N_CLASSES, kappa=KAPPA, dtype=f32)

    def __call__(self, x: Float[Array, " 64"], state: eqx.nn.State):
        previous = self.neuron.spikes(state)  # z^{t-1}
        current = self.synapses(jnp.concatenate([x, previous]))
        z, state = self.neuron(current, state)
        return self.output(self.readout(z), state)


# Hashable, so `eqx.filter_jit` treats it as static: shapes are known at trace time.
@dataclasses.dataclass(frozen=True)
class Encoding:
    """How a batch of images becomes spike trains, and which steps the loss sees."""

    time_steps: int
    batch: int
    max_rate: float

    def mask(self) -> Float[Array, " T"]:
        """Weight 1 on the second half of the sequence, 0 on the first."""
        return (jnp.arange(self.time_steps) >= self.time_steps // 2).astype(jnp.float32)

    def spikes(
        self, key: PRNGKeyArray, images: Float[Array, "B 64"]
    ) -> Float[Array, "T B 64"]:
        shape = (self.time_steps, *images.shape)
        rates = jnp.broadcast_to(self.max_rate * images, shape)
        return jr.bernoulli(key, rates).astype(jnp.float32)

    def sample(
        self, key: PRNGKeyArray, images: Float[Array, "N 64"], labels: Int[Array, " N"]
    ) -> tuple[Float[Array, "T B 64"], Int[Array, "T B"]]:
        """A random batch (without replacement) as spike trains, time first."""
        pick_key, spike_key = jr.split(key)
        idx = jr.choice(pick_key, images.shape[0], (self.batch,), replace=False)
        xs = self.spikes(spike_key, images[idx])
        targets = jnp.broadcast_to(labels[idx], (self.time_steps, self.batch))
        return xs, targets


# The first argument (gradient method, data set, encoding, optimiser) is shared by
# every step; everything else is replaced by the outputs, so donating it lets XLA
# update the parameters, the optimiser moments and the key in place.
@eqx.filter_jit(donate="all-except-first")
def train_step(fixed, model, opt_state, key):
    gradient, encoding, optim, images, labels = fixed
    key, data_key = jr.split(key)
    xs, targets = encoding.sample(data_key, images, labels)
    mask = encoding.mask()
    grads, losses = gradient(model, xs, targets, mask)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    loss = jnp.sum(losses * mask) / jnp.sum(mask)
    return model, opt_state, key, loss


@eqx.filter_jit
def evaluate(model, state, mask, xs, labels):
    """Test accuracy and the hidden layer's mean firing rate (spikes per step)."""

    def body(s, x):
        y, s = jax.vmap(model)(x, s)
        return s, (y, jax.vmap(model.neuron.spikes)(s))

    _, (ys, zs) = jax.lax.scan(body, _common.broadcast(state, xs.shape[1]), xs)
    scores = jnp.einsum("t,tbk->bk", mask, ys)
    accuracy = jnp.mean(jnp.argmax(scores, axis=-1) == labels)
    return accuracy, jnp.mean(zs)


LABELS = {"es_d_rtrl": "ES-D-RTRL", "eprop": "e-prop", "bptt": "BPTT"}


def train(name, fixed, model, key, steps):
    """Trains a copy of `model`; returns it, the loss curve and timings."""

    def step(model, opt_state, key):
        return train_step(fixed, model, opt_state, key)

    return _common.train(LABELS[name], step, fixed[2], model, key, steps, every=20)


def plot(results: dict[str, dict[str, Any]], title: str, out: str) -> None:
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[2, 1])
    )
    colors = _common.plot_losses(ax, results, LABELS)
    ax.axhline(math.log(N_CLASSES), color="grey", linestyle="--", label="chance")
    ax.set_ylabel("cross-entropy (second half)")
    ax.set_title(title)
    ax.legend()
    _common.plot_accuracies(bars, results, LABELS, colors, 1 / N_CLASSES)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def load(seed: int, n_train: int) -> tuple[np.ndarray, ...]:
    """The digits scaled to [0, 1], shuffled with `seed` and split train/test."""
    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    train, test = order[:n_train], order[n_train:]
    return images[train], labels[train], images[test], labels[test]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--hidden", type=int, default=64, help="spiking neurons")
    parser.add_argument(
        "--neuron", choices=("lif", "alif"), default="lif", help="neuron model"
    )
    parser.add_argument(
        "--time-steps", type=int, default=20, help="steps per spike train"
    )
    parser.add_argument(
        "--max-rate", type=float, default=0.5, help="spike probability of a white pixel"
    )
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL decay")
    parser.add_argument("--train-size", type=int, default=1500, help="training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="snn_digits.png", help="output PNG")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(LABELS),
        default=list(LABELS),
        help="methods to train (default: all)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.time_steps < 2:
        parser.error("--time-steps must be at least 2")
    if not 0 < args.max_rate <= 1:
        parser.error("--max-rate must lie in (0, 1]")
    if not 0 < args.train_size < 1797:
        parser.error("--train-size must lie between 1 and 1796")
    if args.batch > args.train_size:
        parser.error("--batch cannot exceed --train-size")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the comparison; returns, per method, its loss curve and final numbers."""
    args = parse_args(argv)
    train_x, train_y, test_x, test_y = load(args.seed, args.train_size)
    encoding = Encoding(args.time_steps, args.batch, args.max_rate)
    model_key, data_key, test_key = jr.split(jr.key(args.seed), 3)
    model, state = eqx.nn.make_with_state(SpikingNet)(
        args.hidden, args.neuron, key=model_key
    )
    optim = optax.adam(args.lr)
    images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    # One fixed draw of spike trains for the test set, shared by every method.
    test_xs = encoding.spikes(test_key, jnp.asarray(test_x))
    test_labels = jnp.asarray(test_y)
    print(
        f"digits: {len(train_y)} train / {len(test_y)} test images as {args.time_steps}"
        f"-step spike trains; recurrent {args.neuron.upper()} x {args.hidden}, "
        f"batch {args.batch}, {args.steps} steps; chance accuracy "
        f"{1 / N_CLASSES:.2f}, loss {math.log(N_CLASSES):.3f}",
        flush=True,
    )

    algorithms = {
        "es_d_rtrl": etrace.ES_D_RTRL(decay=args.decay),
        # e-prop's filter is the readout's leak, exp(-1/tau).
        "eprop": etrace.EProp(
            feedback="symmetric", kappa=math.exp(-1 / model.output.tau)
        ),
    }
    results = {}
    wall = time.perf_counter()
    for name in args.methods:
        if name == "bptt":
            gradient = eqx.Partial(_common.bptt_gradient, state)
            memory = _common.memory_bytes(None, state, args.time_steps)
        else:
            sample = jnp.zeros(N_IN, jnp.float32)
            learner, _ = etrace.compile(
                model, sample, state=state, algorithm=algorithms[name]
            )
            gradient = eqx.Partial(_common.online_gradient, learner)
            memory = _common.memory_bytes(learner, state, args.time_steps)
        fixed = (gradient, encoding, optim, images, labels)
        trained, losses, compile_s, per_step = train(
            name, fixed, model, data_key, args.steps
        )
        accuracy, rate = evaluate(trained, state, encoding.mask(), test_xs, test_labels)
        window = min(20, len(losses))
        results[name] = dict(
            losses=losses,
            loss=float(np.mean(losses[-window:])),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
            compile_seconds=compile_s,
            firing_rate=float(rate),
            memory_bytes=memory,
        )
    wall = time.perf_counter() - wall

    head = ("method", "test acc.", "train loss", "s/step", "first call s", "rate")
    rows = [
        (
            LABELS[n],
            f"{r['accuracy']:.3f}",
            f"{r['loss']:.3f}",
            f"{r['seconds_per_step']:.4f}",
            f"{r['compile_seconds']:.1f}",
            f"{r['firing_rate']:.3f}",
        )
        for n, r in results.items()
    ]
    _common.print_table(head, rows)
    print(
        "train loss: mean of the last 20 steps; rate: hidden spikes per neuron and "
        "step on the test set"
    )
    print(f"wall time {wall:.1f} s")

    title = f"Spiking digits, recurrent {args.neuron.upper()} x {args.hidden}"
    plot(results, title, args.plot)
    print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
