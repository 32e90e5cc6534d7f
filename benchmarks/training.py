"""Time, compile time and compiled memory of one training step: online against BPTT.

One training step runs the model over a batch of sequences of `T` steps, takes the
gradient of the summed per-step loss and applies an optax Adam update. The gradient
comes from `etrace.online_grad` (D-RTRL, ES-D-RTRL: each step's gradient taken
inside the scan and accumulated; `D-RTRL/bf16` is D-RTRL with its traces stored
in bfloat16 through `etrace.ReducedPrecision`; `D-RTRL/chunk` is D-RTRL with
`online_grad(..., chunk=32)`) or from `etrace.bptt_grad`
(back-propagation through time), on the same model in the same run, in float32.
`e-prop` (LIF network only) is `etrace.EProp` with its filter `kappa` set to the
leaky readout's leak, as in `examples/evidence_accumulation.py`; `e-prop/no-filter`
(LIF network only) is `etrace.EProp()`.
Two model families (sizes in `benchmarks/configs.py`):

* GRU: `eqx.nn.GRUCell` with an `eqx.nn.Linear` readout, H = 64, 128, 256,
  batch 64, T = 70, 270.
* LIF: the recurrent spiking layer of `docs/nn.md` (`etrace.nn.LIF` reading the
  input and its own previous spikes through one `eqx.nn.Linear`), a linear map and
  an `etrace.nn.LeakyRateReadout`, H = 128, 512, batch 32, T = 100, 400.

For each step function: the wall time of `jax.jit(step).lower(...)` plus
`.compile()` (compile time), XLA's temporary buffer size of the compiled step
(`compiled.memory_analysis().temp_size_in_bytes`, the scratch space excluding
arguments and outputs), and the median wall time of repeated calls of the compiled
step after a first untimed call (parameters and optimiser state carried from call
to call). The online rows also give the trace memory of one example.

```
python benchmarks/training.py
python benchmarks/training.py --quick
python benchmarks/training.py --models gru --gru-hidden 128 --gru-lengths 270
```

Prints a table and writes `benchmarks/results/training.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import optax
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
from jaxtyping import Array, Float, PRNGKeyArray

import etrace
import etrace.nn as enn


RESULTS = pathlib.Path(__file__).parent / "results" / "training.json"
BF16 = "D-RTRL/bf16"
CHUNKED = "D-RTRL/chunk"
# Steps per chunk of `D-RTRL/chunk` (`etrace.online_grad(..., chunk=CHUNK)`).
CHUNK = 32
EPROP = "e-prop"
EPROP_PLAIN = "e-prop/no-filter"


class GRUNet(eqx.Module):
    """A GRU with a linear readout, its hidden state declared the Equinox way."""

    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, n_in: int, hidden: int, n_out: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.GRUCell(n_in, hidden, dtype=jnp.float32, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, dtype=jnp.float32, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden, jnp.float32))

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


class SpikingNet(eqx.Module):
    """The recurrent spiking layer of `docs/nn.md`: `[x^t; z^{t-1}]` through one
    linear map into LIF neurons, read out by a linear map and a leaky integrator."""

    synapses: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear
    output: enn.LeakyRateReadout

    def __init__(self, n_in: int, hidden: int, n_out: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        f32 = jnp.float32
        self.synapses = eqx.nn.Linear(n_in + hidden, hidden, dtype=f32, key=k1)
        self.lif = enn.LIF(hidden, tau=20.0, surrogate=enn.FastSigmoid(), dtype=f32)
        self.readout = eqx.nn.Linear(hidden, n_out, dtype=f32, key=k2)
        self.output = enn.LeakyRateReadout(n_out, tau=20.0, dtype=f32)

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        previous = self.lif.spikes(state)
        current = self.synapses(jnp.concatenate([x, previous]))
        z, state = self.lif(current, state)
        return self.output(self.readout(z), state)


class InOutLinear(eqx.Module):
    """`x @ W + b` with `W` stored `(in, out)`, as `braintrace.nn.Linear` stores it
    (`eqx.nn.Linear` stores `(out, in)`); initialised as `eqx.nn.Linear`, turned."""

    weight: Float[Array, "n_in n_out"]
    bias: Float[Array, " n_out"]

    def __init__(self, n_in: int, n_out: int, *, key: PRNGKeyArray):
        linear = eqx.nn.Linear(n_in, n_out, dtype=jnp.float32, key=key)
        self.weight = linear.weight.T
        self.bias = linear.bias

    def __call__(self, x: Float[Array, " n_in"]) -> Float[Array, " n_out"]:
        return x @ self.weight + self.bias


class ConcatGRUCell(eqx.Module):
    """The GRU as braintrace's `braintrace.nn.GRUCell` writes it: the reset gate
    multiplies the state before the candidate's weight, `h~ = tanh(W_h [x; r h])`,
    with three `(I + H) x H` weights stored `(in, out)` (where `eqx.nn.GRUCell`
    computes `n = tanh(W_in x + r (W_hn h + b_n))` with one `(3H, I)` and one
    `(3H, H)` weight stored `(out, in)`). `W_r`'s output then reaches the state
    only through `W_h`, so braintrace keeps no trace for it and gives it a zero
    gradient; here it is held fixed (`stop_gradient`), so that neither library
    computes a gradient for it: the same gradients, the same work per step in
    both. (Learned, its one-step gradient would cost this step a pullback through
    `W_h` and a third read-out product, about a quarter of the step.) The layout
    matters on a CPU: XLA writes the `(H, I + H)` product of an `(out, in)`
    gradient, whose rows are not a multiple of 8 long, up to 1.3 times slower than
    the `(I + H, H)` one (`I + H = 266`, batch 64: 130 against 104 us)."""

    w_r: InOutLinear
    w_z: InOutLinear
    w_h: InOutLinear

    def __init__(self, n_in: int, hidden: int, *, key: PRNGKeyArray):
        kr, kz, kh = jr.split(key, 3)
        self.w_r = InOutLinear(n_in + hidden, hidden, key=kr)
        self.w_z = InOutLinear(n_in + hidden, hidden, key=kz)
        self.w_h = InOutLinear(n_in + hidden, hidden, key=kh)

    def __call__(self, x: Float[Array, " n_in"], h: Float[Array, " hidden"]):
        xh = jnp.concatenate([x, h])
        r = jax.nn.sigmoid(jax.lax.stop_gradient(self.w_r)(xh))
        z = jax.nn.sigmoid(self.w_z(xh))
        candidate = jnp.tanh(self.w_h(jnp.concatenate([x, r * h])))
        return (1 - z) * h + z * candidate


class ConcatGRUNet(eqx.Module):
    """`ConcatGRUCell` with a linear readout."""

    cell: ConcatGRUCell
    readout: eqx.nn.Linear
    h: eqx.nn.StateIndex

    def __init__(self, n_in: int, hidden: int, n_out: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.cell = ConcatGRUCell(n_in, hidden, key=k1)
        self.readout = eqx.nn.Linear(hidden, n_out, dtype=jnp.float32, key=k2)
        self.h = eqx.nn.StateIndex(jnp.zeros(hidden, jnp.float32))

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        h = self.cell(x, state.get(self.h))
        return self.readout(h), state.set(self.h, h)


def build(
    config: Config, seed: int = 0, concat_gru: bool = False
) -> tuple[Any, eqx.nn.State]:
    """The model of `config` and its initial (unbatched) state; with `concat_gru`,
    the GRU written as braintrace writes it (`ConcatGRUNet`)."""
    if config.family.name == "GRU":
        cls = ConcatGRUNet if concat_gru else GRUNet
    else:
        cls = SpikingNet
    family = config.family
    return eqx.nn.make_with_state(cls)(
        family.inputs, config.hidden, family.outputs, key=jr.key(seed)
    )


def data(config: Config, seed: int = 1) -> tuple[Array, Array]:
    """Inputs and targets of one batch, time on axis 0 and batch on axis 1."""
    family = config.family
    k1, k2 = jr.split(jr.key(seed))
    shape = (config.length, family.batch)
    if family.name == "GRU":
        xs = jr.normal(k1, (*shape, family.inputs), jnp.float32)
    else:  # input spike trains, 20% of channels active per step
        xs = jr.bernoulli(k1, 0.2, (*shape, family.inputs)).astype(jnp.float32)
    targets = jr.normal(k2, (*shape, family.outputs), jnp.float32)
    return xs, targets


def mse(y: Float[Array, " n"], target: Float[Array, " n"]) -> Float[Array, ""]:
    return jnp.mean((y - target) ** 2)


def algorithms() -> dict[str, etrace.AbstractAlgorithm]:
    return {
        "D-RTRL": etrace.D_RTRL(),
        "ES-D-RTRL": etrace.ES_D_RTRL(decay=ES_DECAY),
        # D-RTRL with its traces stored in bfloat16 (etrace only).
        BF16: etrace.ReducedPrecision(etrace.D_RTRL(), jnp.bfloat16),
        # D-RTRL with its traces advanced `CHUNK` steps at a time (etrace only).
        CHUNKED: etrace.D_RTRL(),
        # The readout's leak `exp(-1/tau)`, tau = 20 steps (`SpikingNet.output`).
        EPROP: etrace.EProp(kappa=math.exp(-1 / 20.0)),
        # e-prop without a filter (its traces and read-out are D-RTRL's).
        EPROP_PLAIN: etrace.EProp(),
    }


def applies(name: str, config: Config) -> bool:
    """Whether method `name` is measured on `config`: e-prop's filter is that of a
    leaky readout, which only the LIF network has."""
    return name not in (EPROP, EPROP_PLAIN) or config.family.name == "LIF"


def trace_bytes(learner: etrace.Learner) -> int:
    """Bytes of the traces of one example, from shapes (nothing allocated)."""
    shapes = jax.eval_shape(learner.init)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(shapes.traces)
    )


def broadcast(tree: Any, batch: int) -> Any:
    return jtu.tree_map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), tree)


def chunk_of(name: str) -> int | None:
    """The `chunk` that method `name` passes to `etrace.online_grad`."""
    return CHUNK if name == CHUNKED else None


def online_step(
    learner: etrace.Learner, static: Any, optim, chunk: int | None = None
) -> Callable:
    def step(params, opt_state, xs, targets):
        model = eqx.combine(params, static)
        trace_state = learner.init(batch_size=xs.shape[1])
        grads, _, losses = etrace.online_grad(
            learner, mse, model, trace_state, xs, targets, chunk=chunk
        )
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, jnp.sum(losses)

    return step


def per_step_training(
    learner: etrace.Learner, static: Any, optim, vmapped: bool = False
) -> Callable:
    """A training step that scans the batched `learner.step` (or, with `vmapped`,
    `jax.vmap` of the unbatched one) over the sequence, adds up each step's
    gradient of the batch-mean loss, as a user writes it, then updates once."""
    step = jax.vmap(learner.step, in_axes=(None, 0, 0)) if vmapped else learner.step

    def loss(model, ts, x, target):
        y, ts = step(model, ts, x)
        return jnp.mean(jax.vmap(mse)(y, target)), ts

    grad = eqx.filter_value_and_grad(loss, has_aux=True)

    def train(params, opt_state, xs, targets):
        model = eqx.combine(params, static)
        ts = learner.init(batch_size=xs.shape[1])

        def body(carry, inputs):
            ts, total = carry
            (value, ts), grads = grad(model, ts, *inputs)
            # Lets XLA update the carried traces in place (a no-op for most).
            ts = learner.after_read_out(ts, grads)
            return (ts, jax.tree.map(jnp.add, total, grads)), value

        zeros = jax.tree.map(jnp.zeros_like, params)
        (_, grads), losses = jax.lax.scan(body, (ts, zeros), (xs, targets))
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, jnp.sum(losses)

    return train


def bptt_step(state: eqx.nn.State, static: Any, optim) -> Callable:
    def step(params, opt_state, xs, targets):
        model = eqx.combine(params, static)
        batched = broadcast(state, xs.shape[1])
        grads, losses = etrace.bptt_grad(mse, model, batched, xs, targets, batched=True)
        updates, opt_state = optim.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, jnp.sum(losses)

    return step


def step_function(
    config: Config, name: str, per_step: bool = False, concat_gru: bool = False
):
    """`(step, args)`: the step function of algorithm `name` (or BPTT) on
    `config`, as `measure` builds it, and its arguments (for `kernels.py` and
    `alternating.py`); with `per_step`, `per_step_training`'s instead of
    `online_grad`'s; with `concat_gru`, on the GRU written as braintrace writes
    it."""
    model, state = build(config, concat_gru=concat_gru)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(LEARNING_RATE)
    args = (params, optim.init(params), *data(config))
    if name == "BPTT":
        return bptt_step(state, static, optim), args
    x0 = jnp.zeros(config.family.inputs, jnp.float32)
    with warnings.catch_warnings():  # `ConcatGRUCell`'s `W_r`, held fixed
        warnings.simplefilter("ignore", etrace.EtraceWarning)
        learner, _ = etrace.compile(
            model, x0, state=state, algorithm=algorithms()[name]
        )
    if per_step:
        return per_step_training(learner, static, optim), args
    return online_step(learner, static, optim, chunk_of(name)), args


def compiled_run(
    config: Config, name: str, per_step: bool = False, concat_gru: bool = False
) -> tuple[Callable[[], None], Any]:
    """`(run, compiled)`: `compiled` is `step_function`'s step, compiled, and each
    `run()` one call of it that carries the parameters and optimiser state on to
    the next. Called once here (the first call allocates)."""
    step, args = step_function(config, name, per_step, concat_gru)
    compiled = jax.jit(step).lower(*args).compile()
    carry = list(args[:2])

    def run() -> None:
        params, opt_state, loss = compiled(*carry, *args[2:])
        jax.block_until_ready((params, opt_state, loss))
        carry[:] = [params, opt_state]

    run()
    return run, compiled


def measure_step(step: Callable, args: tuple, count: int) -> dict[str, Any]:
    """Compile time, temporary memory and median wall time of `step(*args)`, which
    returns `(params, opt_state, loss)`; the first two are fed back in."""
    lowered, lower_s = timed(lambda: jax.jit(step).lower(*args))
    compiled, xla_s = timed(lowered.compile)
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    carry = list(args[:2])
    rest = args[2:]

    def run():
        params, opt_state, loss = compiled(*carry, *rest)
        jax.block_until_ready((params, opt_state, loss))
        carry[:] = [params, opt_state]

    run()  # the first call allocates; not timed
    median, fastest = median_time(run, count)
    return {
        "step_seconds": median,
        "step_seconds_min": fastest,
        "compile_seconds": lower_s + xla_s,
        "lower_seconds": lower_s,
        "temp_bytes": temp,
    }


def measure(config: Config, names: Sequence[str], count: int) -> list[dict[str, Any]]:
    model, state = build(config)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(LEARNING_RATE)
    args = (params, optim.init(params), *data(config))
    x0 = jnp.zeros(config.family.inputs, jnp.float32)
    rows = []
    for name in names:
        if not applies(name, config):
            continue
        extra: dict[str, Any] = {}
        if name == "BPTT":
            step = bptt_step(state, static, optim)
        else:
            (learner, _), setup_s = timed(
                lambda: etrace.compile(
                    model, x0, state=state, algorithm=algorithms()[name]
                )
            )
            step = online_step(learner, static, optim, chunk_of(name))
            extra = {
                "setup_seconds": setup_s,
                "trace_bytes_per_example": trace_bytes(learner),
            }
        rows.append(row(config, name, **measure_step(step, args, count), **extra))
        r = rows[-1]
        print(
            f"{config.family.name} H={config.hidden} T={config.length} {name}: "
            f"step {1e3 * r['step_seconds']:.1f} ms, "
            f"compile {r['compile_seconds']:.2f} s",
            flush=True,
        )
    return rows


def metadata(benchmark: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "library": "etrace",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "equinox": eqx.__version__,
        "optax": optax.__version__,
        "etrace": etrace.__version__,
        "python": platform.python_version(),
        "dtype": "float32",
    }


def write_record(
    out: pathlib.Path, benchmark: str, rows: list[dict[str, Any]], **extra: Any
) -> None:
    """Writes `rows` with the machine and library versions (and `extra`) as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {**metadata(benchmark), **extra, "results": rows}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, extra=(BF16, CHUNKED, EPROP, EPROP_PLAIN), processes=True)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    count = repeats(args)

    configs = selected(args)
    rows, heading = measure_selected(__file__, argv, args, measure)
    print(f"\n{heading}")
    print(training_table(rows))

    # One description per family.
    models = {c.family.name: c.family.description for c in configs}
    write_record(
        args.out,
        "training",
        rows,
        repeats=count,
        processes=args.processes,
        models=models,
    )
    return rows


if __name__ == "__main__":
    main()
