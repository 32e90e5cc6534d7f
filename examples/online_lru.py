"""Online learning where it matters: a stack of LRU blocks trained with D-RTRL on long
delays, against BPTT, and on scikit-learn's digits read one pixel at a time.

The model is an embedding (`eqx.nn.Linear`), `--depth` residual `etrace.nn.Block`s
around `etrace.nn.LRU` (a complex diagonal recurrence of `--width` units), a layer norm
and a linear readout. The same initial network is trained with Adam (gradient norm
clipped to 1, learning rate decayed to zero by a cosine) on D-RTRL's online gradient
(`etrace.online_grad`) and on BPTT's (`etrace.bptt_grad`) from the same batches. For
the copy task the LRU's eigenvalue moduli start on a ring whose time constants
`1 / (1 - r)` span one to ten delays (`--r-min`, `--r-max` to choose it): what the
first symbol leaves in the state must still be there at the cue.

* **Copy task** (`copying_task.CopyTask`): recall `--length` symbols after each delay
  of `--delays`. For every delay the training step of both methods is compiled, not
  run, and XLA's plan for it gives its memory (arguments, outputs and temporaries, from
  `jax.jit(step).lower(...).compile().memory_analysis()`): D-RTRL's traces do not grow
  with the delay, BPTT keeps every step for its backward pass. The script also
  searches the first delay at which BPTT needs `--ratio` times D-RTRL's memory. At the
  delays of `--train-delays` (default: all) both methods are trained and their recall
  accuracy on held-out sequences is reported.
* **Pixel-by-pixel digits**: each 8x8 image is a sequence of 64 steps of one pixel,
  named at the last step; the LRU stack with D-RTRL and BPTT, beside a GRU
  (`eqx.nn.GRUCell`) with D-RTRL and ES-D-RTRL.

On the top block D-RTRL is exact; the embedding, the MLPs below it and the LRU's
read-out below it are learned one-step, and the bottom LRU learns with a signal that
misses the top block's memory (`learner.summary()` lists which is which).

```
python examples/online_lru.py --train-delays 100 1000     # 23 min on 2 CPUs
python examples/online_lru.py                             # and at 5000: 1 h more
python examples/online_lru.py --delays 3 6 --train-delays 3 --steps 2 \\
    --digit-steps 2 --width 8 --gru-hidden 8 --batch 4    # smoke test
```
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import _common  # shared with the other examples
import copying_task
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
import optax

import etrace


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


PIXELS = 64  # time steps of a digit: one pixel per step
METHODS = {"d_rtrl": "D-RTRL", "bptt": "BPTT"}  # of the copy task's LRU stack
LABELS = {
    "lru_d_rtrl": "LRU D-RTRL",
    "lru_bptt": "LRU BPTT",
    "gru_d_rtrl": "GRU D-RTRL",
    "gru_es_d_rtrl": "GRU ES-D-RTRL",
}


def gradient_of(method: str, model, state, n_in: int, decay: float = 0.9):
    """The gradient function `(model, xs, targets, mask) -> (grads, losses)` of
    `method` (`"bptt"`, `"d_rtrl"` or `"es_d_rtrl"`)."""
    if method == "bptt":
        return eqx.Partial(_common.bptt_gradient, state)
    algorithm = etrace.D_RTRL() if method == "d_rtrl" else etrace.ES_D_RTRL(decay)
    with warnings.catch_warnings():  # the one-step* parameters, listed above
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        learner, _ = etrace.compile(
            model, jnp.zeros(n_in, jnp.float32), state=state, algorithm=algorithm
        )
    return eqx.Partial(_common.online_gradient, learner)


def copy_step_bytes(gradient, task, optim, model) -> int:
    """Compiled memory of one copy-task training step (batch generation, gradient,
    Adam update), with the network, the optimiser state and the key as arguments."""
    dynamic, static = eqx.partition((gradient, model), eqx.is_array)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    def step(dynamic, opt_state, key):
        gradient, model = eqx.combine(dynamic, static)
        return copying_task.train_step(gradient, task, optim, model, opt_state, key)

    return _common.compiled_bytes(step, dynamic, opt_state, jr.key(0))


def copy_memory(args, delay: int) -> dict[str, int]:
    """Compiled step memory of both methods at one delay."""
    task = copying_task.CopyTask(args.alphabet, args.length, delay, args.batch)
    model, state = _lru_model(args, task.n_in, args.alphabet, delay)
    optim = optimiser(args, args.steps)
    return {
        method: copy_step_bytes(
            gradient_of(method, model, state, task.n_in), task, optim, model
        )
        for method in ("d_rtrl", "bptt")
    }


def optimiser(args, steps: int) -> optax.GradientTransformation:
    """Adam with the gradient's norm clipped to 1 and the learning rate decayed to
    zero over `steps` by a cosine: with eigenvalues this close to the unit circle
    a step of the constant rate can undo what was learned (the loss curves of both
    methods at delay 1000 jumped back up several times without it)."""
    schedule = optax.cosine_decay_schedule(args.lr, steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def ring(args, delay: int | None) -> tuple[float, float]:
    """The LRU's initial eigenvalue magnitudes `(r_min, r_max)`: given by `--r-min`
    and `--r-max`, else for the copy task time constants `1 / (1 - r)` from one to
    ten delays, so that what the first symbol left in the state is still there at
    the cue; for the digits (`delay` None) `lru_stack`'s default ring."""
    if delay is None:
        low, high = 0.9, 0.999
    else:
        span = max(delay, 10)
        low, high = math.exp(-1 / span), math.exp(-1 / (10 * span))
    return (
        low if args.r_min is None else args.r_min,
        high if args.r_max is None else args.r_max,
    )


