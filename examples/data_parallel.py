"""Data-parallel online training: the batch sharded over devices with `jax.sharding`.

A GRU learns to output a delayed copy of a noisy sine (a small generated regression
task) online with D-RTRL. The batch axis of the trace state and of the data is split
over a one-axis device mesh with `etrace.shard_batch`; the model and the optimiser
state are replicated. `jax.jit` does the rest: each device runs its share of the
batch and XLA reduces the gradients.

The script first checks the set-up against one device: the gradient of one chunk of
sequences with the batch sharded equals the single-device gradient, and the compiled
per-device memory of the trace state falls as 1/N. Then it trains and plots the loss.

Without several accelerators it runs on CPU with four virtual devices: the script
sets JAX's `jax_num_cpu_devices` when it is the first to use JAX and no device count
is given in `XLA_FLAGS` (`--xla_force_host_platform_device_count=N` chooses another):

```
python examples/data_parallel.py --steps 100 --plot data_parallel.png
XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
```
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from tqdm import tqdm

import etrace


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Refused (RuntimeError) once JAX has run something: the devices are then the
    # ones the importing program set up.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", 4)


class Net(eqx.Module):
    cell: eqx.nn.GRUCell
    readout: eqx.nn.Linear

    def __init__(self, hidden: int, key: Any):
        k1, k2 = jr.split(key)
        self.cell = eqx.nn.GRUCell(1, hidden, key=k1)
        self.readout = eqx.nn.Linear(hidden, 1, key=k2)

    def __call__(self, x, h):
        h = self.cell(x, h)
        return self.readout(h), h


def loss_fn(y, target):
    return jnp.mean((y - target) ** 2)


def make_batch(key, length: int, batch: int, delay: int):
    """Noisy sines with random phases; the target is the clean input `delay` steps
    earlier. Time on axis 0, batch on axis 1."""
    k1, k2 = jr.split(key)
    phase = jr.uniform(k1, (1, batch), maxval=2 * np.pi)
    t = jnp.arange(length + delay)[:, None]
    clean = jnp.sin(0.3 * t + phase)
    noisy = clean + 0.1 * jr.normal(k2, clean.shape)
    return noisy[delay:, :, None], clean[:length, :, None]


def trace_bytes_per_device(compiled: Any) -> int:
    analysis = compiled.memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)


def check(learner, model, mesh, batch: int, length: int) -> dict[str, float]:
    """Sharded against single-device: gradient error and per-device memory."""
    xs, ys = make_batch(jr.key(1), length, batch, 3)
    grad = eqx.filter_jit(etrace.online_grad)
    single = grad(learner, loss_fn, model, learner.init(batch_size=batch), xs, ys)[0]
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded_ts = etrace.shard_batch(learner.init(batch_size=batch), mesh)
    sxs, sys_ = etrace.shard_batch((xs, ys), mesh, axis=1)
    smodel = jax.device_put(model, replicated)
    sharded = grad(learner, loss_fn, smodel, sharded_ts, sxs, sys_)[0]
    errors = [
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
    ]

    def lowered(ts, xs, ys):
        def run(ts, xs, ys):
            return etrace.online_grad(learner, loss_fn, model, ts, xs, ys)[:2]

        return jax.jit(run).lower(ts, xs, ys)

    one = lowered(learner.init(batch_size=batch), xs, ys).compile()
    many = lowered(sharded_ts, sxs, sys_).compile()
    return {
        "devices": float(mesh.size),
        "max_rel_error": max(errors),
        "bytes_one_device": float(trace_bytes_per_device(one)),
        "bytes_per_device_sharded": float(trace_bytes_per_device(many)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description="Data-parallel online training of a GRU with D-RTRL."
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--length", type=int, default=40, help="steps per chunk")
    parser.add_argument("--steps", type=int, default=150, help="training chunks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--plot", default="data_parallel.png", help="PNG path")
    args = parser.parse_args(argv)

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(AxisType.Auto,))
    model = Net(args.hidden, jr.key(0))
    learner, _ = etrace.compile(model, jnp.zeros(1), state=jnp.zeros(args.hidden))

    report = check(learner, model, mesh, args.batch, args.length)
    print(
        f"{devices} device(s) ({jax.devices()[0].platform}); sharded vs single-device "
        f"gradient: max relative error {report['max_rel_error']:.2e}"
    )
    ratio = report["bytes_per_device_sharded"] / report["bytes_one_device"]
    print(
        "compiled memory (arguments + temporaries) per device: "
        f"{report['bytes_one_device'] / 2**10:.1f} KiB on one device, "
        f"{report['bytes_per_device_sharded'] / 2**10:.1f} KiB with the batch over "
        f"{devices} (ratio {ratio:.2f})"
    )

    replicated = NamedSharding(mesh, PartitionSpec())
    optimiser = optax.adam(args.lr)
    model = jax.device_put(model, replicated)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))
    opt_state = jax.device_put(opt_state, replicated)
    trace_state = etrace.shard_batch(learner.init(batch_size=args.batch), mesh)

    @eqx.filter_jit(donate="all-except-first")
    def train_step(model, opt_state, trace_state, xs, ys):
        grads, trace_state, losses = etrace.online_grad(
            learner, loss_fn, model, trace_state, xs, ys
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, trace_state, losses.mean()

    losses = []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="training (sharded batch)"):
        xs, ys = make_batch(jr.key(100 + step), args.length, args.batch, 3)
        xs, ys = etrace.shard_batch((xs, ys), mesh, axis=1)
        model, opt_state, trace_state, loss = train_step(
            model, opt_state, trace_state, xs, ys
        )
        losses.append(float(loss))
    seconds = (time.perf_counter() - start) / max(args.steps, 1)
    report.update(
        first_loss=losses[0], final_loss=float(np.mean(losses[-10:])), seconds=seconds
    )
    print(
        f"loss {losses[0]:.4f} -> {report['final_loss']:.4f} over {args.steps} chunks "
        f"of {args.length} steps, {1e3 * seconds:.1f} ms per chunk"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(losses)
    ax.set_xlabel("chunk")
    ax.set_ylabel("mean loss")
    ax.set_yscale("log")
    ax.set_title(f"D-RTRL, batch {args.batch} over {devices} devices")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    print(f"saved {args.plot}")
    return report


if __name__ == "__main__":
    main()
