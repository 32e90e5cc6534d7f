"""Weight operators: the primitives the compiler cuts, and their canonical forms.

A weight operator is an equation `y = op(W, x...)` that is linear in a weight `W`
computed from parameters alone, with the other operands depending on the state or
the input. Every such operator is written in the canonical form

    y[b, w, f] = sum_c W[b, w, c] x[b, f, c]

(see `_graph`), which is all the algorithms see:

* `dot_general` (`W @ x`, `einsum`, batched and grouped products): batch dimensions
  are `B`, the weight's free dimensions `Fw`, the input's free dimensions `Fx`, the
  contracted ones `C`;
* `conv_general_dilated` with the kernel as weight: `B` is the feature groups, `Fw`
  the output channels of a group, `Fx` every output position of every image (the
  kernel is shared over them), and `x` the image patches, so `C` is a group's input
  channels times the kernel's window;
* `gather` and `dynamic_slice` of a weight at input-dependent indices (embedding
  look-ups `W[index]`): `y = onehot(index) @ W`, so `Fw` is the row size, `Fx` the
  number of look-ups and `C` the number of rows; gradients land on looked-up rows
  only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _ir


@dataclasses.dataclass(frozen=True, eq=False)
class Form:
    """A weight operator in canonical form.

    `name` formats the site's name from its parameters' paths; `w_perm` orders the
    weight's dimensions as `(B, Fw, C)` and `y_perm` the output's
    as `(B, Fw, Fx)` (before a reshape); `x_fn` maps the non-weight operands to the
    canonical input `(B, Fx, C)`.
    """

    name: str
    w_pos: int
    b: int
    fw: int
    fx: int
    c: int
    w_perm: tuple[int, ...]
    y_perm: tuple[int, ...]
    x_fn: Callable[[Sequence[Any]], Any]


def _prod(shape: Sequence[int], dims: Sequence[int] | None = None) -> int:
    if dims is not None:
        shape = [shape[d] for d in dims]
    return int(math.prod(shape))


def _dot_form(program: _ir.Program, eqn: _ir.Eqn, w_pos: int) -> Form:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc = (lc, rc) if w_pos == 0 else (rc, lc)
    wb, xb = (lb, rb) if w_pos == 0 else (rb, lb)
    w_shape = program.aval(eqn.ins[w_pos]).shape
    x_shape = program.aval(eqn.ins[1 - w_pos]).shape
    w_free = tuple(d for d in range(len(w_shape)) if d not in wc and d not in wb)
    x_free = tuple(d for d in range(len(x_shape)) if d not in xc and d not in xb)
    nb = len(lb)
    if w_pos == 0:
        y_perm = tuple(range(nb + len(w_free) + len(x_free)))
    else:
        nl, nr = len(x_free), len(w_free)
        y_perm = (
            tuple(range(nb))
            + tuple(range(nb + nl, nb + nl + nr))
            + tuple(range(nb, nb + nl))
        )
    b, fx, c = _prod(w_shape, wb), _prod(x_shape, x_free), _prod(w_shape, wc)
    x_perm = tuple(xb) + x_free + tuple(xc)

    def x_fn(xs: Sequence[Any]) -> Any:
        return jnp.transpose(xs[0], x_perm).reshape(b, fx, c)

    return Form(
        "{} @ x",
        w_pos,
        b,
        _prod(w_shape, w_free),
        fx,
        c,
        tuple(wb) + w_free + tuple(wc),
        y_perm,
        x_fn,
    )


def _conv_form(program: _ir.Program, eqn: _ir.Eqn, w_pos: int) -> Form | None:
    p = eqn.params
    if w_pos != 1 or p["batch_group_count"] != 1:
        return None
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    groups = p["feature_group_count"]
    k_shape = program.aval(eqn.ins[1]).shape
    y_shape = program.aval(eqn.outs[0]).shape
    window = tuple(k_shape[d] for d in rhs_spec[2:])
    out_channels = k_shape[rhs_spec[0]]
    c = k_shape[rhs_spec[1]] * _prod(window)
    fx = y_shape[out_spec[0]] * _prod(y_shape, out_spec[2:])
    y_perm = (out_spec[1], out_spec[0]) + tuple(out_spec[2:])
    # The patches' own kernel layout is irrelevant: describe it as OIHW... so that
    # `window` is given in the spatial dimensions' order.
    dn = lax.ConvDimensionNumbers(lhs_spec, tuple(range(len(rhs_spec))), out_spec)

    def x_fn(xs: Sequence[Any]) -> Any:
        patches = lax.conv_general_dilated_patches(
            xs[0],
            window,
            p["window_strides"],
            p["padding"],
            lhs_dilation=p["lhs_dilation"],
            rhs_dilation=p["rhs_dilation"],
            dimension_numbers=dn,
            precision=lax.Precision.HIGHEST,
        )
        # Features are ordered (input channel, window), so each group's block of
        # input channels is contiguous.
        patches = jnp.transpose(patches, y_perm).reshape(groups, c, fx)
        return jnp.swapaxes(patches, 1, 2)

    return Form(
        "{} * x",
        1,
        groups,
        out_channels // groups,
        fx,
        c,
        tuple(rhs_spec),
        y_perm,
        x_fn,
    )


def _lookup_form(
    eqn: _ir.Eqn,
    w_shape: tuple[int, ...],
    indexed: tuple[int, ...],
    offset_dims: tuple[int, ...],
    y_ndim: int,
    y_shape: tuple[int, ...],
) -> Form | None:
    kept = tuple(d for d in range(len(w_shape)) if d not in indexed)
    c = _prod(w_shape, indexed)
    fw = _prod(w_shape, kept)
    if c >= 2**24 or fw == 0:
        return None
    rest = tuple(d for d in range(y_ndim) if d not in offset_dims)
    y_perm = tuple(offset_dims) + rest
    fx = _prod(y_shape, rest)
    # Codes: the flat index of each row over the indexed dimensions, as float32
    # (exact below 2**24) so that an out-of-bounds fill (NaN) matches no row.
    full = [w_shape[d] if d in indexed else 1 for d in range(len(w_shape))]
    codes = np.arange(c, dtype=np.float32).reshape(full)
    table = np.broadcast_to(codes, w_shape)
    # Out-of-bounds look-ups that fill must pick no row, whatever the fill value.
    if eqn.params.get("fill_value") is not None:
        eqn = dataclasses.replace(eqn, params={**eqn.params, "fill_value": np.nan})

    def x_fn(xs: Sequence[Any]) -> Any:
        (picked,) = _ir.bind(eqn, jnp.asarray(table), *xs)
        picked = jnp.transpose(picked, y_perm).reshape(fw, fx)[0]
        return jax.nn.one_hot(picked, c)[None]

    return Form("{}[x]", 0, 1, fw, fx, c, kept + indexed, y_perm, x_fn)


def _gather_form(program: _ir.Program, eqn: _ir.Eqn, w_pos: int) -> Form | None:
    if w_pos != 0:
        return None
    dn = eqn.params["dimension_numbers"]
    if dn.operand_batching_dims:
        return None
    w_shape = tuple(program.aval(eqn.ins[0]).shape)
    sizes = eqn.params["slice_sizes"]
    indexed = tuple(sorted(dn.start_index_map))
    for d in range(len(w_shape)):
        if d in indexed and sizes[d] != 1:
            return None
        if d not in indexed and sizes[d] != w_shape[d]:
            return None
    y_shape = tuple(program.aval(eqn.outs[0]).shape)
    return _lookup_form(
        eqn, w_shape, indexed, tuple(dn.offset_dims), len(y_shape), y_shape
    )


def _dynamic_slice_form(program: _ir.Program, eqn: _ir.Eqn, w_pos: int) -> Form | None:
    if w_pos != 0:
        return None
    w_shape = tuple(program.aval(eqn.ins[0]).shape)
    sizes = eqn.params["slice_sizes"]
    indexed = tuple(d for d in range(len(w_shape)) if sizes[d] != w_shape[d])
    if not indexed or any(sizes[d] != 1 for d in indexed):
        return None
    y_shape = tuple(program.aval(eqn.outs[0]).shape)
    return _lookup_form(
        eqn, w_shape, indexed, tuple(range(len(y_shape))), len(y_shape), y_shape
    )


_FORMS: dict[str, Callable[[_ir.Program, _ir.Eqn, int], Form | None]] = {
    "dot_general": _dot_form,
    "conv_general_dilated": _conv_form,
    "gather": _gather_form,
    "dynamic_slice": _dynamic_slice_form,
}
# Primitives that are weight operators in some of their uses; a use etrace cannot
# put in canonical form is named in the compiler's error.
WEIGHT_PRIMS = frozenset(_FORMS)
# Which operands can hold the weight: both for products, the kernel for
# convolutions, the table for look-ups.
_WEIGHT_SLOTS = {
    "dot_general": (0, 1),
    "conv_general_dilated": (1,),
    "gather": (0,),
    "dynamic_slice": (0,),
}


def weight_position(
    program: _ir.Program,
    eqn: _ir.Eqn,
    param_only: Callable[[Any], bool],
    dynamic: Callable[[Any], bool],
) -> int | None:
    """The operand position of the weight if `eqn` is a weight operator: one
    parameter-only operand in a weight slot, and a dynamic other operand."""
    if eqn.name not in _FORMS:
        return None
    for pos in _WEIGHT_SLOTS[eqn.name]:
        others = [a for k, a in enumerate(eqn.ins) if k != pos]
        if param_only(eqn.ins[pos]) and any(dynamic(a) for a in others):
            if eqn.name == "dot_general" and not dynamic(eqn.ins[1 - pos]):
                continue
            return pos
    return None


def form(program: _ir.Program, eqn: _ir.Eqn, w_pos: int) -> Form | None:
    """The canonical form of a weight operator, or `None` if this use of the
    primitive has none (e.g. a grouped-batch convolution)."""
    return _FORMS[eqn.name](program, eqn, w_pos)