def _lru_model(args, n_in: int, n_out: int, delay: int | None = None):
    key = jr.fold_in(jr.key(args.seed), 1)
    r_min, r_max = ring(args, delay)
    return eqx.nn.make_with_state(_common.lru_stack)(
        n_in, args.width, args.depth, n_out, r_min=r_min, r_max=r_max, key=key
    )


def first_delay_at_ratio(args, table: dict[int, dict[str, int]]) -> int | None:
    """The smallest delay at which BPTT's step needs `args.ratio` times D-RTRL's
    memory, by bisection between the measured delays (memory grows with the delay);
    `None` if the largest delay of `table` does not reach it."""

    def reached(delay: int) -> bool:
        if delay not in table:
            table[delay] = copy_memory(args, delay)
        return table[delay]["bptt"] >= args.ratio * table[delay]["d_rtrl"]

    ok = [d for d in sorted(table) if reached(d)]
    if not ok:
        return None
    high = ok[0]
    low = max((d for d in table if d < high), default=None)  # not reached
    if low is None:
        if reached(0):
            return 0
        low = 0
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if reached(mid) else (mid, high)
    return high


def train_copy(args, delay: int) -> dict[str, dict[str, Any]]:
    """Both methods trained at one delay; recall loss and accuracy of each."""
    task = copying_task.CopyTask(args.alphabet, args.length, delay, args.batch)
    model, state = _lru_model(args, task.n_in, args.alphabet, delay)
    optim = optimiser(args, args.steps)
    data_key, eval_key = jr.split(jr.fold_in(jr.key(args.seed), delay))
    eval_xs, eval_targets = task.sample(eval_key, batch=args.eval_batch)
    results = {}
    for method in ("d_rtrl", "bptt"):
        gradient = gradient_of(method, model, state, task.n_in)

        def step(model, opt_state, key, gradient=gradient):
            return copying_task.train_step(gradient, task, optim, model, opt_state, key)

        label = f"{METHODS[method]} d={delay}"
        trained, losses, _, per_step = _common.train(
            label, step, optim, model, data_key, args.steps
        )
        loss, accuracy = copying_task.evaluate(
            trained, state, task, eval_xs, eval_targets
        )
        results[method] = dict(
            losses=losses,
            loss=float(loss),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
        )
    return results


