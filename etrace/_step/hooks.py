"""Every `custom_vjp` identity the step places on values: their backward passes
turn the cotangents that autodiff brings into what the algorithms need.

Each hook's output depends on the (batched) values it is placed on, so under `vmap`
its backward pass runs per example (or, with `summed`, once for the batch) before
autodiff sums anything over the batch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def summed_over_batch(read_out: Callable, summed: Callable, on: bool) -> Callable:
    """`read_out(*args)`, which when `on` computes its batch `vmap` as
    `summed(*batched args)`: the weights' cotangents summed over the batch,
    unbatched. Only valid where the weights are shared by the batch (the batched
    step): their gradient is then the sum over the batch whatever the loss, and
    `custom_vjp` would sum it anyway. Off, `read_out` itself."""
    if not on:
        return read_out
    summed_read_out = jax.custom_batching.custom_vmap(read_out)

    @summed_read_out.def_vmap
    def _(axis_size, in_batched, *args):
        def batched(a, flag):
            return a if flag else jnp.broadcast_to(a, (axis_size,) + a.shape)

        out = summed(*jtu.tree_map(batched, args, tuple(in_batched)))
        return out, [False] * len(out)

    return summed_read_out


def gradient_hook(read_out: Callable, anchored: bool = False):
    """An identity on hidden values whose backward pass hands their cotangent
    `dL/dh` to `read_out(traces, jac, cot, anchor_cot)`, which returns the
    cotangents of `weights` (the live values the traces belong to).

    With `anchored`, it also returns an *anchor*: a zero vector (one entry per
    neuron, computed from the hidden values so that it is batched too) for
    `output_hook` to consume; the anchor's cotangent is the feedback learning
    signal."""

    @jax.custom_vjp
    def hook(leaves, weights, traces, jac):
        del weights, traces, jac
        if anchored:
            return leaves, jnp.reshape(leaves[0], (-1,)) * 0
        return leaves

    def fwd(leaves, weights, traces, jac):
        return hook(leaves, weights, traces, jac), (traces, jac)

    def bwd(res, cot):
        traces, jac = res
        cot, anchor_cot = cot if anchored else (cot, None)
        return cot, read_out(traces, jac, cot, anchor_cot), None, None

    hook.defvjp(fwd, bwd)
    return hook


def _is_float(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def output_hook(project: Callable, from_target: bool, sizes: list[tuple[int, Any]]):
    """An identity on the model's output whose backward pass sends each anchored
    group (`sizes`: its neuron count and dtype) its feedback signal
    `project(index, vector, n)`: a projection of `dL/dy`, or of the target with
    `from_target`."""

    @jax.custom_vjp
    def hook(y, anchors, target):
        del anchors, target
        return y

    def fwd(y, anchors, target):
        return y, target

    def bwd(target, cot):
        if from_target:
            vec = [jnp.reshape(jnp.asarray(t), (-1,)) for t in jtu.tree_leaves(target)]
        else:
            vec = [jnp.reshape(c, (-1,)) for c in cot if _is_float(c)]
        vec = jnp.concatenate(vec) if vec else jnp.zeros((0,))
        signals = [
            project(i, vec, n).astype(dtype) for i, (n, dtype) in enumerate(sizes)
        ]
        return cot, signals, None

    hook.defvjp(fwd, bwd)
    return hook


def signal_hook(signal: Callable):
    """An identity on hidden values whose backward pass returns their learning
    signal `signal(cot)` as the cotangent of `probe` (and nothing for the weights,
    which it does not take): a chunk's steps record their signals so."""

    @jax.custom_vjp
    def hook(leaves, probe):
        del probe
        return leaves

    def fwd(leaves, probe):
        return hook(leaves, probe), None

    def bwd(_, cot):
        return cot, signal(cot)

    hook.defvjp(fwd, bwd)
    return hook


def flush_hook(read_out: Callable):
    """An identity on hidden values whose backward pass hands their cotangent to
    `read_out(*chunk, cot)`, which returns the weights' cotangents: a chunk's last
    step reads out the chunk's gradient so."""

    @jax.custom_vjp
    def hook(leaves, weights, chunk):
        del weights, chunk
        return leaves

    def fwd(leaves, weights, chunk):
        return hook(leaves, weights, chunk), chunk

    def bwd(chunk, cot):
        return cot, read_out(*chunk, cot), None

    hook.defvjp(fwd, bwd)
    return hook
