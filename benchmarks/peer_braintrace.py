"""The training benchmark of `training.py`, built with braintrace and brainstate.

The same configurations (`benchmarks/configs.py`: sizes, batch, lengths, loss,
Adam with the same learning rate, ES-D-RTRL decay), written the way braintrace's
own examples write them: models are `brainstate.nn.Module`s whose trainable
matrices go through braintrace's ETP layers (`braintrace.nn.GRUCell`,
`braintrace.nn.Linear`, `braintrace.nn.LeakyRateReadout`); spiking neurons are
`brainpy.state.LIF` fed by a `brainpy.state.DeltaProj`; hidden states carry the
batch axis (`braintrace.compile(..., batch_size=B)`, no `vmap`); the online
gradient is `learner.etrace_grad` with `braintrace.D_RTRL` or
`braintrace.ES_D_RTRL`; BPTT is `brainstate.transform.grad` of a
`brainstate.transform.for_loop` over the sequence; the optimiser is
`braintools.optim.Adam`. Each training step starts from fresh hidden states and
zero traces (`brainstate.nn.reset_all_states`).

The models differ from etrace's in what each library ships:

* GRU: `braintrace.nn.GRUCell` computes `h~ = tanh(W_h [x; r * h])` (three
  `(I + H) x H` weights), where `eqx.nn.GRUCell` computes
  `n = tanh(W_in x + r * (W_hn h + b_n))`. The multiply-adds per step are the same.
  `W_r`'s output reaches the hidden state only through `W_h`, so braintrace's
  compiler excludes it from the traces (with a warning) and its online gradient for
  `W_r` is zero: it keeps traces for two of the three gate weights, etrace for
  all of them.
* LIF: `brainpy.state.LIF` integrates with an exponential Euler step and applies
  the soft reset at the start of the next step, and the spike's surrogate is
  `braintools.surrogate.SoftSign` (the same `1 / (1 + k|x|)^2` shape as
  `etrace.nn.FastSigmoid`); `braintrace.nn.LeakyRateReadout` is one weight
  matrix without a bias where etrace has `eqx.nn.Linear` then a leaky integrator.

Timing, compile time and memory are measured as in `training.py`: the jitted step
(`brainstate.transform.jit`) is lowered and compiled explicitly for the compile
time and `memory_analysis()`, then called repeatedly, median after two untimed
calls (the second call compiles again: brainstate's initial state values are
weakly typed, the values written back by the first step are not). Runs in its own
environment (`nox -s bench_peer`): braintrace needs Python >= 3.12.

```
python benchmarks/peer_braintrace.py --quick
python benchmarks/peer_braintrace.py
```

Prints a table and writes `benchmarks/results/peer_braintrace.json`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import platform
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import brainpy
import brainstate
import braintools
import braintrace
import jax
import jax.numpy as jnp
from configs import (
    add_size_options,
    Config,
    ES_DECAY,
    LEARNING_RATE,
    measure_selected,
    median_time,
    repeats,
    row,
    selected,
    timed,
    training_table,
)


RESULTS = pathlib.Path(__file__).parent / "results" / "peer_braintrace.json"
TAU = 20.0  # steps, with dt = 1


class GRUNet(brainstate.nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.cell = braintrace.nn.GRUCell(n_in, hidden)
        self.readout = braintrace.nn.Linear(hidden, n_out)

    def update(self, x):
        return self.readout(self.cell(x))


class SpikingNet(brainstate.nn.Module):
    """`[x^t; z^{t-1}]` through one linear map into LIF neurons, leaky readout."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.neu = brainpy.state.LIF(
            hidden,
            R=1.0,
            tau=TAU,
            V_th=1.0,
            V_reset=0.0,
            V_rest=0.0,
            V_initializer=braintools.init.ZeroInit(),
            spk_fun=braintools.surrogate.SoftSign(alpha=10.0),
            spk_reset="soft",
        )
        self.syn = brainpy.state.DeltaProj(
            comm=braintrace.nn.Linear(n_in + hidden, hidden), post=self.neu
        )
        self.out = braintrace.nn.LeakyRateReadout(hidden, n_out, tau=TAU)

    def update(self, x):
        self.syn(jnp.concatenate([x, self.neu.get_spike()], axis=-1))
        self.neu(0.0)
        return self.out(self.neu.get_spike())


def build(config: Config, seed: int = 0) -> brainstate.nn.Module:
    brainstate.random.seed(seed)
    cls = GRUNet if config.family.name == "GRU" else SpikingNet
    family = config.family
    return cls(family.inputs, config.hidden, family.outputs)


