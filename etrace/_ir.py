"""A flat, inlined view of a jaxpr that the compiler can analyse and re-evaluate.

JAX's own `Jaxpr` nests calls (`jit`, `remat`) and its variable objects are internal.
The compiler needs one flat list of equations with plain integer variable ids, so that
it can walk producers and consumers, attach labels to variables, and evaluate the same
equations again with some inputs replaced. Calls are inlined; `custom_jvp_call` and
`custom_vjp_call` are kept whole so that surrogate gradients survive re-evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import equinox
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util


# Primitives whose body is spliced into the surrounding program.
_INLINE = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
)


@dataclasses.dataclass(frozen=True, eq=False)
class Lit:
    """A literal operand."""

    val: Any


Operand = int | Lit


@dataclasses.dataclass(frozen=True, eq=False)
class Eqn:
    """One primitive application: `outs = prim.bind(*ins, **params)`."""

    prim: Any
    ins: tuple[Operand, ...]
    outs: tuple[int, ...]
    params: dict[str, Any]
    source: str

    @property
    def name(self) -> str:
        return self.prim.name


@dataclasses.dataclass(eq=False)
class Program:
    """A flat program: inputs, constants, equations in a valid order, outputs."""

    invars: list[int]
    outvars: list[Operand]
    consts: dict[int, Any]
    eqns: list[Eqn]
    avals: dict[int, Any]
    producer: dict[int, int]

    def aval(self, v: Operand) -> Any:
        if isinstance(v, Lit):
            return jax.typeof(v.val)
        return self.avals[v]


# Frames in these folders are libraries' own: an error names the first frame
# outside them, the user's line, and the library's line beside it.
_LIBRARIES = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (equinox, sys.modules[__name__.rpartition(".")[0]])
    if m.__file__
)


def _frame(frame: Any) -> str:
    path = os.path.abspath(frame.file_name)
    for library in _LIBRARIES:  # a library's file from the library's folder on
        if path.startswith(library):
            parent = os.path.dirname(library.rstrip(os.sep)) + os.sep
            path = path[len(parent) :]
            break
    else:
        path = frame.file_name
    return f"{path}:{frame.start_line} ({frame.function_name})"


def _source(eqn: Any) -> str:
    """Where an equation comes from: the first frame outside JAX, Equinox and
    etrace (the line of the user's model), then the library frame it reached the
    equation through, if any: `model.py:12 (Net.__call__), inside
    equinox/nn/_normalisation.py:149 (LayerNorm.__call__)`."""
    try:
        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    except Exception:  # the location is a convenience for error messages only
        return "<unknown>"
    if not frames:
        return "<unknown>"
    outside = [
        f for f in frames if not os.path.abspath(f.file_name).startswith(_LIBRARIES)
    ]
    if not outside:
        return _frame(frames[0])
    if outside[0] is frames[0]:
        return _frame(frames[0])
    return f"{_frame(outside[0])}, inside {_frame(frames[0])}"


def _sub_jaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """The body of an inlinable call and its constants, or `None`."""
    if eqn.primitive.name not in _INLINE:
        return None
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if body is None:
        return None
    if isinstance(body, jcore.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


class _Builder:
    def __init__(self):
        self.count = 0
        self.avals: dict[int, Any] = {}
        self.consts: dict[int, Any] = {}
        self.eqns: list[Eqn] = []

    def fresh(self, aval: Any) -> int:
        self.count += 1
        self.avals[self.count] = aval
        return self.count

    def walk(self, jaxpr: Any, env: dict[Any, Operand]) -> None:
        def read(v: Any) -> Operand:
            if isinstance(v, jcore.Literal):
                return Lit(v.val)
            return env[v]

        for eqn in jaxpr.eqns:
            ins = tuple(read(v) for v in eqn.invars)
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                body, consts = sub
                sub_env: dict[Any, Operand] = {}
                for var, val in zip(body.constvars, consts):
                    sub_env[var] = self.const(val, var.aval)
                for var, op in zip(body.invars, ins):
                    sub_env[var] = op
                self.walk(body, sub_env)
                for var, out in zip(eqn.outvars, body.outvars):
                    if not isinstance(var, jcore.DropVar):
                        env[var] = (
                            Lit(out.val)
                            if isinstance(out, jcore.Literal)
                            else sub_env[out]
                        )
                continue
            outs = []
            for var in eqn.outvars:
                new = self.fresh(var.aval)
                if not isinstance(var, jcore.DropVar):
                    env[var] = new
                outs.append(new)
            self.eqns.append(
                Eqn(eqn.primitive, ins, tuple(outs), dict(eqn.params), _source(eqn))
            )

    def const(self, val: Any, aval: Any) -> int:
        new = self.fresh(aval)
        self.consts[new] = val
        return new


def from_closed_jaxpr(closed: Any) -> Program:
    """Flattens a `ClosedJaxpr` into a `Program`, inlining nested calls."""
    builder = _Builder()
    env: dict[Any, Operand] = {}
    for var, val in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = builder.const(val, var.aval)
    invars = []
    for var in closed.jaxpr.invars:
        new = builder.fresh(var.aval)
        env[var] = new
        invars.append(new)
    builder.walk(closed.jaxpr, env)
    outvars = [
        Lit(v.val) if isinstance(v, jcore.Literal) else env[v]
        for v in closed.jaxpr.outvars
    ]
    producer = {o: i for i, e in enumerate(builder.eqns) for o in e.outs}
    return Program(
        invars, outvars, builder.consts, builder.eqns, builder.avals, producer
    )


def bind(eqn: Eqn, *args: Any) -> list[Any]:
    """Evaluates one equation on values (or tracers)."""
    got = eqn.prim.get_bind_params(eqn.params)
    if isinstance(got, tuple):  # older JAX returns (subfuns, params)
        subfuns, params = got
    else:
        subfuns, params = (), got
    out = eqn.prim.bind(*subfuns, *args, **params)
    return list(out) if eqn.prim.multiple_results else [out]


def bind_weight_first(eqn: Eqn, *args: Any) -> list[Any]:
    """`bind` for a product `W . x` whose first operand is a weight (the same on
    every example): evaluated as `x . W` and transposed back. Under `vmap` over
    `x` the batch axis then leads the product's output, where `W . x` would put it
    last and every element-wise reader would transpose it."""
    if eqn.name != "dot_general":
        return bind(eqn, *args)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return bind(eqn, *args)
    w, x = args
    params = dict(eqn.params)
    params["dimension_numbers"] = ((rc, lc), ((), ()))
    precision = params.get("precision")
    if isinstance(precision, tuple):
        params["precision"] = precision[::-1]
    out = bind(Eqn(eqn.prim, eqn.ins[::-1], eqn.outs, params, eqn.source), x, w)[0]
    x_free = jnp.ndim(x) - len(rc)
    w_free = jnp.ndim(w) - len(lc)
    perm = tuple(range(x_free, x_free + w_free)) + tuple(range(x_free))
    return [out if x_free == 0 else jnp.transpose(out, perm)]


def evaluate(
    program: Program,
    eqn_ids: Sequence[int],
    env: dict[int, Any],
    read: Callable[[dict[int, Any], Operand], Any] | None = None,
) -> dict[int, Any]:
    """Runs the given equations (in order) over `env`, which it extends in place."""

    def plain(env: dict[int, Any], v: Operand) -> Any:
        return v.val if isinstance(v, Lit) else env[v]

    read = plain if read is None else read
    for i in eqn_ids:
        eqn = program.eqns[i]
        outs = bind(eqn, *(read(env, v) for v in eqn.ins))
        env.update(zip(eqn.outs, outs))
    return env


def literal_value(program: Program, v: Operand, cache: dict[int, Any]) -> Any:
    """The concrete value of an operand that depends only on constants and literals.

    Used at compile time for index operands of layout primitives (e.g. the start
    indices of a `dynamic_slice` written as `x[3]`). Returns `None` if the value
    depends on an input.
    """
    if isinstance(v, Lit):
        return np.asarray(v.val)
    if v in cache:
        return cache[v]
    if v in program.consts:
        cache[v] = np.asarray(program.consts[v])
        return cache[v]
    i = program.producer.get(v)
    if i is None:
        return None
    eqn = program.eqns[i]
    args = [literal_value(program, a, cache) for a in eqn.ins]
    if any(a is None for a in args):
        return None
    with jax.ensure_compile_time_eval():
        outs = bind(eqn, *args)
    for o, val in zip(eqn.outs, outs):
        cache[o] = np.asarray(val)
    return cache[v]


def ancestors(
    program: Program, roots: Sequence[int], stop: Callable[[int], bool]
) -> tuple[set[int], set[int]]:
    """The equations reached backwards from the variables `roots`; `stop(v)` ends
    the walk at `v`. Returns the equations and the variables where it stopped."""
    eqns: set[int] = set()
    stopped: set[int] = set()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if stop(v):
            stopped.add(v)
            continue
        p = program.producer.get(v)
        if p is None or p in eqns:
            continue
        eqns.add(p)
        stack.extend(a for a in program.eqns[p].ins if isinstance(a, int))
    return eqns, stopped


def everything(program: Program, roots: Sequence[int]) -> set[int]:
    """Every equation the variables `roots` depend on."""
    return ancestors(program, roots, lambda v: False)[0]
