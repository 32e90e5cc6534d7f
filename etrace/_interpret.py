"""One abstract interpreter over the flat program, with one table of primitives.

The compiler asks several questions of a step element by element, each answered by
pushing an abstract value per variable through the equations: which neuron each
element belongs to (`_analysis/labels.py`), where a value is zero whatever the
unknown inputs are (`Zeros`), and which previous hidden values and parameter
elements each element depends on (`_analysis/dependency.py`). Each question is a
*domain*: a subclass of `AbstractInterpreter` that says, per category of primitive,
how an equation maps its operands' abstract values to its outputs'. The categories
come from one table, `TABLE`, so that a primitive is element-wise, a layout move or
a reduction for every domain alike, and a primitive the table does not know is
treated conservatively (every output element depends on every input element) by all
of them. Which parameters or states a whole variable depends on (`union_bits`) is
the union over its operands whatever the primitive, so it walks the equations
without the table.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Collection, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _ir


class Category(enum.Enum):
    """What a primitive does to the elements of its operands. The value names the
    method of `AbstractInterpreter` that handles the category."""

    # `out[i]` combines the operands' elements `[i]` (scalars broadcast).
    ELEMENTWISE = "elementwise"
    # `out[i]` is the operand's `[i]`, up to dtype or precision.
    IDENTITY = "identity"
    # Moves elements without combining them; see `operand_roles`.
    LAYOUT = "layout"
    # Combines the elements along `params["axes"]`.
    REDUCTION = "reduction"
    # Combines the elements along `params["axis"]`, keeping the axis.
    CUMULATIVE = "cumulative"
    # `dot_general`: combines the contracted elements of both operands.
    CONTRACTION = "contraction"
    # `custom_jvp_call`/`custom_vjp_call`: a body that the domain can interpret.
    CALL = "call"
    # Control flow, whose bodies the compiler does not look into.
    CONTROL = "control"
    # Anything else: every output element may depend on every input element.
    OTHER = "other"


_NAMES = {
    Category.ELEMENTWISE: """add sub mul div rem pow integer_pow max min neg sign floor
        ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan asin
        acos atan sinh cosh asinh acosh atanh atan2 sqrt rsqrt cbrt abs square erf
        erfc erf_inv lgamma digamma igamma nextafter eq ne lt le gt ge and or not xor
        select_n clamp conj real imag add_any shift_left shift_right_logical
        shift_right_arithmetic population_count""",
    Category.IDENTITY: """convert_element_type copy copy_p reduce_precision
        stop_gradient""",
    Category.LAYOUT: """reshape broadcast_in_dim transpose squeeze expand_dims slice
        rev concatenate pad split dynamic_slice dynamic_update_slice gather""",
    Category.REDUCTION: """reduce_sum reduce_max reduce_min reduce_prod reduce_and
        reduce_or reduce_xor argmax argmin""",
    Category.CUMULATIVE: "cumsum cumprod cummax cummin cumlogsumexp",
    Category.CONTRACTION: "dot_general",
    Category.CALL: "custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr",
    Category.CONTROL: "cond while scan switch",
}


def _table(names: dict[Category, str]) -> dict[str, Category]:
    table: dict[str, Category] = {}
    for cat, text in names.items():
        for name in text.split():
            if name in table:
                raise ValueError(f"`{name}` is listed as {table[name]} and as {cat}.")
            table[name] = cat
    return table


# Every primitive the interpreter knows, with its one category.
TABLE: dict[str, Category] = _table(_NAMES)


def names(cat: Category) -> frozenset[str]:
    """The primitives of one category."""
    return frozenset(name for name, c in TABLE.items() if c is cat)


ELEMENTWISE = names(Category.ELEMENTWISE)
CALLS = names(Category.CALL)
CONTROL = names(Category.CONTROL)

# Layout primitives that move elements to other positions (a reshape or a broadcast
# keeps each element's position in C order, up to repetition).
MOVES = frozenset(
    """transpose rev concatenate slice pad split dynamic_slice dynamic_update_slice
    gather""".split()
)


class Role(enum.Enum):
    """What an operand of a layout primitive is."""

    DATA = "data"  # elements that the primitive moves
    INDEX = "index"  # where to move them: must be known at compile time
    FILL = "fill"  # `pad`'s padding value


def operand_roles(eqn: _ir.Eqn) -> tuple[Role, ...]:
    """The role of each operand of a layout equation."""
    n = len(eqn.ins)
    if eqn.name == "concatenate":
        return (Role.DATA,) * n
    if eqn.name == "pad":
        return (Role.DATA, Role.FILL)
    if eqn.name == "dynamic_update_slice":
        return (Role.DATA, Role.DATA) + (Role.INDEX,) * (n - 2)
    return (Role.DATA,) + (Role.INDEX,) * (n - 1)


def call_body(eqn: _ir.Eqn) -> Any:
    """The `ClosedJaxpr` body of a call, or `None`."""
    for key in ("call_jaxpr", "fun_jaxpr", "jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def body_program(eqn: _ir.Eqn) -> _ir.Program:
    """The body of a call (`Category.CALL`) as a program."""
    return _ir.from_closed_jaxpr(call_body(eqn))


def category(eqn: _ir.Eqn) -> Category:
    """The category of an equation's primitive (`OTHER` for a call without a body)."""
    cat = TABLE.get(eqn.name, Category.OTHER)
    if cat is Category.CALL and call_body(eqn) is None:
        return Category.OTHER
    return cat