def train_digits(args, data) -> dict[str, dict[str, Any]]:
    """The LRU stack (D-RTRL, BPTT) and a GRU (D-RTRL, ES-D-RTRL) on pixel digits."""
    train_x, train_y, test_x, test_y = data
    n = _common.N_DIGITS
    lru, lru_state = _lru_model(args, 1, n)
    gru_key = jr.fold_in(jr.key(args.seed), 2)
    gru, gru_state = eqx.nn.make_with_state(copying_task.Net)(
        1, args.gru_hidden, n, key=gru_key
    )
    runs = {
        "lru_d_rtrl": (lru, lru_state, "d_rtrl"),
        "lru_bptt": (lru, lru_state, "bptt"),
        "gru_d_rtrl": (gru, gru_state, "d_rtrl"),
        "gru_es_d_rtrl": (gru, gru_state, "es_d_rtrl"),
    }
    optim = optimiser(args, args.digit_steps)
    data_key = jr.fold_in(jr.key(args.seed), 3)
    results = {}
    for name, (model, state, method) in runs.items():
        gradient = gradient_of(method, model, state, 1, args.decay)
        fixed = (gradient, optim, train_x, train_y, args.batch, PIXELS)

        def step(model, opt_state, key, fixed=fixed):
            return _common.digits_train_step(fixed, model, opt_state, key)

        trained, losses, _, per_step = _common.train(
            LABELS[name], step, optim, model, data_key, args.digit_steps, every=20
        )
        accuracy = _common.digits_accuracy(trained, state, test_x, test_y, PIXELS)
        window = min(50, len(losses))
        results[name] = dict(
            losses=losses,
            loss=float(np.mean(losses[-window:])),
            accuracy=float(accuracy),
            seconds_per_step=per_step,
        )
    return results


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(args, memory, first, copy, digits) -> None:
    """Prints the memory, copy-task and digits tables."""
    head = ("delay", "T", "D-RTRL MiB", "BPTT MiB", "BPTT / D-RTRL")
    rows = [
        (
            str(d),
            str(d + 2 * args.length + 1),
            _mib(m["d_rtrl"]),
            _mib(m["bptt"]),
            f"{m['bptt'] / m['d_rtrl']:.1f}",
        )
        for d, m in sorted(memory.items())
    ]
    print(f"\ncompiled memory of one training step (batch {args.batch}):")
    _common.print_table(head, rows)
    if first is None:
        print(f"BPTT stays under {args.ratio:g}x D-RTRL's memory up to these delays")
    else:
        print(f"first delay at which BPTT needs >= {args.ratio:g}x: {first}")
    if copy:
        head = ("delay", "method", "recall acc.", "eval loss", "s/step")
        rows = [
            (
                str(d),
                METHODS[m],
                f"{r['accuracy']:.3f}",
                f"{r['loss']:.3f}",
                f"{r['seconds_per_step']:.4f}",
            )
            for d, by_method in copy.items()
            for m, r in by_method.items()
        ]
        print(f"\ncopy task, LRU stack, {args.steps} steps:")
        _common.print_table(head, rows)
        print(f"chance accuracy {1 / args.alphabet:.3f}")
    if digits:
        head = ("model, method", "test acc.", "train loss", "s/step")
        rows = [
            (
                LABELS[n],
                f"{r['accuracy']:.3f}",
                f"{r['loss']:.3f}",
                f"{r['seconds_per_step']:.4f}",
            )
            for n, r in digits.items()
        ]
        print(f"\ndigits pixel by pixel ({PIXELS} steps), {args.digit_steps} steps:")
        _common.print_table(head, rows)
        print("train loss: mean of the last 50 steps' loss at the last pixel")


