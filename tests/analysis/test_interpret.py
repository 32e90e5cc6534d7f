"""The domains of `etrace._interpret` agree on what they share, primitive by
primitive over its table.

For each primitive, a tiny program that applies it: the neuron-label domain joins an
output element to an input element exactly where the dependency domain says the one
depends on the other, and both contain every dependence found by changing an input
element and watching which outputs change. The structural-zero domain's zeros are
zeros of the values, the same asked on demand as filled in order by the dependency
domain, and they depend on nothing there.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src import ad_util

from etrace import _interpret, _ir
from etrace._analysis import dependency, labels
from etrace._interpret import Category


# Operand kinds: dtype and how to draw values (positive floats keep `log`, `sqrt`
# and friends finite).
_DTYPES = {"f": jnp.float64, "c": jnp.complex128, "i": jnp.int64, "b": jnp.bool_}
FLT, CPX, INT, BOOL = ("f", (2, 3)), ("c", (2, 3)), ("i", (2, 3)), ("b", (2, 3))


def _draw(rng: np.random.Generator, kind: str, shape) -> np.ndarray:
    if kind == "f":
        return rng.uniform(0.2, 0.8, shape)
    if kind == "c":
        return rng.uniform(0.2, 0.8, shape) + 1j * rng.uniform(0.2, 0.8, shape)
    if kind == "i":
        return rng.integers(1, 5, shape)
    return rng.random(shape) < 0.5


@jax.custom_vjp
def _spike(x):
    return (x > 0.5).astype(x.dtype)


_spike.defvjp(lambda x: (_spike(x), x), lambda x, g: (g * x,))


def _unary(fn):
    return fn, (FLT,)


def _binary(fn, kind="f"):
    return fn, ((kind, (2, 3)), (kind, (2, 3)))


# One small program per primitive: the function and its operands.
CASES: dict[str, tuple[Callable, tuple]] = {
    # Element-wise.
    **{
        name: _unary(getattr(lax, name))
        for name in """neg sign floor ceil round exp exp2 log log1p expm1 tanh
            logistic sin cos tan asin acos atan sinh cosh asinh atanh sqrt rsqrt
            cbrt abs square erf erfc erf_inv lgamma digamma""".split()
    },
    "is_finite": _unary(lax.is_finite),
    "acosh": _unary(lambda x: lax.acosh(x + 1.0)),
    "integer_pow": _unary(lambda x: x**3),
    **{
        name: _binary(getattr(lax, name))
        for name in "add sub mul div rem pow max min atan2 nextafter igamma".split()
    },
    **{name: _binary(getattr(lax, name)) for name in "eq ne lt le gt ge".split()},
    "add_any": _binary(ad_util.add_jaxvals_p.bind),
    "and": _binary(lax.bitwise_and, "b"),
    "or": _binary(lax.bitwise_or, "b"),
    "xor": _binary(lax.bitwise_xor, "b"),
    "not": (lax.bitwise_not, (BOOL,)),
    "shift_left": _binary(lax.shift_left, "i"),
    "shift_right_logical": _binary(lax.shift_right_logical, "i"),
    "shift_right_arithmetic": _binary(lax.shift_right_arithmetic, "i"),
    "population_count": (lax.population_count, (INT,)),
    "select_n": (lax.select_n, (BOOL, FLT, FLT)),
    "clamp": (lambda x: lax.clamp(0.3, x, 0.6), (FLT,)),
    "real": (lax.real, (CPX,)),
    "imag": (lax.imag, (CPX,)),
    "conj": (lax.conj, (CPX,)),
    # Identity.
    "convert_element_type": _unary(lambda x: lax.convert_element_type(x, jnp.float32)),
    "copy": _unary(lambda x: jnp.array(x, copy=True)),
    "reduce_precision": _unary(lambda x: lax.reduce_precision(x, 5, 10)),
    "stop_gradient": _unary(lax.stop_gradient),
    # Layout.
    "reshape": _unary(lambda x: x.reshape(3, 2)),
    "broadcast_in_dim": _unary(lambda x: lax.broadcast_in_dim(x, (2, 2, 3), (0, 2))),
    "transpose": _unary(lambda x: x.T),
    "squeeze": (lambda x: lax.squeeze(x, (0,)), (("f", (1, 3)),)),
    "slice": _unary(lambda x: lax.slice(x, (0, 1), (2, 3))),
    "rev": _unary(lambda x: lax.rev(x, (1,))),
    "concatenate": _binary(lambda x, y: jnp.concatenate([x, y], axis=1)),
    "pad": _unary(lambda x: lax.pad(x, 0.0, ((1, 0, 0), (0, 1, 1)))),
    "split": _unary(lambda x: lax.split(x, (1, 2), axis=1)),
    "dynamic_slice": _unary(lambda x: lax.dynamic_slice(x, (1, 0), (1, 2))),
    "dynamic_update_slice": (
        lambda x, y: lax.dynamic_update_slice(x, y, (0, 1)),
        (FLT, ("f", (1, 2))),
    ),
    "gather": _unary(lambda x: jnp.take(x, np.array([2, 0, 2]), axis=1)),
    # Reductions.
    "reduce_sum": _unary(lambda x: jnp.sum(x, axis=1)),
    "reduce_max": _unary(lambda x: jnp.max(x, axis=0)),
    "reduce_min": _unary(lambda x: jnp.min(x, axis=1)),
    "reduce_prod": _unary(lambda x: jnp.prod(x, axis=1)),
    "reduce_and": (lambda x: jnp.all(x, axis=1), (BOOL,)),
    "reduce_or": (lambda x: jnp.any(x, axis=0), (BOOL,)),
    "reduce_xor": (lambda x: lax.reduce(x, np.int64(0), lax.bitwise_xor, (1,)), (INT,)),
    "argmax": _unary(lambda x: jnp.argmax(x, axis=1)),
    "argmin": _unary(lambda x: jnp.argmin(x, axis=0)),
    # Cumulative.
    **{
        name: _unary(lambda x, name=name: getattr(lax, name)(x, axis=1))
        for name in "cumsum cumprod cummax cummin cumlogsumexp".split()
    },
    # Contraction.
    "dot_general": (
        lambda x, y: jnp.einsum("bij,bjk->bik", x, y),
        (("f", (2, 2, 3)), ("f", (2, 3, 2))),
    ),
    # Calls.
    "custom_jvp_call": _unary(lambda x: jax.nn.relu(x - 0.5)),
    "custom_vjp_call": _unary(_spike),
    # Control flow.
    "cond": (lambda p, x: lax.cond(p[0, 0], jnp.sin, jnp.cos, x), (BOOL, FLT)),
    "while": _unary(lambda x: lax.while_loop(lambda c: c[0, 0] < 2.0, jnp.exp, x)),
    "scan": _unary(lambda x: lax.scan(lambda c, r: (c + r, c * r), x[0], x)[1]),
    # Anything else.
    "sort": _unary(lambda x: lax.sort(x, dimension=1)),
}
# Names of the table that this version of JAX does not use (older versions do).
ABSENT = frozenset({"copy_p", "expand_dims", "custom_vjp_call_jaxpr", "switch"})
# Negative controls: a wrong category in the table (the same for both domains) or
# a wrong rule of one domain, on primitives where either must make a check fail.
WRONG_CATEGORY = {
    "cumsum": Category.ELEMENTWISE,
    "rev": Category.IDENTITY,
    "gather": Category.IDENTITY,
    "sort": Category.ELEMENTWISE,
}
WRONG_RULE = ["add", "cumsum", "rev", "sort"]
# Primitives whose masked case keeps some structural zeros (so that the check of
# the zeros is not vacuous there).
KEEPS_ZEROS = frozenset(
    """add add_any and broadcast_in_dim concatenate convert_element_type copy
    dot_general dynamic_slice dynamic_update_slice gather max min mul neg or pad
    reduce_precision reshape rev slice split squeeze stop_gradient sub
    transpose""".split()
)


def _program(name: str) -> _ir.Program:
    fn, specs = CASES[name]
    args = [jax.ShapeDtypeStruct(shape, _DTYPES[kind]) for kind, shape in specs]
    return _ir.from_closed_jaxpr(jax.make_jaxpr(fn)(*args))


def _sizes(program: _ir.Program, vs) -> list[int]:
    return [int(np.prod(program.aval(v).shape, dtype=int)) for v in vs]


def _label_reach(program: _ir.Program) -> np.ndarray:
    """`[o, e]`: whether the label of input element `e` (alone) reaches output
    element `o`."""
    shapes = [program.aval(v).shape for v in program.invars]
    n_in = sum(_sizes(program, program.invars))
    columns = []
    for e in range(n_in):
        flat = np.full(n_in, labels.NONE, np.int32)
        flat[e] = 0
        seeds, start = {}, 0
        for v, shape in zip(program.invars, shapes):
            size = int(np.prod(shape, dtype=int))
            seeds[v] = flat[start : start + size].reshape(shape)
            start += size
        lab = labels.Labels(program, seeds)
        lab.run(range(len(program.eqns)))
        outs = []
        for v, size in zip(program.outvars, _sizes(program, program.outvars)):
            got = lab.get(v)
            outs.append(np.zeros(size, bool) if got is None else got.ravel() >= 0)
        columns.append(np.concatenate(outs))
    return np.stack(columns, axis=1)


def _dependencies(program: _ir.Program) -> dependency._Dependencies:
    from scipy import sparse

    sizes = _sizes(program, program.invars)
    n_in = sum(sizes)
    dep = dependency._Dependencies(program, n_in)
    start = 0
    for v, size in zip(program.invars, sizes):
        dep.env[v] = sparse.csr_matrix(
            (np.ones(size, bool), (np.arange(size), start + np.arange(size))),
            shape=(size, n_in),
        )
        start += size
    dep.run(range(len(program.eqns)))
    return dep


def _dependency_rows(program: _ir.Program) -> np.ndarray:
    dep = _dependencies(program)
    n_in = sum(_sizes(program, program.invars))
    rows = []
    for v, size in zip(program.outvars, _sizes(program, program.outvars)):
        got = dep.get(v)
        rows.append(np.zeros((size, n_in), bool) if got is None else got.toarray())
    return np.concatenate(rows)


def _outputs(fn, args) -> np.ndarray:
    """`fn`'s outputs, flattened and concatenated, batched over the leading axis."""
    leaves = jax.tree.leaves(jax.vmap(fn)(*args))
    flat = [np.asarray(x, np.complex128).reshape(x.shape[0], -1) for x in leaves]
    return np.concatenate(flat, axis=1)


