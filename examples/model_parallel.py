"""Model-parallel online training: a spiking network's neurons split over devices.

A recurrent network of leaky integrate-and-fire neurons learns online, with D-RTRL,
to report the slowly varying firing rates behind noisy spike trains. Its traces,
its hidden state and the output rows of its traced weights are split along the
neurons over the `model` axis of a device mesh (`etrace.shard_traces`,
`etrace.shard_params`), and the batch over the `data` axis (`etrace.shard_batch`).
D-RTRL's traces are neuron-local, so each device updates and reads out the rows of
the traces it holds; only per-neuron values (spikes, learning signals) and the
gradients cross devices.

The script prints the compiled memory per device (arguments plus temporaries, from
`compiled.memory_analysis()`) of one training step on four mesh shapes, `1x1`
(one device), `1x4` (neurons over four devices), `4x1` (batch over four devices)
and `2x2`, then trains on the `2x2` mesh and plots the loss.

Without several accelerators it runs on four virtual CPU devices: run as a script,
it sets `XLA_FLAGS=--xla_force_host_platform_device_count=4` before it imports JAX,
unless `XLA_FLAGS` already chooses a count. With fewer than four devices (imported
by a program that gives JAX one) it reports the meshes that fit and trains on one.

```
python examples/model_parallel.py --steps 100 --plot model_parallel.png
```
"""

from __future__ import annotations

import os


# Run as a script: four virtual CPU devices unless `XLA_FLAGS` chooses a count,
# set before JAX is imported (JAX reads it when it starts).
if __name__ == "__main__" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4"

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402
from tqdm import tqdm  # noqa: E402

import etrace  # noqa: E402
import etrace.nn as enn  # noqa: E402


MESHES = ((1, 1), (1, 4), (4, 1), (2, 2))


class Net(eqx.Module):
    """LIF neurons driven by the input and by their own spikes of the previous step,
    read out linearly."""

    w_in: eqx.nn.Linear
    w_rec: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear

    def __init__(self, n_in: int, hidden: int, n_out: int, key: Any):
        k1, k2, k3 = jr.split(key, 3)
        self.w_in = eqx.nn.Linear(n_in, hidden, key=k1)
        w_rec = eqx.nn.Linear(hidden, hidden, use_bias=False, key=k2)
        self.w_rec = eqx.tree_at(lambda lin: lin.weight, w_rec, 0.5 * w_rec.weight)
        self.lif = enn.LIF(hidden, tau=5.0, threshold=0.5)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k3)

    def __call__(self, x, state):
        current = self.w_in(x) + self.w_rec(state.get(self.lif.z))
        z, state = self.lif(current, state)
        return self.readout(z), state


def build(n_in: int, hidden: int, n_out: int, key: Any):
    """The network and its initial state."""
    model, state = eqx.nn.make_with_state(Net)(n_in, hidden, n_out, key)
    return model, state


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def make_batch(key, length: int, batch: int, n_in: int, n_out: int):
    """Spike trains whose rates follow random slow sines; the target is the rates
    of the first `n_out` channels. Time on axis 0, batch on axis 1."""
    k1, k2, k3 = jr.split(key, 3)
    phase = jr.uniform(k1, (1, batch, n_in), maxval=2 * np.pi)
    speed = jr.uniform(k2, (1, batch, n_in), minval=0.05, maxval=0.2)
    t = jnp.arange(length)[:, None, None]
    rates = 0.5 + 0.4 * jnp.sin(speed * t + phase)
    spikes = jr.bernoulli(k3, rates).astype(rates.dtype)
    return spikes, rates[..., :n_out]