def data(config: Config, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """Inputs and targets of one batch, time on axis 0 and batch on axis 1, drawn
    as in `training.py`."""
    family = config.family
    k1, k2 = jax.random.split(jax.random.key(seed))
    shape = (config.length, family.batch)
    if family.name == "GRU":
        xs = jax.random.normal(k1, (*shape, family.inputs), jnp.float32)
    else:
        xs = jax.random.bernoulli(k1, 0.2, (*shape, family.inputs))
        xs = xs.astype(jnp.float32)
    targets = jax.random.normal(k2, (*shape, family.outputs), jnp.float32)
    return xs, targets


def mse(y, target):
    return jnp.mean((y - target) ** 2)


def online_step(config: Config, name: str, x0) -> tuple[Callable, dict[str, Any]]:
    batch = config.family.batch
    model = build(config)
    if name == "D-RTRL":
        compile_learner = lambda: braintrace.compile(  # noqa: E731
            model, braintrace.D_RTRL, x0, batch_size=batch
        )
    else:
        compile_learner = lambda: braintrace.compile(  # noqa: E731
            model, braintrace.ES_D_RTRL, x0, batch_size=batch, decay_or_rank=ES_DECAY
        )
    learner, setup_s = timed(compile_learner)
    weights = model.states(brainstate.ParamState)
    optim = braintools.optim.Adam(lr=LEARNING_RATE)
    optim.register_trainable_weights(weights)

    def step_loss(x, target):
        return mse(learner(x), target)

    @brainstate.transform.jit
    def step(xs, targets):
        brainstate.nn.reset_all_states(learner, batch_size=batch)
        grads, losses = learner.etrace_grad(
            xs, targets, step_fn=step_loss, reduction="sum", return_value=True
        )
        optim.update(grads)
        return jnp.sum(losses)

    traces = learner.states(braintrace.EligibilityTrace)
    nbytes = sum(
        a.size * a.dtype.itemsize
        for a in jax.tree.leaves([v.value for v in traces.values()])
    )
    return step, {
        "setup_seconds": setup_s,
        "trace_bytes_per_example": nbytes // batch,
    }


def bptt_step(config: Config) -> tuple[Callable, dict[str, Any]]:
    batch = config.family.batch
    model = build(config)
    brainstate.nn.init_all_states(model, batch_size=batch)
    weights = model.states(brainstate.ParamState)
    optim = braintools.optim.Adam(lr=LEARNING_RATE)
    optim.register_trainable_weights(weights)

    @brainstate.transform.jit
    def step(xs, targets):
        brainstate.nn.reset_all_states(model, batch_size=batch)

        def total():
            def one(x, target):
                return mse(model(x), target)

            return jnp.sum(brainstate.transform.for_loop(one, xs, targets))

        grads, loss = brainstate.transform.grad(total, weights, return_value=True)()
        optim.update(grads)
        return loss

    return step, {}


def measure_step(step: Callable, args: tuple, count: int) -> dict[str, Any]:
    lowered, lower_s = timed(lambda: step.lower(*args))
    compiled, xla_s = timed(lowered.compile)
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)

    def run():
        jax.block_until_ready(step(*args))

    # Not timed: the first call compiles through the jit cache, and the second
    # compiles again, because brainstate's initial state values are weakly typed
    # and the values the first step writes back are not.
    run()
    run()
    median, fastest = median_time(run, count)
    return {
        "step_seconds": median,
        "step_seconds_min": fastest,
        "compile_seconds": lower_s + xla_s,
        "lower_seconds": lower_s,
        "temp_bytes": temp,
    }


def measure(config: Config, names: Sequence[str], count: int) -> list[dict[str, Any]]:
    args = data(config)
    x0 = args[0][0]
    rows = []
    for name in names:
        if name == "BPTT":
            step, extra = bptt_step(config)
        else:
            step, extra = online_step(config, name, x0)
        rows.append(row(config, name, **measure_step(step, args, count), **extra))
        r = rows[-1]
        print(
            f"{config.family.name} H={config.hidden} T={config.length} {name}: "
            f"step {1e3 * r['step_seconds']:.1f} ms, "
            f"compile {r['compile_seconds']:.2f} s",
            flush=True,
        )
    return rows


def versions() -> dict[str, str]:
    names = ("braintrace", "brainstate", "brainpy", "braintools", "brainunit", "jax")
    return {n: importlib.metadata.version(n) for n in names}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, processes=True)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    parser.add_argument(
        "--show-warnings",
        action="store_true",
        help="print braintrace's compiler warnings (one-step weights)",
    )
    args = parser.parse_args(argv)
    if not args.show_warnings:
        warnings.filterwarnings("ignore", module="braintrace")
    count = repeats(args)
    brainstate.environ.set(dt=1.0, precision=32)

    configs = selected(args)
    rows, heading = measure_selected(__file__, argv, args, measure)
    print(f"\nbraintrace: {heading}")
    print(training_table(rows))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "training",
        "library": "braintrace",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        **versions(),
        "python": platform.python_version(),
        "dtype": "float32",
        "repeats": count,
        "processes": args.processes,
        "models": {c.family.name: c.family.description for c in configs},
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