def _value_reach(name: str, trials: int = 3) -> np.ndarray:
    """`[o, e]`: whether changing input element `e` changed output element `o` on
    some of `trials` random changes (a dependence that surely exists)."""
    fn, specs = CASES[name]
    rng = np.random.default_rng(0)
    base = [_draw(rng, kind, shape) for kind, shape in specs]
    batches = [[a] for a in base]
    for k, (kind, shape) in enumerate(specs):
        for idx in range(int(np.prod(shape, dtype=int))):
            for _ in range(trials):
                for j, a in enumerate(base):
                    a = a.copy()
                    if j == k:
                        new = _draw(rng, kind, ())
                        a.flat[idx] = ~a.flat[idx] if kind == "b" else new
                    batches[j].append(a)
    outs = _outputs(fn, [np.stack(b) for b in batches])
    same = (outs == outs[:1]) | (np.isnan(outs) & np.isnan(outs[:1]))
    changed = ~same[1:]  # (n_in * trials, n_out)
    return changed.reshape(-1, trials, outs.shape[1]).any(axis=1).T


def _check_agreement(name: str) -> None:
    program = _program(name)
    assert name in {e.name for e in program.eqns}, f"the case never uses `{name}`"
    reach = _label_reach(program)
    depends = _dependency_rows(program)
    assert reach.shape == depends.shape
    wrong = np.argwhere(reach != depends)
    assert not len(wrong), (
        f"`{name}`: labels and dependencies disagree on (output, input) "
        f"{wrong[:5].tolist()}"
    )
    missed = np.argwhere(_value_reach(name) & ~depends)
    assert not len(missed), (
        f"`{name}`: output depends on input at {missed[:5].tolist()}, but the "
        "domains say it does not"
    )


