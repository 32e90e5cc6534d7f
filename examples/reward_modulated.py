r"""Reward-modulated learning: a recurrent network learns an evidence-accumulation
choice from a reward alone, with `etrace.ThreeFactor`, against the same network
trained with the supervised D-RTRL gradient.

**Task.** Each trial shows `--evidence-steps` steps of noisy evidence on `--options`
input channels: every channel carries Gaussian noise of standard deviation
`--noise`, and the channel of the correct option has `--signal` added to its mean.
A delay of `--delay` silent steps follows, then a go cue on a channel of its own,
and at that last step the network chooses an option. The choice is sampled from the
softmax of the readout (the policy $\pi$); the reward is 1 if it is the correct
option and 0 otherwise. The network never sees the correct option, only the reward
of the option it chose. Chance is `1 / --options`; an ideal observer that sums the
evidence of each channel and picks the largest sets the ceiling.

**Network.** An `etrace.nn.MinGRU` layer (its gate and candidate read only the
input, so the recurrence is element-wise and D-RTRL's traces are the exact
derivatives $\epsilon^t = \mathrm{d}h^t / \mathrm{d}W$) and a linear readout
$y = W_\text{out} h + b_\text{out}$.

**The rule.** The gradient of the expected reward $J = \mathbb{E}_{x,\, a \sim
\pi(\cdot \mid x)}[R]$ is $\nabla J = \mathbb{E}[(R - b)\, \nabla \log \pi(a
\mid x)]$ for any baseline $b$ that does not depend on the action $a$ (REINFORCE,
Williams 1992): $\mathbb{E}_a[b\, \nabla \log \pi(a)] = b\, \nabla \sum_a
\pi(a) = 0$. Here $b$ is a running mean of the rewards of earlier batches, updated
after each one, so it depends on nothing of the current trial. The reward itself is
never differentiated; only the log-probability of the action taken is.

With the choice at the last step $T$, $\log \pi(a)$ depends on a traced weight $W$
through $h^T$ only, so $\nabla_W \log \pi(a) = \frac{\partial \log
\pi(a)}{\partial h^T}\, \frac{\mathrm{d}h^T}{\mathrm{d}W}$. `etrace.ThreeFactor`
reads each step's trace out with a modulator, $\sum_t m^t \epsilon^t$: with

$$m^t = 0 \text{ for } t < T, \qquad m^T = -(R - b)\, \frac{\partial \log
  \pi(a)}{\partial h^T} = -(R - b)\, W_\text{out}^\top (e_a - \pi),$$

a global reward prediction error times a per-neuron factor of the choice, its
gradient is $-(R - b)\, \nabla_W \log \pi(a)$ exactly, since the traces are
exact here. The readout, which has no trace, gets the ordinary gradient of the loss
passed to `etrace.online_grad`, the surrogate $-(R - b) \log \pi(a)$ at step $T$
(`mask`), the same expression. Averaged over a batch this is an unbiased estimate of
$-\nabla J$, and Adam minimises it: the network climbs the expected reward. (On a
layer with recurrent weights D-RTRL's traces drop paths through other neurons, and
the estimate would be biased by that approximation.) `reinforce_gradient` below
computes it; `tests/test_examples.py` checks it against BPTT's gradient of the
surrogate.

The modulator needs the choice, and the choice needs the network's output at the
decision step: each training step runs the batch forward once to sample the actions
and deliver the rewards, then `etrace.online_grad` with the modulators. An agent
that acts step by step would, at the step of the choice, evaluate the model on that
step to sample the choice, then pass the modulator to `learner.step` for it.

**Reference.** The same initial network, on the same stream of trials, is trained
with `etrace.D_RTRL` on the cross-entropy of the correct option at the decision
step: the supervised gradient, which knows the correct option of every trial.

The script prints, per method, the probability of reward under the policy
($\pi$ of the correct option, the expected reward) and the greedy accuracy on
held-out trials, the reward over the last 100 training steps, the seconds per
training step and the trace memory, against chance and the ideal observer, and
saves the learning curves. Everything is generated; nothing is downloaded.

```
python examples/reward_modulated.py                # about 30 s on 2 CPUs
python examples/reward_modulated.py --options 2 --steps 1000
python examples/reward_modulated.py --steps 3 --batch 4 --hidden 8
```
"""

from __future__ import annotations

import argparse
import dataclasses
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
from tqdm import tqdm

import etrace
import etrace.nn as enn


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


