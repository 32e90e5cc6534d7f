"""Evidence accumulation: a recurrent LIF + ALIF network trained online with e-prop
and ES-D-RTRL, against BPTT, on the cue-accumulation task of e-prop.

The task is the one of Bellec et al. (2020, "A solution to the learning dilemma for
recurrent networks of spiking neurons", Fig. 3), scaled down to run in minutes on a
CPU. The input neurons form four populations of `--population` neurons each: left,
right, recall and noise. A sequence shows `--cues` cues, each a burst of Poisson
spikes (a Bernoulli draw per step) from the left or the right population for
`--cue-steps` steps followed by `--gap-steps` silent steps; then comes a delay of
`--delay` steps; then the recall population fires for `--recall-steps` steps. The
noise population fires at a low rate throughout. The network must answer, during the
recall window, which side showed more cues (the number of cues is odd, so there is
no tie). Chance is an accuracy of 0.5 and a cross-entropy of log 2 = 0.693.

The network is an LSNN (long short-term memory spiking network, Bellec et al.
2018): one recurrent layer whose neurons are partly LIF and partly ALIF. An ALIF
neuron's threshold rises after its spikes and relaxes over `--tau-adapt` steps, a
memory much longer than the membrane's `--tau`. Each population gets its input
current from an `eqx.nn.Linear` that reads the input and the previous spikes of the
whole layer, the recurrent layer of the `docs/nn.md` page with one map per
population; a linear map and a leaky integrator (`etrace.nn.LeakyRateReadout`) give
two scores. The loss is the cross-entropy of the readout on the recall steps only:
the per-step `mask` of `etrace.online_grad` is 1 there and 0 elsewhere, so the cue
and delay steps only advance hidden state and traces. The answer is the arg-max of
the readout summed over the recall window.

The same initial network is trained with Adam (the gradient's global norm clipped
to `--clip`) from gradients computed online by `etrace.online_grad` (e-prop with its
filter `kappa` set to the readout's leak, and ES-D-RTRL) and by back-propagation
through time with `etrace.bptt_grad`. Every method sees the same stream of batches.
The script prints, per method, the test accuracy and loss on held-out sequences, the
training loss at the end, seconds per training step, the hidden firing rate and the
memory per example (an online algorithm's traces; for BPTT the hidden state of
every step, the least its backward pass keeps), and saves the learning curves and
test accuracies.

Everything is generated; nothing is downloaded.

```
python examples/evidence_accumulation.py             # about 2.5 min on 2 CPUs
python examples/evidence_accumulation.py --methods eprop bptt --steps 500
python examples/evidence_accumulation.py --steps 3 --batch 4 --lif 4 --alif 4
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

import etrace
import etrace.nn as enn


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


N_CLASSES = 2


class LSNN(eqx.Module):
    """A recurrent layer of LIF and ALIF neurons, a linear map and a leaky readout.

    Each population gets its input current from an `eqx.nn.Linear` that reads
    `[x^t; z_lif^{t-1}; z_alif^{t-1}]`: the input and the previous spikes of the
    whole layer. Both weights are recurrent, so the online algorithms approximate
    their gradients; the readout's are exact.
    """

    to_lif: eqx.nn.Linear
    to_alif: eqx.nn.Linear
    lif: enn.LIF
    alif: enn.ALIF
    readout: eqx.nn.Linear
    output: enn.LeakyRateReadout

    def __init__(
        self,
        n_in: int,
        n_lif: int,
        n_alif: int,
        *,
        tau: float,
        tau_adapt: float,
        beta: float,
        tau_out: float,
        input_scale: float,
        key: PRNGKeyArray,
    ):
        k1, k2, k3 = jr.split(key, 3)
        # float32 throughout, even where a caller has enabled x64.
        f32 = jnp.float32
        n_rec = n_lif + n_alif
        # Stock initialisation, with the input weights scaled up so that the sparse
        # cue spikes drive the layer over threshold from the first step of training.
        scale = jnp.concatenate(
            [jnp.full(n_in, input_scale, f32), jnp.ones(n_rec, f32)]
        )

        def synapses(n_out: int, key: PRNGKeyArray) -> eqx.nn.Linear:
            linear = eqx.nn.Linear(n_in + n_rec, n_out, dtype=f32, key=key)
            return eqx.tree_at(
                lambda s: s.weight, linear, linear.weight * scale[None, :]
            )

        # Two maps rather than one split in two: a weight op feeding two hidden
        # groups is traced once per group over all of its outputs, so splitting
        # one would double the traces of D-RTRL and e-prop.
        self.to_lif = synapses(n_lif, k1)
        self.to_alif = synapses(n_alif, k2)
        self.lif = enn.LIF(n_lif, tau=tau, threshold=0.5, dtype=f32)
        self.alif = enn.ALIF(
            n_alif,
            tau=tau,
            tau_adapt=tau_adapt,
            beta=beta,
            threshold=0.5,
            dtype=f32,
        )
        self.readout = eqx.nn.Linear(n_rec, N_CLASSES, dtype=f32, key=k3)
        self.output = enn.LeakyRateReadout(N_CLASSES, tau=tau_out, dtype=f32)

    def spikes(self, state: eqx.nn.State) -> Float[Array, " n_rec"]:
        """The spikes of the last step, LIF then ALIF."""
        return jnp.concatenate([self.lif.spikes(state), self.alif.spikes(state)])

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        inputs = jnp.concatenate([x, self.spikes(state)])  # [x^t; z^{t-1}]
        z_lif, state = self.lif(self.to_lif(inputs), state)
        z_alif, state = self.alif(self.to_alif(inputs), state)
        z = jnp.concatenate([z_lif, z_alif])
        return self.output(self.readout(z), state)


# Hashable, so `eqx.filter_jit` treats it as static: shapes are known at trace time.
@dataclasses.dataclass(frozen=True)
class CueTask:
    """The layout of a batch of cue-accumulation sequences.

    Input channels: `population` left neurons, then right, recall and noise.
    """

    cues: int
    cue_steps: int
    gap_steps: int
    delay: int
    recall_steps: int
    population: int
    cue_rate: float
    noise_rate: float
    batch: int

    @property
    def n_in(self) -> int:
        return 4 * self.population

    @property
    def recall_start(self) -> int:
        return self.cues * (self.cue_steps + self.gap_steps) + self.delay

    @property
    def num_steps(self) -> int:
        return self.recall_start + self.recall_steps

    def mask(self) -> Float[Array, " T"]:
        """Weight 1 on the recall window, 0 before it."""
        steps = jnp.arange(self.num_steps)
        return (steps >= self.recall_start).astype(jnp.float32)

    def sample(
        self, key: PRNGKeyArray, batch: int | None = None
    ) -> tuple[Float[Array, "T B C"], Int[Array, "T B"]]:
        """Spike inputs `(T, B, 4 * population)` and labels `(T, B)`, time first.

        The label is 1 if the right population showed more cues, else 0.
        """
        batch = self.batch if batch is None else batch
        side_key, spike_key = jr.split(key)
        sides = jr.bernoulli(side_key, 0.5, (self.cues, batch)).astype(jnp.int32)
        steps = jnp.arange(self.num_steps)
        period = self.cue_steps + self.gap_steps
        # Which cue each step belongs to (clipped past the last), and whether the
        # step lies within the cue's burst rather than in the gap after it.
        index = jnp.minimum(steps // period, self.cues - 1)
        in_cue = (steps % period < self.cue_steps) & (steps < self.cues * period)
        side = sides[index]  # (T, B)
        active = in_cue[:, None].astype(jnp.float32)
        left = active * (1 - side)
        right = active * side
        recall = jnp.broadcast_to(
            (steps >= self.recall_start)[:, None].astype(jnp.float32),
            (self.num_steps, batch),
        )
        rate = jnp.stack(
            [
                self.cue_rate * left,
                self.cue_rate * right,
                self.cue_rate * recall,
                jnp.full((self.num_steps, batch), self.noise_rate),
            ],
            axis=-1,
        )  # (T, B, 4): the rate of each population
        rate = jnp.repeat(rate, self.population, axis=-1)
        xs = jr.bernoulli(spike_key, rate).astype(jnp.float32)
        label = (2 * jnp.sum(sides, axis=0) > self.cues).astype(jnp.int32)
        targets = jnp.broadcast_to(label, (self.num_steps, batch))
        return xs, targets


# The first argument (gradient method, task, optimiser) is shared by every step;
# everything else is replaced by the outputs, so donating it lets XLA update the
# parameters, the optimiser moments and the key in place.
@eqx.filter_jit(donate="all-except-first")
def train_step(fixed, model, opt_state, key):
    gradient, task, optim = fixed
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
def evaluate(model, state, mask, xs, labels):
    """Recall loss, accuracy and the hidden firing rate (spikes per neuron-step)."""

    def body(s, x):
        y, s = jax.vmap(model)(x, s)
        return s, (y, jax.vmap(model.spikes)(s))

    _, (ys, zs) = jax.lax.scan(body, _common.broadcast(state, xs.shape[1]), xs)
    targets = jnp.broadcast_to(labels, ys.shape[:2])
    losses = jax.vmap(jax.vmap(_common.cross_entropy))(ys, targets)
    loss = jnp.einsum("t,tb->", mask, losses) / (jnp.sum(mask) * xs.shape[1])
    scores = jnp.einsum("t,tbk->bk", mask, ys)
    accuracy = jnp.mean(jnp.argmax(scores, axis=-1) == labels)
    return loss, accuracy, jnp.mean(zs)


LABELS = {"eprop": "e-prop", "es_d_rtrl": "ES-D-RTRL", "bptt": "BPTT"}


def train(name, fixed, model, key, steps):
    """Trains a copy of `model`; returns it, the loss curve and timings."""

    def step(model, opt_state, key):
        return train_step(fixed, model, opt_state, key)

    return _common.train(LABELS[name], step, fixed[2], model, key, steps, every=25)


def plot(results: dict[str, dict[str, Any]], title: str, out: str) -> None:
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[2, 1])
    )
    colors = _common.plot_losses(ax, results, LABELS)
    ax.axhline(math.log(N_CLASSES), color="grey", linestyle="--", label="chance")
    ax.set_ylabel("cross-entropy (recall window)")
    ax.set_title(title)
    ax.legend()
    _common.plot_accuracies(bars, results, LABELS, colors, 1 / N_CLASSES)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=1000, help="training steps")
    training.add_argument("--batch", type=int, default=32, help="sequences per step")
    training.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    training.add_argument(
        "--clip", type=float, default=1.0, help="gradient global-norm bound"
    )
    training.add_argument("--decay", type=float, default=0.9, help="ES-D-RTRL decay")
    training.add_argument("--test-size", type=int, default=1000, help="test sequences")
    training.add_argument("--seed", type=int, default=0)
    net = parser.add_argument_group("network")
    net.add_argument("--lif", type=int, default=25, help="LIF neurons")
    net.add_argument("--alif", type=int, default=25, help="ALIF neurons")
    net.add_argument("--tau", type=float, default=10.0, help="membrane time constant")
    net.add_argument(
        "--tau-adapt", type=float, default=100.0, help="adaptation time constant"
    )
    net.add_argument("--beta", type=float, default=1.8, help="adaptation strength")
    net.add_argument("--tau-out", type=float, default=5.0, help="readout time constant")
    net.add_argument(
        "--input-scale", type=float, default=3.0, help="input weight multiplier"
    )
    task = parser.add_argument_group("task (all lengths in steps)")
    task.add_argument("--cues", type=int, default=5, help="cues (odd)")
    task.add_argument("--cue-steps", type=int, default=4, help="length of a cue")
    task.add_argument("--gap-steps", type=int, default=4, help="pause after a cue")
    task.add_argument("--delay", type=int, default=30, help="delay before recall")
    task.add_argument("--recall-steps", type=int, default=5, help="recall window")
    task.add_argument(
        "--population", type=int, default=5, help="input neurons per population"
    )
    task.add_argument(
        "--cue-rate", type=float, default=0.3, help="spike probability in a cue"
    )
    task.add_argument(
        "--noise-rate", type=float, default=0.05, help="spike probability of noise"
    )
    parser.add_argument(
        "--plot", default="evidence_accumulation.png", help="output PNG"
    )
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
    if args.cues < 1 or args.cues % 2 == 0:
        parser.error("--cues must be odd, so that one side always has more")
    if min(args.cue_steps, args.recall_steps, args.population) < 1:
        parser.error("--cue-steps, --recall-steps and --population must be >= 1")
    if min(args.gap_steps, args.delay) < 0:
        parser.error("--gap-steps and --delay cannot be negative")
    if min(args.lif, args.alif) < 1:
        parser.error("--lif and --alif must be at least 1")
    for name in ("cue_rate", "noise_rate"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Runs the comparison; returns, per method, its loss curve and final numbers."""
    args = parse_args(argv)
    task = CueTask(
        cues=args.cues,
        cue_steps=args.cue_steps,
        gap_steps=args.gap_steps,
        delay=args.delay,
        recall_steps=args.recall_steps,
        population=args.population,
        cue_rate=args.cue_rate,
        noise_rate=args.noise_rate,
        batch=args.batch,
    )
    model_key, data_key, test_key = jr.split(jr.key(args.seed), 3)
    model, state = eqx.nn.make_with_state(LSNN)(
        task.n_in,
        args.lif,
        args.alif,
        tau=args.tau,
        tau_adapt=args.tau_adapt,
        beta=args.beta,
        tau_out=args.tau_out,
        input_scale=args.input_scale,
        key=model_key,
    )
    optim = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(args.lr))
    test_xs, test_targets = task.sample(test_key, batch=args.test_size)
    test_labels = test_targets[0]
    print(
        f"cue accumulation: {args.cues} cues, delay {args.delay}, recall "
        f"{args.recall_steps}, T={task.num_steps}, {task.n_in} inputs; LSNN "
        f"{args.lif} LIF + {args.alif} ALIF, batch {args.batch}, {args.steps} "
        f"steps; chance accuracy 0.5, loss {math.log(N_CLASSES):.3f}",
        flush=True,
    )

    algorithms = {
        # e-prop's filter is the readout's leak, exp(-1/tau_out).
        "eprop": etrace.EProp(
            feedback="symmetric", kappa=math.exp(-1 / model.output.tau)
        ),
        "es_d_rtrl": etrace.ES_D_RTRL(decay=args.decay),
    }
    sample = jnp.zeros(task.n_in, jnp.float32)
    results = {}
    wall = time.perf_counter()
    for name in args.methods:
        if name == "bptt":
            gradient = eqx.Partial(_common.bptt_gradient, state)
            memory = _common.memory_bytes(None, state, task.num_steps)
        else:
            learner, _ = etrace.compile(
                model, sample, state=state, algorithm=algorithms[name]
            )
            gradient = eqx.Partial(_common.online_gradient, learner)
            memory = _common.memory_bytes(learner, state, task.num_steps)
        fixed = (gradient, task, optim)
        trained, losses, compile_s, per_step = train(
            name, fixed, model, data_key, args.steps
        )
        loss, accuracy, rate = evaluate(
            trained, state, task.mask(), test_xs, test_labels
        )
        window = min(50, len(losses))
        results[name] = dict(
            losses=losses,
            train_loss=float(np.mean(losses[-window:])),
            loss=float(loss),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
            compile_seconds=compile_s,
            firing_rate=float(rate),
            memory_bytes=int(memory),
        )
    wall = time.perf_counter() - wall

    head = (
        "method",
        "test acc.",
        "test loss",
        "train loss",
        "s/step",
        "first call s",
        "rate",
        "memory/example",
    )
    rows = [
        (
            LABELS[n],
            f"{r['accuracy']:.3f}",
            f"{r['loss']:.3f}",
            f"{r['train_loss']:.3f}",
            f"{r['seconds_per_step']:.4f}",
            f"{r['compile_seconds']:.1f}",
            f"{r['firing_rate']:.3f}",
            f"{r['memory_bytes'] / 1024:.1f} KiB",
        )
        for n, r in results.items()
    ]
    _common.print_table(head, rows)
    print(
        "test: held-out sequences; train loss: mean of the last 50 steps; rate: "
        "hidden spikes per neuron and step on the test set; memory: the online "
        "algorithm's traces, or for BPTT the hidden states of all T steps"
    )
    print(f"chance: accuracy 0.500, loss {math.log(N_CLASSES):.3f}")
    print(f"wall time {wall:.1f} s")

    title = f"Cue accumulation, LSNN {args.lif} LIF + {args.alif} ALIF"
    plot(results, title, args.plot)
    print(f"saved {args.plot}")
    return results


if __name__ == "__main__":
    main()
