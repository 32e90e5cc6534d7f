"""Run in a subprocess with 4 virtual CPU devices (see `test_reliability.py`)."""

import json
import sys

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

import etrace  # noqa: E402


sys.path.insert(0, "examples")
import data_parallel  # noqa: E402


model = data_parallel.Net(16, jax.random.key(0))
learner, _ = etrace.compile(model, jnp.zeros(1), state=jnp.zeros(16))
mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,))
report = data_parallel.check(learner, model, mesh, batch=8, length=12)


def chunk_error(chunk):
    """`online_grad(..., chunk=chunk)` on the sharded batch against the step by
    step gradient on one device (12 steps: two chunks of 5 and a rest of 2)."""
    xs, ys = data_parallel.make_batch(jax.random.key(1), 12, 8, 3)
    grad = eqx.filter_jit(etrace.online_grad)
    loss = data_parallel.loss_fn
    single = grad(learner, loss, model, learner.init(batch_size=8), xs, ys)[0]
    ts = etrace.shard_batch(learner.init(batch_size=8), mesh)
    sxs, sys_ = etrace.shard_batch((xs, ys), mesh, axis=1)
    sharded = grad(learner, loss, model, ts, sxs, sys_, chunk=chunk)[0]
    return max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
    )


report["chunk_max_rel_error"] = chunk_error(5)
errors = {}
for name, call in {
    "indivisible": lambda: etrace.shard_batch(jnp.zeros((6, 3)), mesh),
    "no_axis": lambda: etrace.shard_batch(jnp.zeros(()), mesh),
    "axis_name": lambda: etrace.shard_batch(
        jnp.zeros((4,)), jax.make_mesh((2, 2), ("a", "b"))
    ),
    "not_a_mesh": lambda: etrace.shard_batch(jnp.zeros((4,)), "mesh"),
}.items():
    try:
        call()
        errors[name] = None
    except etrace.EtraceError as err:
        errors[name] = str(err)
sharded = etrace.shard_batch({"a": jnp.zeros((8, 3)), "b": 1.0}, mesh)
report["shard_shape"] = list(sharded["a"].addressable_shards[0].data.shape)
report["errors"] = errors
report["x64"] = bool(
    eqx.filter(model, eqx.is_array).cell.weight_ih.dtype == jnp.float64
)
print(json.dumps(report))
