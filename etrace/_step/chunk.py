"""A step's part in `online_grad(..., chunk=S)` (see `options.Chunk`): the engine
side of the chunked advance, whose arithmetic is the algorithm's
(`AbstractAlgorithm.chunk_record`, `chunk_update`, `chunk_gradients`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .hooks import flush_hook, signal_hook, summed_over_batch
from .options import Chunk


_sg = jax.lax.stop_gradient


def _signal(cot) -> tuple[Any, ...]:
    """The learning signal as recorded: one flat array per state."""
    return tuple(jnp.reshape(c, (-1,)) for c in cot)


def _joined(earlier, now):
    """The chunk's steps, this one last."""
    return jtu.tree_map(lambda e, a: jnp.concatenate([e, a[None]]), earlier, now)


def hook(step, sub, group, jac, new_vals, weights) -> list[Any]:
    """`GroupStep.hook`'s work in a chunk's step: records this step's Jacobians
    (`COLLECT`), or advances the traces over the chunk (`FLUSH`); returns the
    hooked new values."""
    algorithm = step.algorithm
    record = algorithm.chunk_record(sub, jac)
    if step.options.chunk is Chunk.COLLECT:
        step.records[group.name] = jtu.tree_map(_sg, record)
        return signal_hook(_signal)(new_vals, step.io.probes[group.name])
    records = _joined(step.io.records[group.name], record)
    mine = {u.name: step.traces[u.name] for u in sub.units}
    new = algorithm.chunk_update(sub, mine, records)
    step.new_traces.update(jtu.tree_map(_sg, new))
    dtypes = [jnp.result_type(w) for w in weights]

    def read(chunk, signals, summed):
        traces, records = chunk
        grads = algorithm.chunk_gradients(sub, traces, records, signals, summed=summed)
        return [
            u.site.weight_from_canonical(grads[u.name]).astype(dt)
            for u, dt in zip(sub.units, dtypes)
        ]

    def read_out(chunk, earlier, cot):
        return read(chunk, _joined(earlier, _signal(cot)), False)

    def batch_read_out(chunk, earlier, cot):  # every argument batched first
        now = jax.vmap(_signal)(cot)
        signals = jtu.tree_map(
            lambda e, a: jnp.concatenate([e, a[:, None]], axis=1), earlier, now
        )
        return read(chunk, signals, True)

    chunk = jtu.tree_map(_sg, ((mine, records), step.io.signals[group.name]))
    summed = summed_over_batch(read_out, batch_read_out, step.options.summed)
    return flush_hook(summed)(new_vals, weights, chunk)