class AbstractInterpreter(abc.ABC):
    """Pushes abstract values through the equations of a program.

    A domain subclasses it: `env` maps a variable to its abstract value, `get` reads
    an operand's (`None` where it has none: a literal, a variable that no seed
    reaches), and one method per `Category` maps an equation to its outputs'
    abstract values. `run` walks equations in order and skips those none of whose
    operands has a value; a demand-driven domain instead computes a variable's
    value in `get`, from its producer.

    The category methods default to the conservative `other`; `identity` defaults
    to `elementwise`; `call` to `other` (see `inline` for interpreting the body).
    """

    def __init__(self, program: _ir.Program):
        self.program = program
        self.env: dict[int, Any] = {}
        # The equation being run, for domains that record where something happens.
        self.at = -1
        self._statics: dict[int, Any] = {}

    def get(self, v: _ir.Operand) -> Any:
        if isinstance(v, _ir.Lit):
            return None
        return self.env.get(v)

    def shape(self, v: _ir.Operand) -> tuple[int, ...]:
        return tuple(self.program.aval(v).shape)

    def static(self, v: _ir.Operand) -> np.ndarray | None:
        """The value of an operand computed from constants and literals alone (a
        layout primitive's indices), or `None`."""
        return _ir.literal_value(self.program, v, self._statics)

    def skips(self, eqn: _ir.Eqn) -> bool:
        return all(self.get(v) is None for v in eqn.ins)

    def run(self, eqn_ids: Iterable[int]) -> None:
        for i in eqn_ids:
            eqn = self.program.eqns[i]
            self.at = i
            outs = [None] * len(eqn.outs) if self.skips(eqn) else self.apply(eqn)
            self.store(eqn, outs)

    def store(self, eqn: _ir.Eqn, outs: list[Any]) -> None:
        for o, val in zip(eqn.outs, outs):
            if val is not None:
                self.env[o] = val

    def apply(self, eqn: _ir.Eqn) -> list[Any]:
        """The abstract values of `eqn`'s outputs, by the category of its primitive."""
        return getattr(self, category(eqn).value)(eqn)

    def inline(self, eqn: _ir.Eqn, inner: AbstractInterpreter) -> list[Any]:
        """Runs `inner`, the same domain over `eqn`'s body (`body_program`), from
        this domain's values of `eqn`'s operands; returns its outputs' values."""
        body = inner.program
        for var, v in zip(body.invars, eqn.ins):
            val = self.get(v)
            if val is not None:
                inner.env[var] = val
        inner.run(range(len(body.eqns)))
        return [inner.get(v) for v in body.outvars]

    @abc.abstractmethod
    def elementwise(self, eqn: _ir.Eqn) -> list[Any]: ...

    @abc.abstractmethod
    def other(self, eqn: _ir.Eqn) -> list[Any]: ...

    def identity(self, eqn: _ir.Eqn) -> list[Any]:
        return self.elementwise(eqn)

    def layout(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)

    def reduction(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)

    def cumulative(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)

    def contraction(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)

    def call(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)

    def control(self, eqn: _ir.Eqn) -> list[Any]:
        return self.other(eqn)


