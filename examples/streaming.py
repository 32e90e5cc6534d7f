"""Continual learning on a stream: an update at every time step, or one per segment.

`--batch` independent streams run side by side and never restart. At every step each
stream emits one standard normal number `u_t`, and the network must output the
numbers it emitted `--delays` steps back (by default `u_{t-2}` and `u_{t-5}`), a
task that needs memory: the target is independent of everything a memoryless
predictor sees at step `t`, so the best such predictor outputs 0 and its loss (the
mean squared error over the outputs) is the variance of the target, 1. A GRU with a
linear readout, trained online with D-RTRL traces that are never reset, can bring
the loss close to 0.

The same initial network learns from the same streams with Adam in two ways:

* **per step**: at every time step, the gradient of the batch-mean loss of one
  `learner.step` and an Adam update, the next step running on the updated
  parameters. The steps of a segment of `--segment` steps run in one compiled
  `lax.scan` with an update inside every step. For comparison, the first
  `--per-call-steps` steps are also run the plain way, one `jax.jit` call per step,
  which gives the same losses (the script prints the largest difference) but
  dispatches a call per step: the script reports both times.
* **per segment**: the gradient summed over a segment (`etrace.online_grad` from
  the current trace state, which carries on into the next segment) and one Adam
  update per segment, `--segment` times fewer. Adam divides the update by a running
  scale of the gradient, so each update moves the parameters by about the learning
  rate whatever the segment's length: with the per-step learning rate, updating
  once per segment moves `--segment` times less per time step. Scaling the
  learning rate by the segment length `L` (what makes plain SGD on the summed
  gradient move as far) risks instability; scaling it by `sqrt(L)` is the rule for
  Adam when the batch grows `L`-fold (Malladi et al., "On the SDEs and scaling rules
  for adaptive gradient algorithms", NeurIPS 2022). The script runs the
  per-segment method with each of the three (the per-step rate times 1, `sqrt(L)`
  and `L`) and compares the per-step method with the best of them on the final
  loss, which gives the per-segment method the benefit of the tuning.

Each method's loss at a step is measured before the update that step's data
brings (online, "prequential" evaluation). The script prints, per method, the loss
averaged over the last 10% of the stream, the loss of the memoryless baseline
there, the time per step and the trace memory per stream, and plots the moving
average of the loss against the time step.

```
python examples/streaming.py                                    # about 40 s, 2 CPUs
python examples/streaming.py --steps 32000 --per-call-steps 0   # the long run
python examples/streaming.py --steps 40 --segment 4 --hidden 8  # smoke test
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
import jax.tree_util as jtu
import matplotlib
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm import tqdm

import etrace


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


F32 = jnp.float32
FINAL = 0.1  # the last part of the stream the final loss is averaged over


class Net(eqx.Module):
    """A GRU with a linear readout, its hidden state declared the Equinox way."""

    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, n_in: int, hidden: int, n_out: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        # float32 throughout, even where a caller has enabled x64.
        self.cell = eqx.nn.GRUCell(n_in, hidden, dtype=F32, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, dtype=F32, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden, F32))

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


class StreamState(eqx.Module):
    """Where the streams are: the key of the next draw and the recent inputs."""

    key: PRNGKeyArray
    history: Float[Array, "B D"]  # history[:, k] is the input k steps back


# Hashable, so `eqx.filter_jit` treats it as static.
@dataclasses.dataclass(frozen=True)
class DelayStreams:
    """`batch` streams of standard normal inputs; the target at step `t` is the
    input at `t - d` for every `d` in `delays` (0 before a stream's first input)."""

    delays: tuple[int, ...]
    batch: int

    n_in = 1

    @property
    def n_out(self) -> int:
        return len(self.delays)

    def init(self, key: PRNGKeyArray) -> StreamState:
        return StreamState(key, jnp.zeros((self.batch, max(self.delays) + 1), F32))

    def next(
        self, s: StreamState
    ) -> tuple[Float[Array, "B 1"], Float[Array, "B n_out"], StreamState]:
        """One step of every stream: inputs, targets and the streams' next state."""
        key, draw = jr.split(s.key)
        u = jr.normal(draw, (self.batch, 1), F32)
        history = jnp.concatenate([u, s.history[:, :-1]], axis=1)
        return u, history[:, jnp.array(self.delays)], StreamState(key, history)

    def segment(
        self, s: StreamState, length: int
    ) -> tuple[Float[Array, "L B 1"], Float[Array, "L B n_out"], StreamState]:
        """`length` steps of every stream, time first: the same draws as `length`
        calls of `next`."""

        def body(s, _):
            x, target, s = self.next(s)
            return s, (x, target)

        s, (xs, targets) = jax.lax.scan(body, s, length=length)
        return xs, targets, s


def mse(y: Float[Array, " n_out"], target: Float[Array, " n_out"]) -> Float[Array, ""]:
    return jnp.mean((y - target) ** 2)


class Carry(eqx.Module):
    """Everything that changes while learning from the streams."""

    model: Net
    opt_state: Any
    trace_state: etrace.TraceState
    streams: StreamState


def _update(optim, model, grads, opt_state):
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = optim.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state


def per_step(fixed, carry: Carry) -> tuple[Carry, Array, Array]:
    """One time step of every stream and an Adam update from its gradient; returns
    the batch-mean loss (before the update) and the memoryless baseline's."""
    learner, optim, streams = fixed
    x, target, stream_state = streams.next(carry.streams)

    def loss(model, trace_state):
        y, trace_state = learner.step(model, trace_state, x)
        return jnp.mean(jax.vmap(mse)(y, target)), trace_state

    grad_fn = eqx.filter_value_and_grad(loss, has_aux=True)
    (value, trace_state), grads = grad_fn(carry.model, carry.trace_state)
    # Lets XLA write the new traces over the old ones instead of copying them.
    trace_state = learner.after_read_out(trace_state, grads)
    model, opt_state = _update(optim, carry.model, grads, carry.opt_state)
    baseline = jnp.mean(jax.vmap(mse)(jnp.zeros_like(target), target))
    return Carry(model, opt_state, trace_state, stream_state), value, baseline


# The carry is replaced by the outputs: donating it lets XLA update parameters,
# optimiser moments, traces and streams in place.
@eqx.filter_jit(donate="all-except-first")
def per_step_call(fixed, carry: Carry):
    """`per_step` as one compiled call: the plain way, one call per time step."""
    carry, loss, baseline = per_step(fixed, carry)
    return carry, loss[None], baseline[None]


@eqx.filter_jit(donate="all-except-first")
def per_step_scan(fixed, carry: Carry, length: int):
    """`length` calls of `per_step` in one compiled `lax.scan`."""

    def body(carry, _):
        carry, loss, baseline = per_step(fixed, carry)
        return carry, (loss, baseline)

    carry, (losses, baselines) = jax.lax.scan(body, carry, length=length)
    return carry, losses, baselines


@eqx.filter_jit(donate="all-except-first")
def per_segment(fixed, carry: Carry, length: int):
    """`length` time steps of every stream and one Adam update from their summed
    gradient, the trace state carried on; returns each step's losses."""
    learner, optim, streams = fixed
    xs, targets, stream_state = streams.segment(carry.streams, length)
    grads, trace_state, losses = etrace.online_grad(
        learner, mse, carry.model, carry.trace_state, xs, targets
    )
    model, opt_state = _update(optim, carry.model, grads, carry.opt_state)
    baselines = jnp.mean(jax.vmap(jax.vmap(mse))(jnp.zeros_like(targets), targets), 1)
    return Carry(model, opt_state, trace_state, stream_state), losses, baselines


def fresh_carry(learner, optim, streams, model, lr: float, key) -> Carry:
    """The starting point of every run: copies, so that donation cannot delete what
    the other runs start from."""
    model = jtu.tree_map(lambda a: jnp.array(a) if eqx.is_array(a) else a, model)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    hyperparams = dict(opt_state.hyperparams, learning_rate=jnp.asarray(lr, F32))
    opt_state = opt_state._replace(hyperparams=hyperparams)
    return Carry(
        model,
        opt_state,
        learner.init(batch_size=streams.batch),
        streams.init(jr.clone(key)),
    )


def run(label: str, call, carry: Carry, calls: int, length: int) -> dict[str, Any]:
    """`calls` calls of `call(carry) -> (carry, losses, baselines)`, each covering
    `length` time steps; returns the loss curves and the time per step after
    compilation."""
    losses, baselines = [], []
    start = time.perf_counter()
    compiled_at = start
    bar = tqdm(total=calls * length, desc=f"{label:>16}", unit="step")
    for i in range(calls):
        carry, loss, baseline = call(carry)
        losses.append(loss)
        baselines.append(baseline)
        if i == 0:
            # The first call compiles; keep that out of the time per step.
            loss.block_until_ready()
            compiled_at = time.perf_counter()
        bar.update(length)
        if i % max(1, 100 // length) == 0 or i == calls - 1:
            bar.set_postfix(loss=f"{float(loss[-1]):.3f}")
    jax.block_until_ready(carry)
    bar.close()
    end = time.perf_counter()
    timed = (calls - 1) * length
    per_step = (end - compiled_at) / timed if timed else end - start
    return dict(
        losses=np.asarray(jnp.concatenate(losses)),
        baselines=np.asarray(jnp.concatenate(baselines)),
        seconds_per_step=per_step,
        compile_seconds=compiled_at - start,
    )


def final(curve: np.ndarray) -> float:
    return float(np.mean(curve[-max(1, int(len(curve) * FINAL)) :]))


def moving_average(curve: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(curve, np.ones(window) / window, mode="valid")


def plot(results: dict[str, dict[str, Any]], best: str, baseline: float, out: str):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = len(next(iter(results.values()))["losses"])
    window = max(1, steps // 50)
    for name, r in results.items():
        faint = name.startswith("segment") and name != best
        ax.plot(
            np.arange(window, steps + 1),
            moving_average(r["losses"], window),
            label=r["label"],
            linewidth=1.0 if faint else 2.0,
            alpha=0.5 if faint else 1.0,
        )
    ax.axhline(baseline, color="grey", linestyle="--", label="memoryless baseline")
    ax.set_yscale("log")
    ax.set_xlabel("time step")
    ax.set_ylabel(f"squared error, moving average of {window} steps")
    ax.set_title("Online learning on never-ending streams: when to update")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=8000, help="time steps of every stream"
    )
    parser.add_argument("--batch", type=int, default=64, help="parallel streams")
    parser.add_argument("--hidden", type=int, default=32, help="GRU hidden size")
    parser.add_argument(
        "--segment",
        type=int,
        default=16,
        help="time steps per update of the per-segment method (L)",
    )
    parser.add_argument(
        "--delays",
        type=int,
        nargs="+",
        default=[2, 5],
        help="how many steps back each target looks",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate per step"
    )
    parser.add_argument(
        "--per-call-steps",
        type=int,
        default=500,
        help="steps timed with one jitted call per step (0: none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="streaming.png", help="loss-curve PNG")
    args = parser.parse_args(argv)
    if args.segment < 1:
        parser.error("--segment must be at least 1")
    if args.steps < args.segment:
        parser.error("--steps must be at least --segment")
    if min(args.delays) < 1:
        parser.error("--delays must be at least 1: the input at 0 steps back is seen")
    if args.per_call_steps < 0:
        parser.error("--per-call-steps must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the comparison; returns, per run, its loss curve and numbers."""
    args = parse_args(argv)
    length = args.segment
    calls = args.steps // length
    steps = calls * length
    streams = DelayStreams(tuple(args.delays), args.batch)
    model_key, data_key = jr.split(jr.key(args.seed))
    model, state = eqx.nn.make_with_state(Net)(
        streams.n_in, args.hidden, streams.n_out, key=model_key
    )
    learner, _ = etrace.compile(model, jnp.zeros(streams.n_in, F32), state=state)
    # The learning rate lives in the optimiser state, so every run shares one
    # compiled program whatever its rate.
    optim = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr)
    fixed = (learner, optim, streams)
    memory = _common.memory_bytes(learner, state, steps)
    baseline = 1.0  # the variance of every target
    print(
        f"{args.batch} streams of N(0, 1) inputs, targets {args.delays} steps back; "
        f"GRU hidden {args.hidden} with D-RTRL; {steps} time steps, segments of "
        f"{length}; memoryless baseline loss {baseline:.3f}",
        flush=True,
    )

    def start(lr: float) -> Carry:
        return fresh_carry(learner, optim, streams, model, lr, data_key)

    wall = time.perf_counter()
    results = {}
    r = run(
        "per step",
        lambda c: per_step_scan(fixed, c, length),
        start(args.lr),
        calls,
        length,
    )
    results["step"] = dict(
        r, label="update every step", lr=args.lr, updates=steps, factor=None
    )
    factors = {"1": 1.0, "sqrt(L)": math.sqrt(length), "L": float(length)}
    if length == 1:  # one step per segment: all three are the per-step method
        factors = {"1": 1.0}
    for factor, scale in factors.items():
        lr = args.lr * scale
        r = run(
            f"segment x{factor}",
            lambda c: per_segment(fixed, c, length),
            start(lr),
            calls,
            length,
        )
        results[f"segment {factor}"] = dict(
            r,
            label=f"update every {length} steps, lr {lr:.2g}",
            lr=lr,
            updates=calls,
            factor=factor,
        )
    per_call = None
    if args.per_call_steps:
        n = min(args.per_call_steps, steps)
        per_call = run(
            "call per step", lambda c: per_step_call(fixed, c), start(args.lr), n, 1
        )
        per_call["difference"] = float(
            np.max(np.abs(per_call["losses"] - results["step"]["losses"][:n]))
        )
    wall = time.perf_counter() - wall

    segments = [n for n in results if n.startswith("segment")]
    best = min(segments, key=lambda n: final(results[n]["losses"]))
    for name, r in results.items():
        r["final_loss"] = final(r["losses"])
        r["final_baseline"] = final(r["baselines"])
    head = ("method", "lr", "updates", "final loss", "s/step", "traces/stream")
    rows = [
        (
            "per step"
            if r["factor"] is None
            else f"per segment, lr x {r['factor']}" + (" (best)" if n == best else ""),
            f"{r['lr']:.2g}",
            str(r["updates"]),
            f"{r['final_loss']:.4f}",
            f"{r['seconds_per_step']:.5f}",
            f"{memory / 1024:.1f} KiB",
        )
        for n, r in results.items()
    ]
    rows.append(
        (
            "memoryless baseline (predicts 0)",
            "",
            "",
            f"{results['step']['final_baseline']:.4f}",
            "",
            "",
        )
    )
    _common.print_table(head, rows)
    print(
        f"final loss: mean squared error over the last {FINAL:.0%} of the stream "
        f"({max(1, int(steps * FINAL))} steps); L = {length}"
    )
    step_loss = results["step"]["final_loss"]
    best_loss = results[best]["final_loss"]
    print(
        f"per step vs the best per-segment rate: final loss {step_loss:.4f} vs "
        f"{best_loss:.4f} ({best_loss / step_loss:.1f}x)"
    )
    if per_call is not None:
        scanned = results["step"]["seconds_per_step"]
        print(
            f"one jitted call per step (first {len(per_call['losses'])} steps): "
            f"{per_call['seconds_per_step']:.5f} s/step, "
            f"{per_call['seconds_per_step'] / scanned:.1f}x the scanned loop's; "
            f"largest loss difference from the scanned loop "
            f"{per_call['difference']:.1e}"
        )
    print(f"wall time {wall:.1f} s")

    plot(results, best, baseline, args.out)
    print(f"saved {args.out}")
    return dict(
        results=results,
        best=best,
        per_call=per_call,
        baseline=baseline,
        memory_bytes=memory,
    )


if __name__ == "__main__":
    main()
