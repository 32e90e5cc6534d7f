"""The CPU-specific ways of writing a computation, in one place.

Each helper computes exactly what its plain form computes (the docstring says
which); it exists because XLA on CPU runs the plain form measurably slower, and the
comment above it gives the measurement (jax 0.10.2, 2-vCPU AMD EPYC, one core,
float32, `benchmarks/`). Where a choice is only right on a CPU it is taken with
`jax.lax.platform_dependent`, so that another backend's compiler sees the plain
form."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._ir import Eqn


# A lone element-wise instruction in its own kernel (`wrapped_add`): adding two
# (64, 384) arrays took 7.3 us alone and 1.2 us with a multiply fused in.
def fused(a: Array) -> Array:
    """`a`, times a one that XLA cannot fold away (it comes out of an
    `optimization_barrier`), so that the instruction computing `a` is one of at
    least two in its kernel. Exact (a number times one is itself). On the CPU only:
    elsewhere `a` itself, since a GPU's compiler fuses element-wise instructions
    with their neighbours anyway."""
    return jax.lax.platform_dependent(a, cpu=_times_kept_one, default=_same)


def _times_kept_one(a: Array) -> Array:
    return a * jax.lax.optimization_barrier(jnp.ones((), jnp.result_type(a)))


def _same(a: Array) -> Array:
    return a


# Updating a trace that is also read for the read-out: without the order XLA
# copies it every step (LIF H = 512 D-RTRL chunk: an 18 us copy of 88).
def after(tree: PyTree, reads: PyTree) -> PyTree:
    """`tree` with a zero computed from `reads` added to its float leaves, so that
    XLA computes `tree` after `reads`: where a step reads a trace to update it and
    for something else (a read-out), XLA writes the updated trace over the previous
    one only when it can tell that the other reader runs first. `tree` is returned
    unchanged where `reads` has no float entry."""
    leaves = [
        r
        for r in jax.tree_util.tree_leaves(reads)
        if jnp.issubdtype(jnp.result_type(r), jnp.inexact) and jnp.size(r)
    ]
    if not leaves:
        return tree
    probe = sum(jnp.real(jnp.ravel(r)[0]).astype(jnp.float32) for r in leaves)
    # Zero, even where `reads` is not finite (an inf times zero is a NaN).
    zero = jnp.where(jnp.isfinite(probe), probe * 0, 0)

    def add(a: Any) -> Any:
        if a is None or not jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            return a
        return a + zero.astype(jnp.result_type(a))

    return jax.tree_util.tree_map(add, tree)


# A reduction over the batch of products goes to a library kernel several times
# slower than the trace update producing them (`benchmarks/training.py`).
def batch_sum(a: Array) -> Array:
    """`a.sum(axis=0)`, written as additions of the batch's even and odd halves,
    which XLA fuses with the products that produce `a` into one pass.

    The halving stops at the number of devices, with an ordinary sum of what is
    left: a batch split over them (`etrace.shard_batch`) is then summed on each
    device first, and only the per-device sums cross devices.
    """
    if a.shape[0] == 0:
        return jnp.zeros(a.shape[1:], a.dtype)
    devices = jax.device_count()
    rest = []
    while a.shape[0] > devices:
        n = a.shape[0]
        if n % 2:
            rest.append(a[-1])
            a = a[: n - 1]
            n -= 1
        a = a[0::2] + a[1::2]
    total = jnp.sum(a, axis=0) if a.shape[0] > 1 else a[0]
    for r in rest:
        total = total + r
    return total


# A reduction over a minor axis of size 2 ran some hundred times slower than the
# additions written out.
def sum_states(a: Array) -> Array:
    """`a.sum(axis=-1)` over the few states `K` of the last axis."""
    total = a[..., 0]
    for k in range(1, a.shape[-1]):
        total = total + a[..., k]
    return total


def weighted_states(signal: Array, a: Array) -> Array:
    """`sum_k signal[..., k] * a[..., k]` (`sum_states`), kept out of a kernel of
    its own (`fused`): with one state it is a lone multiply feeding a product."""
    return fused(sum_states(signal * a))


# A product writing a short last axis: (768, 2048) x (2048, 10) at 12 GFLOP/s,
# its transpose at 64; an outer product per example then a sum, several times
# slower than one product.
def outer_product_sum(a: Array, b: Array, turned: bool = False) -> Array:
    """`sum_n sum_f a[n, b, w, f] b[n, b, f, c]`, the batch sum of per-example outer
    products, `(B, W, C)`, as one matrix product; with `turned`, its transpose
    `(B, C, W)`, as a product that writes it so."""
    n, nb, w, f = a.shape
    c = b.shape[-1]
    if nb == 1:
        # One product contracting the leading axes as they lie (`(n f, w)` by
        # `(n f, c)`): XLA reads transposed operands natively, where a batch
        # dimension would make it transpose them first.
        lhs = a.reshape(n, w, f).transpose(0, 2, 1).reshape(n * f, w)
        rhs = b.reshape(n * f, c)
        if turned:
            return jnp.einsum("kc,kw->cw", rhs, lhs)[None]
        return jax.lax.platform_dependent(
            lhs, rhs, cpu=_summed_outer_product, default=_outer_product
        )[None]
    if turned:
        return jnp.einsum("nbfc,nbwf->bcw", b, a)
    return jnp.einsum("nbwf,nbfc->bwc", a, b)


def _outer_product(lhs: Array, rhs: Array) -> Array:
    return jnp.einsum("kw,kc->wc", lhs, rhs)


# `(W, C)` from `(N, W)` and `(N, C)`, batch 64, a scan of 270 steps adding it up
# (one core): (384, 10) 29.5 us as one product, 14.1 us formed turned and
# transposed, (768, 10) 80.1 against 26.7; with the left operand transposed first,
# (384, 128) 79.6 against 76.2, (768, 256) 314 against 294, LIF (512, 576) batch 32
# 250 against 242. (Turning a long last axis costs: (384, 128) 82.5.) The result
# times a kept one (`fused`): a caller's `total + grad` was otherwise a kernel of
# one add, 7.7 against 2.0 us for a (128, 138) gradient (profiled).
def _summed_outer_product(lhs: Array, rhs: Array) -> Array:
    """`lhs.T @ rhs` of `(N, W)` and `(N, C)`: with a short last axis formed turned,
    `(C, W)`, and transposed; else with `lhs` transposed before an ordinary product.
    The barrier keeps XLA from folding either transpose back into the product; the
    product is multiplied by a one XLA cannot fold, so that an add of it is not a
    kernel of its own."""
    (_, w), (_, c) = lhs.shape, rhs.shape
    if c <= TURNED_INPUTS and w >= 4 * c:
        product = jax.lax.optimization_barrier(rhs.T @ lhs).T
    else:
        product = jax.lax.optimization_barrier(lhs.T) @ rhs
    return _times_kept_one(product)


# An element-wise loop reading a concatenation ran about twice as fast as one
# reading a broadcast, whose index it divides back out per element.
TILED_COPIES = 8


def tile(a: Array, copies: int, axis: int) -> Array:
    """`copies` of `a` side by side along `axis` (a GRU's gates repeat the
    neurons): concatenated up to `TILED_COPIES` copies, else broadcast."""
    if copies <= TILED_COPIES:
        return jnp.concatenate([a] * copies, axis=axis)
    lead, rest = a.shape[:axis], a.shape[axis:]
    out = jnp.broadcast_to(jnp.expand_dims(a, axis), lead + (copies,) + rest)
    return out.reshape(lead + (copies * rest[0],) + rest[1:])


# A LIF layer's (128, 192) weight, batch 32: W @ x 12.0 us, with W stored turned
# and contracted on its first axis 7.4 us. Whole training step without the turn
# (benchmarks/kernels_ablation.py --cpu-clock, one core): 1.00 to 1.08 times as
# long in online_grad and in a scan over the batched learner.step.
def turned_product(bind, eqn, operands: list[Any], w_pos: int) -> Any:
    """`bind(eqn, *operands)[0]`, a product `W . x` whose weight is contracted on
    its last axis, computed on the CPU with the weight turned behind an
    `optimization_barrier` (so that XLA keeps the turn, and hoists it out of a
    loop in which the weight is fixed) and contracted on its first."""

    def product(*args: Any) -> Any:
        return bind(eqn, *args)[0]

    def turned(*args: Any) -> Any:
        e, turned_args = with_weight_turned(eqn, list(args), w_pos)
        return bind(e, *turned_args)[0]

    return jax.lax.platform_dependent(*operands, cpu=turned, default=product)


def with_weight_turned(eqn, args: list[Any], w_pos: int):
    """`eqn` and its operands with a matrix weight that a `dot_general` contracts
    on its last axis (`W @ x` with `W` of shape `(m, i)`) stored turned, `(i, m)`,
    and contracted on its first; anything else unchanged."""
    if eqn.name != "dot_general":
        return eqn, args
    w = args[w_pos]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contracted = lc if w_pos == 0 else rc
    if lb or rb or jnp.ndim(w) != 2 or tuple(contracted) != (1,):
        return eqn, args
    args = list(args)
    args[w_pos] = jax.lax.optimization_barrier(jnp.transpose(w))
    dims = ((0,), rc) if w_pos == 0 else (lc, (0,))
    params = dict(eqn.params)
    params["dimension_numbers"] = (dims, (lb, rb))
    return Eqn(eqn.prim, eqn.ins, eqn.outs, params, eqn.source), args


# A trace whose last axis is short: the update of a (64, 192, 10) trace took 37
# to 53 us per step, the same update with the long axis last 12 to 17 us. A weight
# stored `(in, out)`, (138, 128) (the GRU as braintrace writes it, H = 128, batch
# 64, T = 270, one core): its canonical traces made the batched step 2.06 and
# `online_grad` 1.88 times as long as turned ones.
TURNED_INPUTS = 16


def turns(shape: tuple[int, int, int, int], in_out: bool = False) -> bool:
    """Whether a D-RTRL trace of canonical shape `(B, Fw, Fx, C)` is stored turned,
    `(B, C, Fw, Fx)`: few inputs against many outputs (which also tells the two
    layouts apart by shape); or, with `in_out`, for a weight stored `(C, Fw)`
    (`x @ W`) whose outputs make a long enough last axis: its summed read-out is
    then formed in the weight's layout, where from canonical traces XLA fused the
    transpose into the batch sum's last pass, whose reads then stride."""
    _, w, f, c = shape
    if in_out and w * f >= TURNED_INPUTS:
        return True
    return 2 <= c <= TURNED_INPUTS and w * f >= 4 * c