def test_every_primitive_has_exactly_one_category():
    listed = [name for text in _interpret._NAMES.values() for name in text.split()]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(_interpret.TABLE)
    for name, cat in _interpret.TABLE.items():
        assert [c for c in Category if name in _interpret.names(c)] == [cat]
    with pytest.raises(ValueError, match="`add` is listed as"):
        _interpret._table({Category.ELEMENTWISE: "add", Category.LAYOUT: "add"})


def test_every_primitive_of_the_table_has_a_case():
    assert set(CASES) - set(_interpret.TABLE) == {"sort"}
    assert not (set(_interpret.TABLE) - set(CASES) - ABSENT)


@pytest.mark.parametrize("name", sorted(CASES))
def test_labels_and_dependencies_agree(name):
    _check_agreement(name)


@pytest.mark.parametrize("name", sorted(WRONG_CATEGORY))
def test_a_wrong_category_is_caught(name, monkeypatch):
    monkeypatch.setitem(_interpret.TABLE, name, WRONG_CATEGORY[name])
    with pytest.raises(AssertionError, match="the domains say it does not"):
        _check_agreement(name)


@pytest.mark.parametrize("name", WRONG_RULE)
def test_a_wrong_rule_of_one_domain_is_caught(name, monkeypatch):
    eqn = next(e for e in _program(name).eqns if e.name == name)
    method = _interpret.category(eqn).value
    monkeypatch.setattr(labels.Labels, method, labels.Labels.identity)
    with pytest.raises(AssertionError, match="labels and dependencies disagree"):
        _check_agreement(name)