# Hashable, so `eqx.filter_jit` treats it as static: shapes are known at trace time.
@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """The layout of a batch of trials: `options` evidence channels, then the go
    cue's channel."""

    options: int
    evidence_steps: int
    delay: int
    signal: float
    noise: float
    batch: int

    @property
    def n_in(self) -> int:
        return self.options + 1

    @property
    def num_steps(self) -> int:
        return self.evidence_steps + self.delay + 1

    def mask(self) -> Float[Array, " T"]:
        """Weight 1 on the decision step, the last, and 0 before it."""
        return jnp.zeros(self.num_steps, jnp.float32).at[-1].set(1.0)

    def sample(
        self, key: PRNGKeyArray, batch: int | None = None
    ) -> tuple[Float[Array, "T B C"], Int[Array, " B"]]:
        """Inputs `(T, B, options + 1)`, time first, and the correct options `(B,)`."""
        batch = self.batch if batch is None else batch
        label_key, noise_key = jr.split(key)
        labels = jr.randint(label_key, (batch,), 0, self.options)
        shape = (self.evidence_steps, batch, self.options)
        evidence = self.noise * jr.normal(noise_key, shape, jnp.float32)
        correct = jax.nn.one_hot(labels, self.options, dtype=jnp.float32)
        evidence = evidence + self.signal * correct[None]
        xs = jnp.zeros((self.num_steps, batch, self.n_in), jnp.float32)
        xs = xs.at[: self.evidence_steps, :, : self.options].set(evidence)
        xs = xs.at[-1, :, -1].set(1.0)  # the go cue
        return xs, labels

    def ideal_choice(self, xs: Float[Array, "T B C"]) -> Int[Array, " B"]:
        """The option with the most summed evidence: the best any observer does."""
        return jnp.argmax(jnp.sum(xs[:, :, : self.options], axis=0), axis=-1)