# ----------------------------------------------------------------------------------
# Structural zeros.

_NOTHING: frozenset[int] = frozenset()
# Element-wise primitives whose result is zero where an operand is zero (a
# product), where all operands are (a sum), and where their one operand is.
_PRODUCT = frozenset({"mul", "and"})
_SUM = frozenset({"add", "sub", "add_any", "max", "min", "or"})
_KEEPS_ZERO = frozenset({"neg"})


class Zeros(AbstractInterpreter):
    """Where a value can be non-zero, whatever the values the program does not
    know: `(mask * W)` is zero wherever a constant `mask` is, and so is everything
    computed from it that keeps zeros (a product, a sum of such values, a layout
    move, a product with a matrix).

    Demand-driven: `get(v)` computes the mask of `v` (a boolean array of its shape)
    from its producer, and remembers it. A value computed from constants and
    literals alone gets its exact non-zeros. `known` (non-parameter model arrays)
    count as masks where they are read as one, and as concrete values where they
    pick the case of a `select_n`; `used` records those that were read. `concrete`
    never looks behind the variables in `opaque` (those that depend on a parameter
    or on the state), which keeps it from walking a long update back to its inputs.
    """

    def __init__(
        self,
        program: _ir.Program,
        known: dict[int, Any] | None = None,
        opaque: Collection[int] = (),
    ):
        super().__init__(program)
        self.known = {} if known is None else known
        self.opaque = opaque
        self.used: set[int] = set()
        self._concrete: dict[int, tuple[np.ndarray | None, frozenset[int]]] = {}

    def get(self, v: _ir.Operand) -> np.ndarray:
        if isinstance(v, _ir.Lit):
            return np.broadcast_to(np.asarray(v.val) != 0, self.shape(v))
        if v not in self.env:
            self.env[v] = np.broadcast_to(self._find(v), self.shape(v))
        return self.env[v]

    def _find(self, v: int) -> np.ndarray:
        if v in self.known:
            self.used.add(v)
            return np.asarray(np.asarray(self.known[v]) != 0)
        value, knowns = self.concrete(v)
        if value is not None and not knowns:
            return np.asarray(value != 0)
        p = self.program.producer.get(v)
        if p is None:
            return np.ones(self.shape(v), bool)
        eqn = self.program.eqns[p]
        outs = self.apply(eqn)
        for o, mask in zip(eqn.outs, outs):
            self.env.setdefault(o, np.broadcast_to(mask, self.shape(o)))
        return self.env[v]

    def concrete(self, v: _ir.Operand) -> tuple[np.ndarray | None, frozenset[int]]:
        """`v`'s value where constants, literals and `known` arrays determine it
        (else `None`), and the `known` arrays it was computed from."""
        if isinstance(v, _ir.Lit):
            return np.asarray(v.val), _NOTHING
        if v in self._concrete:
            return self._concrete[v]
        program = self.program
        p = program.producer.get(v)
        if v in self.known:
            got = (np.asarray(self.known[v]), frozenset({v}))
        elif v in program.consts:
            got = (np.asarray(program.consts[v]), _NOTHING)
        elif v in self.opaque or p is None:
            got = (None, _NOTHING)
        else:
            eqn = program.eqns[p]
            args = [self.concrete(a) for a in eqn.ins]
            knowns = _NOTHING.union(*(k for _, k in args))
            if any(a is None for a, _ in args):
                outs: list[Any] = [None] * len(eqn.outs)
            else:
                with jax.ensure_compile_time_eval():
                    outs = _ir.bind(eqn, *(jnp.asarray(a) for a, _ in args))
                outs = [np.asarray(o) for o in outs]
            for o, val in zip(eqn.outs, outs):
                self._concrete[o] = (val, knowns)
            return self._concrete[v]
        self._concrete[v] = got
        return got

    def other(self, eqn: _ir.Eqn) -> list[np.ndarray]:
        return [np.ones(self.shape(o), bool) for o in eqn.outs]

    def identity(self, eqn: _ir.Eqn) -> list[np.ndarray]:
        return [self.get(eqn.ins[0])]

    def elementwise(self, eqn: _ir.Eqn) -> list[np.ndarray]:
        name = eqn.name
        shape = self.shape(eqn.outs[0])
        if name == "select_n":
            return [self._select(eqn, shape)]
        if name in _KEEPS_ZERO:
            return [self.get(eqn.ins[0])]
        if name not in _PRODUCT and name not in _SUM:
            return self.other(eqn)
        ins = [np.broadcast_to(self.get(v), shape) for v in eqn.ins]
        combine = np.logical_and if name in _PRODUCT else np.logical_or
        return [np.asarray(combine.reduce(ins))]

    def _select(self, eqn: _ir.Eqn, shape: tuple[int, ...]) -> np.ndarray:
        cases = [np.broadcast_to(self.get(v), shape) for v in eqn.ins[1:]]
        which, knowns = self.concrete(eqn.ins[0])
        self.used.update(knowns)
        if which is None:
            return np.asarray(np.logical_or.reduce(cases))
        return np.asarray(np.choose(np.broadcast_to(which.astype(int), shape), cases))

    def layout(self, eqn: _ir.Eqn) -> list[np.ndarray]:
        roles = operand_roles(eqn)
        masks = [
            None if r is Role.INDEX else self.get(v) for v, r in zip(eqn.ins, roles)
        ]
        if all(m is None or m.all() for m in masks):
            return self.other(eqn)  # moving non-zeros around leaves non-zeros
        args = []
        for v, mask in zip(eqn.ins, masks):
            if mask is not None:
                args.append(jnp.asarray(mask))
                continue
            index, knowns = self.concrete(v)
            if index is None or knowns:
                return self.other(eqn)
            args.append(jnp.asarray(index))
        try:
            with jax.ensure_compile_time_eval():
                outs = _ir.bind(eqn, *args)
        except Exception:  # a primitive that refuses booleans
            return self.other(eqn)
        return [np.asarray(o) for o in outs]

    def contraction(self, eqn: _ir.Eqn) -> list[np.ndarray]:
        masks = [self.get(v) for v in eqn.ins]
        if all(m.all() for m in masks):
            return self.other(eqn)
        with jax.ensure_compile_time_eval():
            args = [jnp.asarray(m, jnp.float32) for m in masks]
            (out,) = _ir.bind(eqn, *args)
        return [np.asarray(np.asarray(out) > 0)]