def plot(args, memory, copy, digits) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    delays = sorted(memory)
    for method, label in (("d_rtrl", "D-RTRL"), ("bptt", "BPTT")):
        axes[0].plot(
            delays, [memory[d][method] / 2**20 for d in delays], "o-", label=label
        )
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("delay")
    axes[0].set_ylabel("training-step memory (MiB)")
    axes[0].set_title("Copy task: compiled memory")
    axes[0].legend()
    if copy:
        delay = max(copy)  # the longest delay trained
        _common.plot_losses(axes[1], copy[delay], METHODS)
        axes[1].axhline(math.log(args.alphabet), color="grey", linestyle="--")
        axes[1].set_ylabel("recall cross-entropy")
        axes[1].set_title(f"Copy task, delay {delay}")
        axes[1].legend()
    if digits:
        _common.plot_losses(axes[2], digits, LABELS)
        axes[2].set_ylabel("cross-entropy at the last pixel")
        axes[2].set_title("Digits pixel by pixel: training loss")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    add = parser.add_argument
    add("--delays", type=int, nargs="+", default=[100, 1000, 5000])
    add("--train-delays", type=int, nargs="*", default=None, help="default: all")
    add("--ratio", type=float, default=20.0, help="memory ratio to search for")
    add("--steps", type=int, default=400, help="copy-task training steps")
    add("--digit-steps", type=int, default=600, help="digits training steps")
    add("--width", type=int, default=64, help="width of the LRU blocks")
    add("--depth", type=int, default=2, help="LRU blocks")
    add("--gru-hidden", type=int, default=64, help="GRU hidden size (digits)")
    add("--r-min", type=float, default=None, help="LRU ring: least |lambda|")
    add("--r-max", type=float, default=None, help="LRU ring: largest |lambda|")
    add("--batch", type=int, default=32, help="sequences per step")
    add("--eval-batch", type=int, default=500, help="held-out copy sequences")
    add("--length", type=int, default=5, help="symbols to copy")
    add("--alphabet", type=int, default=8, help="number of symbols")
    add("--lr", type=float, default=3e-3, help="Adam learning rate")
    add("--decay", type=float, default=0.9, help="ES-D-RTRL decay (GRU)")
    add("--train-size", type=int, default=1500, help="training digits")
    add("--no-digits", action="store_true", help="skip the digits")
    add("--seed", type=int, default=0)
    add("--out", default="online_lru.png", help="PNG of memory and loss curves")
    args = parser.parse_args(argv)
    if min(args.steps, args.digit_steps, args.width, args.depth) < 1:
        parser.error("--steps, --digit-steps, --width and --depth must be >= 1")
    if min(args.delays) < 0:
        parser.error("--delays must be >= 0")
    if args.train_delays is None:
        args.train_delays = list(args.delays)
    if not args.batch <= args.train_size < 1797:
        parser.error("need --batch <= --train-size <= 1796")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs both parts; returns the memory table, the first delay at the ratio, and
    per delay (copy) or model (digits) and method the final numbers."""
    args = parse_args(argv)
    print(
        f"LRU stack: {args.depth} blocks of width {args.width}, batch {args.batch}; "
        f"copy task {args.length} symbols of {args.alphabet}, delays {args.delays}",
        flush=True,
    )
    wall = time.perf_counter()
    memory = {d: copy_memory(args, d) for d in args.delays}
    first = first_delay_at_ratio(args, memory)
    memory_at = {d: memory[d] for d in args.delays}
    if first is not None:
        memory_at[first] = memory[first]
    copy = {d: train_copy(args, d) for d in args.train_delays}
    digits = None
    if not args.no_digits:
        data = _common.load_digits_split(args.seed, args.train_size)
        digits = train_digits(args, data)
    report(args, memory_at, first, copy, digits)
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    plot(args, memory_at, copy, digits)
    print(f"saved {args.out}")
    return dict(memory=memory_at, first=first, copy=copy, digits=digits)


if __name__ == "__main__":
    main()
