"""ES-D-RTRL's training step against the matrix products it cannot leave out.

For the models of `training.py` (the same sizes and batches), times the ES-D-RTRL
training step (as `training.py` does: `etrace.online_grad` over `T` steps and an
Adam update) and, in the same run and called in turn with it, a scan over the same
`T` steps of nothing but the matrix products that every implementation of
ES-D-RTRL computes at each step, whatever library runs it. For each weight that
feeds a hidden group through a matrix product (a GRU's `weight_ih` and
`weight_hh`, the LIF layer's `synapses`):

* the forward product `W x` for the whole batch, which the model needs, and
* the read-out: the batch sum of the outer products of the output trace (times
  the learning signal) and the input trace, one matrix product contracting the
  batch, which each step's weight gradient needs.

The shapes are those the compiled learner reports (`Unit.site`); each step's
input is a random array of its own, so that nothing is hoisted out of the loop,
and the read-out's output-side factor is the step's forward product (of the same
shape), so that the read-out waits for it as the real one waits for the learning
signal; each read-out is added to a running sum, as `online_grad` does. Left out
are the products outside the recurrence (the readout layers and their gradients)
and all element-wise work (the nonlinearities, the Jacobians, the trace updates),
so the scan's time is a lower bound for an ES-D-RTRL step of the model on this
machine. A second scan, `chunked`, sums the read-out of `CHUNK` steps as one
product (the outer products of `CHUNK` steps stacked along the batch): the least
these products cost if a read-out were allowed to wait for `CHUNK` steps.

The table gives each per step (the step's time divided by `T`), the fraction of
the step the products take, and, where `benchmarks/results/peer_braintrace.json`
(from `peer_braintrace.py`, run before) has the configuration, braintrace's
ES-D-RTRL step per step and half of it: a step twice as fast as braintrace's has
to fit in that half. (braintrace's GRU computes no read-out for its reset gate's
weight, a third fewer read-out products than the floor counts.)

```
python benchmarks/products.py
python benchmarks/products.py --quick
python benchmarks/products.py --models lif --lif-hidden 512 --repeats 11
```

Prints a table and writes `benchmarks/results/products.json`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from configs import add_size_options, Config, format_table, repeats, row, selected
from roofline import interleaved
from training import algorithms, build, data, online_step, write_record

import etrace


RESULTS = pathlib.Path(__file__).parent / "results" / "products.json"
PEER = pathlib.Path(__file__).parent / "results" / "peer_braintrace.json"
NAME = "ES-D-RTRL"
# Steps whose read-outs the `chunked` floor sums as one product (divides every
# benchmarked `T`).
CHUNK = 10


def product_shapes(learner: etrace.Learner) -> list[tuple[int, int]]:
    """`(outputs, inputs)` of every dense weight product that feeds a hidden
    group (a site whose canonical form is one matrix: `B = Fx = 1`)."""
    return [
        (u.site.fw, u.site.c)
        for u in learner.graph.units
        if u.site.kind == "matrix"
        and u.site.op == "dot_general"
        and u.site.b == u.site.fx == 1
    ]


def forward(w: jax.Array, x: jax.Array) -> jax.Array:
    """`W x` over a batch: `(M, C)` by `(N, C)` to `(N, M)`."""
    return jnp.einsum("mc,nc->nm", w, x)


def read_out(weighted: jax.Array, x: jax.Array) -> jax.Array:
    """The batch sum of outer products, `(N, M)` by `(N, C)`; a matrix with more
    rows than columns is formed as its transpose, as `etrace.online_grad` sums it
    (the layout XLA's CPU product writes fastest)."""
    if weighted.shape[1] > x.shape[1]:
        return jnp.einsum("nm,nc->cm", weighted, x)
    return jnp.einsum("nm,nc->mc", weighted, x)


def operands(shapes, batch: int, length: int, key) -> list[tuple[Any, Any]]:
    """Per product: the weight, and each step's input."""
    out = []
    for m, c in shapes:
        k1, k2, key = jr.split(key, 3)
        out.append(
            (
                jr.normal(k1, (m, c), jnp.float32),
                jr.normal(k2, (length, batch, c), jnp.float32),
            )
        )
    return out


def zeros(ops) -> list[Any]:
    """The running sums of the read-outs."""
    sums = [jax.eval_shape(read_out, w[None, :, 0], x[0]) for w, x in ops]
    return [jnp.zeros(s.shape, s.dtype) for s in sums]


def per_step_floor(ops) -> Any:
    """Each step's forward products and read-outs, in a scan over the steps. The
    read-out takes the forward product's result for the weighted output trace
    (the same shape), so that it waits for the product as the real one waits for
    the learning signal."""

    def body(gs, xs):
        ys = [forward(w, x) for (w, _), x in zip(ops, xs)]
        return [g + read_out(y, x) for g, y, x in zip(gs, ys, xs)], None

    gs, _ = jax.lax.scan(body, zeros(ops), [x for _, x in ops])
    return gs


def chunked_floor(ops, chunk: int) -> Any:
    """The forward products of each step, and the read-outs of `chunk` steps as
    one product per weight."""

    def forwards(_, xs):
        return None, [forward(w, x) for (w, _), x in zip(ops, xs)]

    def body(gs, xs):
        _, ys = jax.lax.scan(forwards, None, xs)
        flat = [a.reshape((-1, a.shape[-1])) for a in ys + xs]
        return [g + read_out(y, x) for g, y, x in zip(gs, flat, flat[len(gs) :])], None

    def split(a):
        return a.reshape((a.shape[0] // chunk, chunk) + a.shape[1:])

    gs, _ = jax.lax.scan(body, zeros(ops), [split(x) for _, x in ops])
    return gs


def blocking(fn: Callable, *args: Any) -> Callable[[], None]:
    """A call of the compiled `fn(*args)` that waits for its result."""
    compiled = jax.jit(fn).lower(*args).compile()

    def run():
        jax.block_until_ready(compiled(*args))

    run()  # the first call allocates; not timed
    return run


def peer_steps() -> dict[tuple[Any, ...], float]:
    """braintrace's ES-D-RTRL step seconds by configuration, if measured."""
    if not PEER.exists():
        return {}
    rows = json.loads(PEER.read_text())["results"]
    return {
        (r["model"], r["hidden"], r["batch"], r["T"]): r["step_seconds"]
        for r in rows
        if r["algorithm"] == NAME
    }


def measure(config: Config, count: int, peer: dict) -> dict[str, Any]:
    model, state = build(config)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(1e-3)
    args = (params, optim.init(params), *data(config))
    x0 = jnp.zeros(config.family.inputs, jnp.float32)
    learner, _ = etrace.compile(model, x0, state=state, algorithm=algorithms()[NAME])
    shapes = product_shapes(learner)
    ops = operands(shapes, config.family.batch, config.length, jr.key(2))
    runs = {
        "step": blocking(online_step(learner, static, optim), *args),
        "floor": blocking(per_step_floor, ops),
        "chunked": blocking(lambda o: chunked_floor(o, CHUNK), ops),
    }
    times = interleaved(runs, count)
    braintrace = peer.get(config.key)
    out = row(
        config,
        NAME,
        products=[list(s) for s in shapes],
        step_seconds=times["step"],
        floor_seconds=times["floor"],
        chunked_floor_seconds=times["chunked"],
        chunk=CHUNK,
        braintrace_step_seconds=braintrace,
    )
    us = 1e6 / config.length
    print(
        f"{config.family.name} H={config.hidden} T={config.length}: "
        f"step {times['step'] * us:.1f} us, products {times['floor'] * us:.1f} us, "
        f"chunked {times['chunked'] * us:.1f} us per step",
        flush=True,
    )
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = [
        "model",
        "H",
        "T",
        "step us",
        "products us",
        "products / step",
        "chunked us",
        "braintrace us",
        "braintrace / 2 us",
    ]
    body = []
    for r in rows:
        us = 1e6 / r["T"]
        peer = r["braintrace_step_seconds"]
        body.append(
            [
                r["model"],
                str(r["hidden"]),
                str(r["T"]),
                f"{r['step_seconds'] * us:.1f}",
                f"{r['floor_seconds'] * us:.1f}",
                f"{r['floor_seconds'] / r['step_seconds']:.2f}",
                f"{r['chunked_floor_seconds'] * us:.1f}",
                "-" if peer is None else f"{peer * us:.1f}",
                "-" if peer is None else f"{peer * us / 2:.1f}",
            ]
        )
    return format_table(head, body)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, algorithms=False)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="JSON path")
    args = parser.parse_args(argv)
    count = repeats(args)
    peer = peer_steps()
    rows = [measure(config, count, peer) for config in selected(args)]
    print(f"\nmedian of {count} calls of each, in turn, after compilation, float32")
    print(table(rows))
    write_record(args.out, "products", rows, repeats=count, chunk=CHUNK)
    return rows


if __name__ == "__main__":
    main()
