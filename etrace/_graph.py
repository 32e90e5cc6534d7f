"""The analysed structure of a model's step, as the algorithms see it.

A *site* is a place where a parameter enters the recurrent update: the output of a
matrix weight operation `y = op(W, x)`, or an element-wise parameter value `e` (a bias,
decay or threshold, after any computation on parameters alone). A *hidden group* is a
set of state leaves whose neurons interact element-wise (an LSTM's `h` and `c`). A
*unit* is one site feeding one group: it is what an algorithm keeps a trace for.

Every site is put in a canonical form `y[b, w, f] = sum_c W[b, w, c] x[b, f, c]`
with `B` batch (grouped) dimensions, `Fw` outputs per weight row, `Fx` input
positions sharing the weight, and `C` contracted inputs. A dense layer is
`B = Fx = 1`; an element-wise parameter is `B = Fx = C = 1` with `x = 1`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._ir import Operand
from ._kernels import tile


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """A hidden group: `k` state leaves of `n` neurons each that interact element-wise.

    **Attributes:**

    - `name`: a readable name (the paths of its state leaves joined with `+`).
    - `leaves`: indices of its leaves among the flattened state leaves.
    - `leaf_names`: the paths of those leaves.
    - `shapes`: the shapes of those leaves (all of `n` elements).
    - `n`: number of neurons (elements per leaf).
    - `k`: number of states per neuron.
    - `dtype`: the dtype of its leaves, promoted over them: complex where any leaf
        is (a complex recurrence and a real state reading its real part).
    - `dtypes`: the dtype of each leaf; `None` (the default) where all are `dtype`.
    - `coupling`: the structural pattern of the diagonal Jacobian `D`:
        `coupling[k][j]` is `False` where the new value of state `k` cannot depend
        on the previous value of state `j` (no path between them in the update, or
        only through `stop_gradient` or integer and boolean values), so that
        `D[:, k, j]` is zero for every input. `None` (the default) claims nothing.
        A spiking neuron's spike state is the typical zero column: its previous
        value is not read by its own update.
    """

    name: str
    leaves: tuple[int, ...]
    leaf_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    n: int
    k: int
    dtype: Any
    coupling: tuple[tuple[bool, ...], ...] | None = None
    dtypes: tuple[Any, ...] | None = None

    def leaf_dtype(self, k: int) -> Any:
        """The dtype of state `k`."""
        return self.dtype if self.dtypes is None else self.dtypes[k]

    @property
    def parts(self) -> int:
        """Real numbers per neuron, over its states: 2 for a complex state (real and
        imaginary parts), 1 for a real one."""
        return sum(
            2 if jnp.issubdtype(self.leaf_dtype(k), jnp.complexfloating) else 1
            for k in range(self.k)
        )

    def couples(self, k: int, j: int) -> bool:
        """Whether `D[:, k, j]` can be non-zero (see `coupling`)."""
        return self.coupling is None or self.coupling[k][j]


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """Where a parameter enters the recurrent update (see the module docstring).

    **Attributes:**

    - `name`: a readable name, e.g. `cell.weight_ih @ x`, `conv.weight * x`,
        `embedding.weight[x]`.
    - `kind`: `"matrix"` (a weight operator: a product, convolution or look-up,
        see `etrace._ops`) or `"elementwise"`.
    - `op`: the primitive of a weight operator (`"dot_general"`,
        `"conv_general_dilated"`, `"gather"`, `"dynamic_slice"`), else `None`.
    - `out`: the variable of the traced step holding the site's output.
    - `weight`: the variable holding the weight (computed from parameters alone);
        for an element-wise site, the same as `out`.
    - `x`: the first input of a weight operator that depends on the state or the
        input, else `None`; `inputs`: all its operands other than the weight.
    - `eqn`: the index of the weight operator's equation, else `None`.
    - `params`: indices of the parameter leaves the site's weight depends on.
    - `b`, `fw`, `fx`, `c`: the canonical sizes.
    - `w_shape`: the weight's shape; `w_perm` orders its dimensions as
        `(B, Fw, C)` and `y_perm` the output's as `(B, Fw, Fx)`, each before a
        reshape.
    - `dtype`: the dtype of the site's output.
    - `w_pos`: the operand position of the weight in the equation.
    - `x_fn`: maps the non-weight operands to the canonical input `(B, Fx, C)`
        (a transpose for products, the image patches for convolutions, one-hot
        rows for look-ups).
    - `pattern`: for a weight with structural zeros (a constant mask), a boolean
        array `(B, Fw, C)` of the entries that can be non-zero; else `None`.
    """

    name: str
    kind: str
    out: int
    weight: int
    x: Operand | None
    eqn: int | None
    params: tuple[int, ...]
    b: int
    fw: int
    fx: int
    c: int
    w_shape: tuple[int, ...]
    w_perm: tuple[int, ...]
    y_perm: tuple[int, ...]
    dtype: Any
    op: str | None = None
    w_pos: int = 0
    inputs: tuple[Operand, ...] = ()
    x_fn: Any = None
    pattern: np.ndarray | None = None

    def canonical_x(self, *inputs: Any) -> Any:
        """The op's input in canonical `(B, Fx, C)` form (ones for element-wise),
        from its non-weight operands."""
        if self.kind == "elementwise":
            return jnp.ones((1, 1, 1), self.dtype)
        return self.x_fn(inputs).astype(self.dtype)

    def canonical_y(self, y: Any) -> Any:
        """An array shaped like the site's output, in canonical `(B, Fw, Fx)` form."""
        y = jnp.transpose(y, self.y_perm) if self.y_perm else y
        return y.reshape(self.b, self.fw, self.fx)

    def canonical_y_np(self, y: np.ndarray) -> np.ndarray:
        """`canonical_y` for NumPy arrays (used at compile time)."""
        y = np.transpose(y, self.y_perm) if self.y_perm else y
        return y.reshape(self.b, self.fw, self.fx)

    def canonical_w_np(self, w: np.ndarray) -> np.ndarray:
        """A NumPy array shaped like the weight, in canonical `(B, Fw, C)` form."""
        return np.transpose(w, self.w_perm).reshape(self.b, self.fw, self.c)

    def weight_from_canonical(self, g: Any) -> Any:
        """Maps a canonical `(B, Fw, C)` weight gradient back to the weight's layout."""
        permuted = tuple(self.w_shape[i] for i in self.w_perm)
        g = g.reshape(permuted)
        return jnp.transpose(g, tuple(np.argsort(self.w_perm)))