def _masked(name: str, masks: list[np.ndarray]):
    fn, _ = CASES[name]

    def masked(*xs):
        return fn(*(jnp.where(m, x, jnp.zeros_like(x)) for m, x in zip(masks, xs)))

    return masked


@pytest.mark.parametrize("name", sorted(CASES))
def test_structural_zeros_are_zeros_and_depend_on_nothing(name):
    _, specs = CASES[name]
    rng = np.random.default_rng(1)
    masks = [rng.random(shape) < 0.5 for _, shape in specs]
    fn = _masked(name, masks)
    args = [jax.ShapeDtypeStruct(shape, _DTYPES[kind]) for kind, shape in specs]
    program = _ir.from_closed_jaxpr(jax.make_jaxpr(fn)(*args))
    zeros = _interpret.Zeros(program)
    values = _outputs(fn, [_draw(rng, kind, (4,) + shape) for kind, shape in specs])
    nonzero = np.concatenate([zeros.get(v).ravel() for v in program.outvars])
    assert nonzero.all() != (name in KEEPS_ZEROS)
    assert not (values != 0)[:, ~nonzero].any(), "a structural zero is not zero"
    # The dependency domain fills the same zeros in order, and a structural zero
    # depends on nothing.
    dep = _dependencies(program)
    for v, mask in dep.zeros.env.items():
        np.testing.assert_array_equal(mask, zeros.get(v))
        rows = dep.get(v)
        if rows is not None:
            assert not rows.toarray()[~np.ravel(mask)].any()


def test_known_arrays_count_where_read_as_a_mask():
    """`Zeros` with a known array: `W * mask` reads it as a mask (recorded in
    `used`); `W * exp(mask)` does not."""
    mask = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    for fn, pattern, used in (
        (lambda w, m: w * m, mask != 0, True),
        (lambda w, m: w * jnp.exp(m), np.ones((2, 3), bool), False),
        (lambda w, m: jnp.where(m > 0.5, w, 0.0), mask != 0, True),
    ):
        spec = jax.ShapeDtypeStruct((2, 3), jnp.float64)
        program = _ir.from_closed_jaxpr(jax.make_jaxpr(fn)(spec, spec))
        w, m = program.invars
        zeros = _interpret.Zeros(program, known={m: mask}, opaque={w})
        np.testing.assert_array_equal(zeros.get(program.outvars[0]), pattern)
        assert zeros.used == ({m} if used else set())


def test_bits_union_cut_and_carries():
    def fn(x, y):
        a = x * y
        b = lax.stop_gradient(x) + y
        return a, b, a > 0.0

    spec = jax.ShapeDtypeStruct((2,), jnp.float64)
    program = _ir.from_closed_jaxpr(jax.make_jaxpr(fn)(spec, spec))
    x, y = program.invars
    a, b, c = program.outvars
    every = range(len(program.eqns))
    bits = _interpret.union_bits(program, every, {x: 1, y: 2})
    assert (bits[a], bits[b], bits[c]) == (3, 3, 3)
    inexact = _interpret.union_bits(
        program,
        every,
        {x: 1, y: 2},
        cut={"stop_gradient"},
        carries=lambda aval: jnp.issubdtype(aval.dtype, jnp.inexact),
    )
    assert (inexact[a], inexact[b], inexact.get(c, 0)) == (3, 2, 0)
    pinned = _interpret.union_bits(program, every, {x: 1, y: 2, a: 4}, pinned={a})
    assert (pinned[a], pinned[c]) == (4, 4)