def mesh_of(shape: tuple[int, int]) -> Mesh:
    """A `(data, model)` mesh on the first `data * model` devices."""
    devices = np.asarray(jax.devices()[: shape[0] * shape[1]]).reshape(shape)
    return Mesh(devices, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def place(learner, optimiser, model, trace_state, xs, ys, mesh: Mesh):
    """Everything a training step reads, placed on `mesh`: the traced weights'
    rows, the traces and the hidden state split along neurons over `model`, the
    batch over `data`, the rest replicated. The optimiser's state starts from the
    placed parameters, so its moments are split like them."""
    model = etrace.shard_params(model, learner, mesh, neuron_axis="model")
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    # What is not shaped like a parameter (adam's step count) is replicated.
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = jax.tree.map(
        lambda a: (
            a
            if isinstance(a.sharding, NamedSharding)
            else jax.device_put(a, replicated)
        ),
        opt_state,
    )
    trace_state = etrace.shard_traces(
        trace_state, learner, mesh, neuron_axis="model", batch_axis="data"
    )
    xs, ys = etrace.shard_batch((xs, ys), mesh, axis=1, axis_name="data")
    return model, opt_state, trace_state, xs, ys


def make_train_step(learner, optimiser):
    def train_step(model, opt_state, trace_state, xs, ys):
        grads, trace_state, losses = etrace.online_grad(
            learner, loss_fn, model, trace_state, xs, ys
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, trace_state, losses.mean()

    return train_step


def step_memory(learner, optimiser, model, trace_state, xs, ys, mesh) -> int:
    """Compiled memory per device of one training step on `mesh`: arguments plus
    temporaries."""
    args = place(learner, optimiser, model, trace_state, xs, ys, mesh)
    dynamic, static = eqx.partition(args, eqx.is_array)
    step = make_train_step(learner, optimiser)

    def run(dynamic):
        return eqx.filter(step(*eqx.combine(dynamic, static)), eqx.is_array)

    analysis = jax.jit(run).lower(dynamic).compile().memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)


def memory_table(hidden: int, batch: int, length: int, n_in: int = 16) -> list[dict]:
    """Per mesh shape that fits the devices, the compiled memory per device."""
    model, state = build(n_in, hidden, 2, jr.key(0))
    learner, _ = etrace.compile(model, jnp.zeros(n_in), state=state)
    optimiser = optax.adam(1e-3)
    xs, ys = make_batch(jr.key(1), length, batch, n_in, 2)
    rows = []
    for shape in MESHES:
        if shape[0] * shape[1] > jax.device_count():
            continue
        ts = learner.init(batch_size=batch)
        used = step_memory(learner, optimiser, model, ts, xs, ys, mesh_of(shape))
        rows.append({"mesh": f"{shape[0]}x{shape[1]}", "bytes_per_device": used})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Model-parallel online training of a recurrent LIF network."
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--length", type=int, default=50, help="steps per chunk")
    parser.add_argument("--steps", type=int, default=100, help="training chunks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", default="model_parallel.png", help="PNG path")
    args = parser.parse_args(argv)

    print(f"{jax.device_count()} device(s) ({jax.devices()[0].platform})")
    rows = memory_table(args.hidden, args.batch, args.length, args.inputs)
    print(f"compiled memory per device of one step, H={args.hidden}, B={args.batch}:")
    for row in rows:
        ratio = row["bytes_per_device"] / rows[0]["bytes_per_device"]
        print(
            f"  mesh {row['mesh']} (data x model): "
            f"{row['bytes_per_device'] / 2**20:8.2f} MiB ({ratio:.2f} of 1x1)"
        )

    n_out = 2
    model, state = build(args.inputs, args.hidden, n_out, jr.key(0))
    learner, _ = etrace.compile(model, jnp.zeros(args.inputs), state=state)
    optimiser = optax.adam(args.lr)
    shape = (2, 2) if jax.device_count() >= 4 else (1, 1)
    mesh = mesh_of(shape)
    xs, ys = make_batch(jr.key(1), args.length, args.batch, args.inputs, n_out)
    model, opt_state, trace_state, _, _ = place(
        learner, optimiser, model, learner.init(batch_size=args.batch), xs, ys, mesh
    )
    train_step = eqx.filter_jit(make_train_step(learner, optimiser))

    losses, rates = [], []
    start = time.perf_counter()
    where = f"{shape[0]}x{shape[1]}"
    for step in tqdm(range(args.steps), desc=f"training ({where} mesh)"):
        xs, ys = make_batch(jr.key(100 + step), args.length, args.batch, args.inputs, 2)
        xs, ys = etrace.shard_batch((xs, ys), mesh, axis=1, axis_name="data")
        model, opt_state, trace_state, loss = train_step(
            model, opt_state, trace_state, xs, ys
        )
        losses.append(float(loss))
        rates.append(float(jnp.mean(trace_state.state.get(model.lif.z))))
    seconds = (time.perf_counter() - start) / max(args.steps, 1)
    final = float(np.mean(losses[-10:]))
    print(
        f"loss {losses[0]:.4f} -> {final:.4f} over {args.steps} chunks of "
        f"{args.length} steps ({1e3 * seconds:.1f} ms per chunk); last firing "
        f"rate {rates[-1]:.3f}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(losses)
    ax.set_xlabel("chunk")
    ax.set_ylabel("mean loss")
    ax.set_title(f"D-RTRL, LIF H={args.hidden}, {where} mesh")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    print(f"saved {args.plot}")
    return {"memory": rows, "mesh": where, "losses": losses, "firing_rates": rates}


if __name__ == "__main__":
    main()