@dataclasses.dataclass(frozen=True, eq=False)
class Unit:
    """One site feeding one hidden group: the thing an algorithm keeps traces for.

    **Attributes:**

    - `name`: `"<site name> -> <group name>"`, the key of its traces.
    - `site`: the `Site`.
    - `group`: the `Group`.
    - `nmap`: integer array of shape `(B, Fw, Fx)`: the neuron of the group that each
        canonical output feeds (outputs that feed another group map to 0 and have a
        zero `Df`).
    - `same_df`: the name of another unit of the same group whose `Df` equals
        this unit's for every input, or `None`. It is set where the two sites'
        outputs have the same shape and layout and are added before anything else
        in the group's update reads them, as a bias added to a product
        (`W @ x + b`): the update then cannot tell them apart. Algorithms whose
        traces depend on a unit only through `Df` and `D` may keep one trace for
        both (see `ES_D_RTRL`).
    """

    name: str
    site: Site
    group: Group
    nmap: np.ndarray
    same_df: str | None = None

    @property
    def k(self) -> int:
        """The number of states per neuron of the unit's group."""
        return self.group.k

    @property
    def dtype(self) -> Any:
        """The dtype of the unit's traces (`Df` and what it multiplies): the site's
        output dtype promoted with the group's, so a real weight output that feeds
        a complex hidden state has complex traces."""
        return jnp.result_type(self.site.dtype, self.group.dtype)

    def gather(self, a: Any, axis: int = 0) -> Any:
        """`a[nmap]` along `axis`: per-neuron values (`D`, the learning signal) taken
        to each canonical output, shape `a.shape[:axis] + (B, Fw, Fx) +
        a.shape[axis + 1:]`.

        The usual maps are regular (every output its own neuron; gates that
        repeat the neurons, as in a GRU's `3H` outputs; positions that share a
        channel, as in a convolution) and are then a reshape or broadcast that XLA
        fuses into what reads them; other maps are a gather.
        """
        a = jnp.asarray(a)
        n = a.shape[axis]
        flat = self.nmap.reshape(-1)
        m = flat.size
        lead, rest = a.shape[:axis], a.shape[axis + 1 :]
        span = np.arange(n)
        if m % n == 0 and np.array_equal(flat, np.tile(span, m // n)):
            out = tile(a, m // n, axis)
        elif m % n == 0 and np.array_equal(flat, np.repeat(span, m // n)):
            out = jnp.expand_dims(a, axis + 1)
            out = jnp.broadcast_to(out, lead + (n, m // n) + rest)
        else:
            index = (slice(None),) * axis + (flat,)
            out = a.at[index].get(mode="promise_in_bounds")
        return out.reshape(lead + self.nmap.shape + rest)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """`(B, Fw, Fx, C)`."""
        s = self.site
        return (s.b, s.fw, s.fx, s.c)


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """What the compiler found in a model's step.

    **Attributes:**

    - `groups`: the hidden groups, in state-leaf order.
    - `units`: the traced (site, group) pairs, grouped by group in that order.
    - `hidden_size`: the number of real hidden values of all groups together (the
        length of the hidden vector that whole-state algorithms such as `RTRL` use,
        in group order, each leaf flattened; a complex leaf counts twice, as its real
        parts followed by its imaginary parts, so that the whole-state Jacobians are
        real and exact for any complex update).
    - `params`: for whole-state algorithms, `(path, shape, dtype)` of every parameter
        that reaches a hidden state, by any path.
    - `downstream`: per group name, the names of the other hidden groups whose update
        reads this group's new state, in the same step, through a weight op (the
        next temporal layer; a leaky readout with state of its own).
    - `pattern`: computes the structural Jacobian pattern on first use (see
        `jacobian_pattern`); set by `etrace.compile`.
    - `outputs`: per group name, the positions `k` of its state leaves whose new
        values a weight op reads in the same step (the neuron's output, e.g. the
        spike leaf): where a feedback learning signal is delivered.
    - `paths`: the paths of the model's arrays, indexed as `Site.params`.
    - `direct_sites`: per parameter path, the name of the site whose weight (or,
        for an element-wise site, whose value) is that parameter itself, with no
        computation or layout operation between them, where that site is the
        parameter's only way into a hidden state. The parameter's immediate
        Jacobian is then the site's `dh/dy` times its input `x` (a dense product
        with `B = Fx = 1`: the outer product of the two; for whole-state
        algorithms that declare `site_jacobians`, such as `KF_RTRL`).
    """

    groups: tuple[Group, ...]
    units: tuple[Unit, ...]
    hidden_size: int = 0
    params: tuple[tuple[str, tuple[int, ...], Any], ...] = ()
    pattern: Any = None
    downstream: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    outputs: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    paths: tuple[str, ...] = ()
    direct_sites: dict[str, str] = dataclasses.field(default_factory=dict)

    def units_of(self, path: str) -> tuple[Unit, ...]:
        """The units whose weight depends on the model array at `path`."""
        if path not in self.paths:
            return ()
        index = self.paths.index(path)
        return tuple(u for u in self.units if index in u.site.params)

    def jacobian_pattern(self, sparse: bool = False) -> tuple[Any, dict[str, Any]]:
        """The structural non-zero pattern of the full hidden-to-hidden Jacobian
        `(H, H)` and of each parameter's immediate Jacobian `(H, *shape)`, as NumPy
        booleans (computed once, on first use; for sparse whole-state algorithms
        such as `SnAp`). With `sparse=True`, as SciPy boolean CSR matrices, each
        parameter's of shape `(H, size)` (its elements in C order)."""
        if self.pattern is None:
            from ._errors import EtraceError

            raise EtraceError(
                "This graph carries no Jacobian pattern: use the `learner.graph` "
                "of a learner built by `etrace.compile`."
            )
        return self.pattern(sparse)

    def subgraph(self, group: Group) -> Graph:
        """The graph restricted to one hidden group."""
        units = tuple(u for u in self.units if u.group is group)
        return Graph(
            (group,),
            units,
            group.n * group.k,
            (),
            downstream={group.name: self.downstream.get(group.name, ())},
            outputs={group.name: self.outputs.get(group.name, ())},
            paths=self.paths,
        )

    def unit_bytes(self, unit: Unit, per_element: int) -> int:
        """The bytes of a dense D-RTRL trace of `unit`: `K` arrays `(B, Fw, Fx, C)`."""
        return math.prod(unit.shape) * unit.k * per_element