# ----------------------------------------------------------------------------------
# Bitmasks of whole variables.


def union_bits(
    program: _ir.Program,
    eqn_ids: Iterable[int],
    seeds: dict[int, int],
    *,
    pinned: Collection[int] = (),
    cut: Collection[str] = (),
    carries: Callable[[Any], bool] | None = None,
) -> dict[int, int]:
    """The domain of whole variables: per variable, a bitmask that is the union of
    its operands' (which parameters, states or groups a value depends on). The
    rule is the same for every category of primitive, so this walks the equations
    `eqn_ids` without dispatching on them.

    **Arguments:**

    - `program`: the program.
    - `eqn_ids`: the equations to walk, in order.
    - `seeds`: the bits a variable has of its own (an input's, or a new state's
        that stands for itself); a produced variable gets them besides its
        operands'.
    - `pinned`: variables that have their seeds only, whatever their operands.
    - `cut`: primitives whose outputs carry no bits (`stop_gradient`, for
        dependence through derivatives).
    - `carries`: whether a variable of this aval carries bits (e.g. inexact values
        only, as a comparison's boolean result has no derivative).

    **Returns:**

    The non-zero bitmask of each variable.
    """
    env = {v: m for v, m in seeds.items() if m}
    avals = program.avals
    for i in eqn_ids:
        eqn = program.eqns[i]
        m = 0
        if eqn.name not in cut:
            for a in eqn.ins:
                if isinstance(a, int):
                    m |= env.get(a, 0)
        for o in eqn.outs:
            bits = m if carries is None or not m or carries(avals[o]) else 0
            if o in seeds:
                bits = seeds[o] if o in pinned else bits | seeds[o]
            if bits:
                env[o] = bits
    return env