class Agent(eqx.Module):
    """A minGRU layer and a linear readout of the option scores."""

    cell: enn.MinGRU
    readout: eqx.nn.Linear

    def __init__(self, n_in: int, hidden: int, options: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.cell = enn.MinGRU(n_in, hidden, dtype=jnp.float32, key=k1)
        self.readout = eqx.nn.Linear(hidden, options, dtype=jnp.float32, key=k2)

    def __call__(self, x: Float[Array, " C"], h: Float[Array, " H"]):
        h = self.cell(x, h)
        return self.readout(h), h


def final_hidden(model: Agent, xs: Float[Array, "T B C"]) -> Float[Array, "B H"]:
    """The hidden state after the last step, for each trial of the batch."""

    def run(x_seq):
        h0 = jnp.zeros(model.cell.hidden_size, x_seq.dtype)
        h, _ = jax.lax.scan(lambda h, x: (model.cell(x, h), None), h0, x_seq)
        return h

    return jax.vmap(run, in_axes=1)(xs)


def policy_loss(y: Float[Array, " K"], target: tuple[Array, Array]) -> Array:
    """The REINFORCE surrogate of one trial, `-(R - b) log pi(a)`."""
    action, advantage = target
    return -advantage * jax.nn.log_softmax(y)[action]


def reinforce_gradient(
    learner: etrace.Learner,
    model: Agent,
    xs: Float[Array, "T B C"],
    actions: Int[Array, " B"],
    advantages: Float[Array, " B"],
) -> Agent:
    """`etrace.ThreeFactor`'s gradient for the actions taken at the last step and
    their advantages `R - b`: the batch mean of `-(R - b) grad log pi(a)`."""
    num_steps, batch = xs.shape[:2]
    h = final_hidden(model, xs)

    def log_prob(h, action):
        return jax.nn.log_softmax(model.readout(h))[action]

    eligibility = jax.vmap(jax.grad(log_prob))(h, actions)  # d log pi(a) / d h^T
    modulators = jnp.zeros((num_steps, *eligibility.shape), eligibility.dtype)
    modulators = modulators.at[-1].set(-advantages[:, None] * eligibility)
    targets = (
        jnp.broadcast_to(actions, (num_steps, batch)),
        jnp.broadcast_to(advantages, (num_steps, batch)),
    )
    mask = jnp.zeros(num_steps, xs.dtype).at[-1].set(1.0)
    grads, _, _ = etrace.online_grad(
        learner,
        policy_loss,
        model,
        learner.init(batch_size=batch),
        xs,
        targets,
        mask=mask,
        modulators=modulators,
    )
    return grads


def _apply(optim, grads, model, opt_state):
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state


# The first argument (learner, task, optimiser, baseline rate) is shared by every
# step; the rest is replaced by the outputs and donated.
@eqx.filter_jit(donate="all-except-first")
def reinforce_step(fixed, model, opt_state, key, baseline):
    """Samples a batch of trials and choices, delivers the rewards, and updates the
    network from the modulated traces and the baseline from the rewards."""
    learner, task, optim, baseline_rate = fixed
    key, data_key, action_key = jr.split(key, 3)
    xs, labels = task.sample(data_key)
    logits = jax.vmap(model.readout)(final_hidden(model, xs))
    actions = jr.categorical(action_key, logits)
    rewards = (actions == labels).astype(jnp.float32)
    grads = reinforce_gradient(learner, model, xs, actions, rewards - baseline)
    model, opt_state = _apply(optim, grads, model, opt_state)
    # After the update: the baseline of a trial never depends on its own choice.
    baseline = baseline + baseline_rate * (jnp.mean(rewards) - baseline)
    expected = jnp.mean(jnp.take_along_axis(jax.nn.softmax(logits), labels[:, None], 1))
    return model, opt_state, key, baseline, (jnp.mean(rewards), expected)


@eqx.filter_jit(donate="all-except-first")
def supervised_step(fixed, model, opt_state, key, baseline):
    """D-RTRL's gradient of the cross-entropy of the correct option."""
    learner, task, optim, _ = fixed
    # Split as `reinforce_step` does, so that both see the same trials.
    key, data_key, _ = jr.split(key, 3)
    xs, labels = task.sample(data_key)
    logits = jax.vmap(model.readout)(final_hidden(model, xs))
    targets = jnp.broadcast_to(labels, xs.shape[:2])
    grads, _, _ = etrace.online_grad(
        learner,
        _common.cross_entropy,
        model,
        learner.init(batch_size=xs.shape[1]),
        xs,
        targets,
        mask=task.mask(),
    )
    model, opt_state = _apply(optim, grads, model, opt_state)
    probabilities = jax.nn.softmax(logits)
    expected = jnp.mean(jnp.take_along_axis(probabilities, labels[:, None], 1))
    # No choice is sampled: the reward it would get on average.
    return model, opt_state, key, baseline, (expected, expected)


@eqx.filter_jit
def evaluate(model, xs, labels):
    """The expected reward (pi of the correct option) and the greedy accuracy."""
    probabilities = jax.nn.softmax(jax.vmap(model.readout)(final_hidden(model, xs)))
    expected = jnp.mean(jnp.take_along_axis(probabilities, labels[:, None], 1))
    accuracy = jnp.mean(jnp.argmax(probabilities, axis=-1) == labels)
    return expected, accuracy


LABELS = {"three_factor": "ThreeFactor (reward)", "d_rtrl": "D-RTRL (supervised)"}
STEPS = {"three_factor": reinforce_step, "d_rtrl": supervised_step}


def train(name: str, fixed, model, key, steps: int, chance: float):
    """Trains a copy of `model`; returns it, the rewards and expected rewards of
    every step, the compile time and the seconds per step after compilation."""
    model = jax.tree.map(lambda a: jnp.array(a) if eqx.is_array(a) else a, model)
    key = jr.clone(key)
    opt_state = fixed[2].init(eqx.filter(model, eqx.is_inexact_array))
    baseline = jnp.asarray(chance, jnp.float32)
    curves = []
    start = compiled_at = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{LABELS[name]:>20}", unit="step")
    for i in bar:
        model, opt_state, key, baseline, measured = STEPS[name](
            fixed, model, opt_state, key, baseline
        )
        curves.append(measured)
        if i == 0:  # the first call compiles; keep it out of the time per step
            jax.block_until_ready(measured)
            compiled_at = time.perf_counter()
        if i % 25 == 0 or i == steps - 1:
            bar.set_postfix(reward=f"{float(measured[0]):.3f}")
    curves = np.asarray(jax.device_get(curves))  # (steps, 2)
    end = time.perf_counter()
    per_step = (end - compiled_at) / (steps - 1) if steps > 1 else end - start
    return model, curves[:, 0], curves[:, 1], compiled_at - start, per_step


def plot(results, chance: float, ideal: float, title: str, out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        curve = r["expected_rewards"]
        window = max(1, min(50, len(curve) // 10))
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        (line,) = ax.plot(r["rewards"], alpha=0.2)
        ax.plot(
            np.arange(window - 1, len(curve)),
            smooth,
            color=line.get_color(),
            label=LABELS[name],
        )
    ax.axhline(chance, color="grey", linestyle="--", label="chance")
    ax.axhline(ideal, color="black", linestyle=":", label="ideal observer")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward per trial")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=1500, help="training steps")
    training.add_argument("--batch", type=int, default=32, help="trials per step")
    training.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    training.add_argument(
        "--baseline-rate",
        type=float,
        default=0.05,
        help="step size of the running mean of the rewards",
    )
    training.add_argument("--test-size", type=int, default=2000, help="test trials")
    training.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=32, help="minGRU units")
    task = parser.add_argument_group("task")
    task.add_argument("--options", type=int, default=3, help="options to choose from")
    task.add_argument(
        "--evidence-steps", type=int, default=10, help="steps of evidence"
    )
    task.add_argument("--delay", type=int, default=5, help="steps before the go cue")
    task.add_argument(
        "--signal", type=float, default=0.5, help="mean evidence of the correct option"
    )
    task.add_argument("--noise", type=float, default=1.0, help="evidence noise")
    parser.add_argument("--plot", default="reward_modulated.png", help="output PNG")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(LABELS),
        default=list(LABELS),
        help="methods to train (default: both)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.hidden < 1:
        parser.error("--steps, --batch and --hidden must be at least 1")
    if args.options < 2:
        parser.error("--options must be at least 2")
    if args.evidence_steps < 1 or args.delay < 0:
        parser.error("--evidence-steps must be >= 1 and --delay >= 0")
    if not 0 < args.baseline_rate <= 1:
        parser.error("--baseline-rate must lie in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns the results per method, chance and the ideal
    observer's accuracy."""
    args = parse_args(argv)
    task = ChoiceTask(
        options=args.options,
        evidence_steps=args.evidence_steps,
        delay=args.delay,
        signal=args.signal,
        noise=args.noise,
        batch=args.batch,
    )
    model_key, data_key, test_key = jr.split(jr.key(args.seed), 3)
    model = Agent(task.n_in, args.hidden, args.options, key=model_key)
    optim = optax.adam(args.lr)
    test_xs, test_labels = task.sample(test_key, batch=args.test_size)
    chance = 1 / args.options
    ideal = float(jnp.mean(task.ideal_choice(test_xs) == test_labels))
    print(
        f"choice task: {args.options} options, {args.evidence_steps} steps of "
        f"evidence, delay {args.delay}, T={task.num_steps}; minGRU {args.hidden}, "
        f"batch {args.batch}, {args.steps} steps; chance {chance:.3f}, ideal "
        f"observer {ideal:.3f}",
        flush=True,
    )
    algorithms = {"three_factor": etrace.ThreeFactor(), "d_rtrl": etrace.D_RTRL()}
    sample = jnp.zeros(task.n_in, jnp.float32)
    state = jnp.zeros(args.hidden, jnp.float32)
    results = {}
    wall = time.perf_counter()
    for name in args.methods:
        learner, _ = etrace.compile(
            model, sample, state=state, algorithm=algorithms[name]
        )
        fixed = (learner, task, optim, args.baseline_rate)
        trained, rewards, expected, compile_s, per_step = train(
            name, fixed, model, data_key, args.steps, chance
        )
        test_expected, accuracy = evaluate(trained, test_xs, test_labels)
        window = min(100, args.steps)
        results[name] = dict(
            rewards=rewards,
            expected_rewards=expected,
            train_reward=float(np.mean(rewards[-window:])),
            expected_reward=float(test_expected),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
            compile_seconds=compile_s,
            memory_bytes=_common.memory_bytes(learner, state, task.num_steps),
        )
    wall = time.perf_counter() - wall

    head = (
        "method",
        "test reward",
        "test acc.",
        "train reward",
        "s/step",
        "first call s",
        "traces/trial",
    )
    rows = [
        (
            LABELS[n],
            f"{r['expected_reward']:.3f}",
            f"{r['accuracy']:.3f}",
            f"{r['train_reward']:.3f}",
            f"{r['seconds_per_step']:.4f}",
            f"{r['compile_seconds']:.1f}",
            f"{r['memory_bytes'] / 1024:.1f} KiB",
        )
        for n, r in results.items()
    ]
    rows.append(("chance", f"{chance:.3f}", f"{chance:.3f}", "", "", "", ""))
    rows.append(("ideal observer", "", f"{ideal:.3f}", "", "", "", ""))
    _common.print_table(head, rows)
    print(
        "test reward: probability of reward under the policy on held-out trials; "
        "test acc.: its greedy choice; train reward: mean of the last "
        f"{min(100, args.steps)} steps (sampled choices for ThreeFactor, the "
        "expected reward for supervised D-RTRL)"
    )
    print(f"wall time {wall:.1f} s")
    title = f"{args.options}-option choice, minGRU {args.hidden}"
    plot(results, chance, ideal, title, args.plot)
    print(f"saved {args.plot}")
    return dict(results=results, chance=chance, ideal=ideal)


if __name__ == "__main__":
    main()
