"""Evaluating one step of an analysed model: values, Jacobians, traces and hooks.

Each equation reads one of several versions of its operands:

* in the tail (the recurrent update), weight outputs and element-wise parameter values
  are under `stop_gradient`, so autodiff through the tail reaches only the inputs of
  weight ops (the same-step paths into earlier layers), never the traced parameters;
* outside the tail, a new hidden state is read through its group's *hook*: a
  `custom_vjp` identity whose backward pass turns the cotangent `dL/dh` into parameter
  gradients with the algorithm's read-out. Readers that feed back into the same
  group's update (a recurrent weight's input, a peephole) read the value as the tail
  computed it, so no gradient outside the algorithm's equations reaches the traced
  parameters;
* a value from inside the tail read outside it (other than the new state) is
  recomputed with live parameters: a one-step gradient, which the compiler warns about.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from . import _ir
from ._algorithm.d_rtrl import (
    chunk_products,
    chunk_readout,
    chunk_signals,
    chunk_update,
    is_turned,
    split_entries,
)
from ._compiler import Compiled
from ._errors import EtraceError
from ._graph import Graph, Group


class Jacobians(eqx.Module):
    """The per-step quantities an algorithm's `update` and `gradients` receive.

    **Attributes:**

    - `D`: per hidden group name, `D[n, k, k']` = d h_k^t[n] / d h_{k'}^{t-1}[n] with
        weight outputs held fixed, shape `(N, K, K)`.
    - `Df`: per unit name, `Df[b, w, f, k]` = d h_k^t[n(b,w,f)] / d y^t[b, w, f],
        shape `(B, Fw, Fx, K)`.
    - `x`: per unit name, the weight op's input in canonical form `(B, Fx, C)`.
    - `t`: the index of this step since `init`/`reset` (`TraceState.t` before the
        step), for rules that depend on it (e.g. a warm-up bias correction).
    - `J`: for whole-state algorithms, the full hidden-to-hidden Jacobian
        `dh^t/dh^{t-1}` of shape `(H, H)` (through every weight), else `None`; a
        placeholder that raises an `EtraceError` when used if the algorithm declares
        `dense_jacobians = False`.
    - `Jtheta`: for whole-state algorithms, per parameter path the immediate Jacobian
        `dh^t/dtheta` of shape `(H, *theta.shape)`, else `None` (the same placeholder
        under `dense_jacobians = False`).
    - `H`: for algorithms that declare `full_diagonal = True` (`OSTLRecurrent`), per
        hidden group name the per-neuron diagonal blocks of the *full*
        hidden-to-hidden Jacobian, recurrent weights included, shape `(N, K, K)`;
        else `None`.
    - `jvp`: in a whole-state algorithm's `update`, `v -> J v` for `v` of shape
        `(H,)`, without forming `J`; else `None`.
    - `vjp`: in a whole-state algorithm's `update`, `u -> (u^T J, {path: u^T
        Jtheta[path]})` for `u` of shape `(H,)`, without forming either; else
        `None`. Together they cost a few passes over the step, where `J` and
        `Jtheta` take one pullback per hidden value.
    """

    D: dict[str, Any]
    Df: dict[str, Any]
    x: dict[str, Any]
    t: Any
    J: Any = None
    Jtheta: Any = None
    H: Any = None
    jvp: Any = eqx.field(default=None, static=True)
    vjp: Any = eqx.field(default=None, static=True)


class NotFormed(eqx.Module):
    """Stands for `jac.J` or `jac.Jtheta` when the algorithm declares
    `dense_jacobians = False`: any use of it raises an `EtraceError` that says so."""

    name: str = eqx.field(static=True)
    algorithm: str = eqx.field(static=True)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise EtraceError(
            f"jac.{self.name} is not formed for {self.algorithm}: it declares "
            "`dense_jacobians = False`. Use the products `jac.jvp(v)` (J v) and "
            "`jac.vjp(u)` (u^T J and u^T Jtheta), or declare `dense_jacobians = True` "
            f"to receive jac.{self.name}."
        )

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._refuse()

    __jax_array__ = __array__ = __getitem__ = __iter__ = __len__ = _refuse
    __matmul__ = __rmatmul__ = __add__ = __radd__ = __sub__ = __rsub__ = _refuse
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __neg__ = _refuse


def _flat(a: Any) -> Any:
    return jnp.reshape(a, (-1,))


def group_jacobians(
    compiled: Compiled,
    g: int,
    prev: list[Any],
    site_vals: list[Any],
    fixed: dict[int, Any],
) -> tuple[Any, list[Any]]:
    """`D` and each site's `Df` for hidden group `g`, from one pullback."""
    program = compiled.program
    group = compiled.graph.groups[g]
    units = [u for u in compiled.graph.units if u.group is group]
    state_vars = compiled.state_vars
    sinks = compiled.sinks[g]

    def tail(hs, ys):
        env = dict(fixed)
        for j, h in zip(group.leaves, hs):
            env[state_vars[j]] = h
        for u, y in zip(units, ys):
            env[u.site.out] = y
        _ir.evaluate(program, compiled.group_tail[g], env)
        return [s.val if isinstance(s, _ir.Lit) else env[s] for s in sinks]

    hs = [jnp.asarray(h) for h in prev]
    # Reverse mode only: surrogate spike functions are often `custom_vjp`, which
    # cannot be differentiated forwards. The tail is neuron-local, so one cotangent
    # of ones per state gives both diagonals exactly.
    _, pullback = jax.vjp(tail, hs, site_vals)
    k = group.k
    eye = jnp.eye(k, dtype=group.dtype)
    cots = [
        jnp.broadcast_to(eye[:, i].reshape((k,) + (1,) * h.ndim), (k,) + h.shape)
        for i, h in enumerate(hs)
    ]
    dhs, dys = jax.vmap(pullback)(cots)  # dhs[k_in] has shape (k_out, ...)
    D = jnp.stack([jnp.reshape(d, (k, -1)).T for d in dhs], axis=-1)
    Df = [
        jnp.moveaxis(jax.vmap(u.site.canonical_y)(dy).astype(u.site.dtype), 0, -1)
        for u, dy in zip(units, dys)
    ]
    return D, Df


def gradient_hook(read_out, anchored: bool = False):
    """A `custom_vjp` identity on hidden values whose backward pass hands their
    cotangent `dL/dh` to `read_out(traces, jac, cot, anchor_cot)`, which returns the
    cotangents of `weights` (the live values the traces belong to).

    The hook's output is the (batched) hidden values themselves, so under `vmap` the
    read-out runs per example before autodiff sums over the batch. With `anchored`,
    it also returns an *anchor*: a zero vector (one entry per neuron, computed from
    the hidden values so that it is batched too) for `output_hook` to consume; the
    anchor's cotangent is the feedback learning signal.
    """

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


def output_hook(feedback: Any, source: str, sizes: list[tuple[int, Any]]):
    """A `custom_vjp` identity on the model's output whose backward pass sends each
    anchored group (`sizes`: its neuron count and dtype) the feedback signal: the
    fixed random projection of `dL/dy` (`source == "error"`) or of the target
    (`"target"`)."""

    @jax.custom_vjp
    def hook(y, anchors, target):
        del anchors, target
        return y

    def fwd(y, anchors, target):
        return y, target

    def bwd(target, cot):
        if source == "target":
            vec = [jnp.reshape(jnp.asarray(t), (-1,)) for t in jtu.tree_leaves(target)]
        else:
            vec = [jnp.reshape(c, (-1,)) for c in cot if _is_float(c)]
        vec = jnp.concatenate(vec) if vec else jnp.zeros((0,))
        signals = [
            feedback.project(i, vec, n).astype(dtype)
            for i, (n, dtype) in enumerate(sizes)
        ]
        return cot, signals, None

    hook.defvjp(fwd, bwd)
    return hook


def _is_float(a: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


_SUMMED = contextvars.ContextVar("etrace_summed_batch", default=False)


@contextlib.contextmanager
def summed_batch():
    """While tracing `grad(vmap(step))` (and only then: under `vmap(grad(...))`
    each example needs its own gradient), let the read-out sum over the batch
    itself: see `AbstractAlgorithm.summed_gradients`."""
    token = _SUMMED.set(True)
    try:
        yield
    finally:
        _SUMMED.reset(token)


_FIXED_WEIGHTS = contextvars.ContextVar("etrace_fixed_weights", default=False)


@contextlib.contextmanager
def fixed_weights():
    """While tracing a loop over steps of one model (`online_grad`'s scan), let
    the step store a weight it multiplies turned (`_ir.with_weight_turned`): the
    turn is then made once, outside the loop, instead of at every step."""
    token = _FIXED_WEIGHTS.set(True)
    try:
        yield
    finally:
        _FIXED_WEIGHTS.reset(token)


_PREVIOUS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "etrace_previous_readers", default=None
)


@contextlib.contextmanager
def previous_readers() -> Iterator[set[str]]:
    """While tracing a step's gradient, collect the names of the units whose
    read-out took the traces before the update (`gradients_from_previous`)."""
    names: set[str] = set()
    token = _PREVIOUS.set(names)
    try:
        yield names
    finally:
        _PREVIOUS.reset(token)


# `online_grad(..., chunk=S)`: the keys under which a step's trace dictionary
# carries what a chunk needs besides the traces (see `chunking`).
RECORDS = "\x00records"
PROBES = "\x00probes"
SIGNALS = "\x00signals"

_CHUNK: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "etrace_chunk", default=None
)


@contextlib.contextmanager
def chunking(mode: str):
    """While tracing a step of `online_grad(..., chunk=S)`: with `"collect"` the
    step leaves the traces as they are, returns its Jacobians under `RECORDS`
    and hands each group's learning signal back as the cotangent of a zero
    `PROBES` entry; with `"flush"`, the chunk's last step, it advances the
    traces over the whole chunk from the records and signals of the earlier
    steps (`RECORDS`, `SIGNALS`) and reads out the chunk's gradient
    (`chunk_update`, `chunk_readout`)."""
    token = _CHUNK.set(mode)
    try:
        yield
    finally:
        _CHUNK.reset(token)


def _signal_hook(signal):
    """A `custom_vjp` identity on hidden values whose backward pass returns their
    learning signal `signal(cot)` as the cotangent of `probe` (and nothing for
    the weights, which it does not take)."""

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


def _flush_hook(read_out):
    """A `custom_vjp` identity on hidden values whose backward pass hands their
    cotangent to `read_out(*chunk, cot)`, which returns the weights' cotangents."""

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


def _chunk_hook(
    sub, group, jac, D, traces, new_traces, new_vals, weights, coupled=True
):
    """`run_hook`'s work in a chunk's step (see `chunking`): returns the hooked
    hidden values, and records or advances the traces in `new_traces`. `D`, each
    unit's `Df` and the learning signal are recorded entry by entry and state by
    state (`split_entries`), without the structural zeros of `D` if `coupled`
    (`D` is the group's diagonal Jacobian, not the full diagonal blocks `H`)."""
    units = sub.units
    sg = jax.lax.stop_gradient
    pattern = group if coupled else None

    def signal(cot):
        return tuple(_flat(c) for c in cot)

    def states(Df):
        return tuple(Df[..., k] for k in range(group.k))

    if _CHUNK.get() == "collect":
        records = new_traces.setdefault(RECORDS, {"D": {}, "Df": {}, "x": {}})
        records["D"][group.name] = sg(split_entries(D, pattern))
        for u in units:
            records["Df"][u.name] = sg(states(jac.Df[u.name]))
            records["x"][u.name] = sg(jac.x[u.name])
        return _signal_hook(signal)(new_vals, traces[PROBES][group.name])

    records = traces[RECORDS]

    def joined(earlier, now):  # the chunk's steps, this one last
        return jtu.tree_map(lambda e, a: jnp.concatenate([e, a[None]]), earlier, now)

    Ds = joined(records["D"][group.name], split_entries(D, pattern))
    Dfs = {u.name: joined(records["Df"][u.name], states(jac.Df[u.name])) for u in units}
    xs = {u.name: joined(records["x"][u.name], jac.x[u.name]) for u in units}
    mine = {u.name: traces[u.name] for u in units}
    turned = {u.name: is_turned(u, mine[u.name]) for u in units}
    rows = sorted(
        {k for u in units for k, eps in enumerate(mine[u.name]) if eps is not None}
    )
    steps = jnp.shape(xs[units[0].name])[0]
    P, Phi = chunk_products(Ds, rows, steps, D.shape[:-2], D.dtype)
    for u in units:
        new = chunk_update(
            mine[u.name],
            jtu.tree_map(lambda a: u.gather(a, 1), P),
            jtu.tree_map(u.gather, Phi),
            Dfs[u.name],
            xs[u.name],
            turned[u.name],
        )
        new_traces[u.name] = jtu.tree_map(sg, new)
    dtypes = [jnp.result_type(w) for w in weights]

    def read(chunk, c, summed):
        mine, Ds, Dfs, xs = chunk

        def swapped(tree):  # the batch and the steps' axes swapped
            return jtu.tree_map(lambda a: jnp.swapaxes(a, 0, 1), tree)

        # The scan over the steps takes them first; `Df` and `x` keep the batch
        # first, which the read-out's products merge with the steps.
        m, q = chunk_signals(*swapped((Ds, c))) if summed else chunk_signals(Ds, c)
        if summed:
            m = swapped(m)
        axis = 2 if summed else 1
        grads = [
            chunk_readout(
                mine[u.name],
                jtu.tree_map(lambda a: u.gather(a, axis), m),
                jtu.tree_map(lambda a: u.gather(a, axis - 1), q),
                Dfs[u.name],
                xs[u.name],
                turned[u.name],
                summed,
            )
            for u in units
        ]
        return [
            u.site.weight_from_canonical(g).astype(dt)
            for u, g, dt in zip(units, grads, dtypes)
        ]

    def read_out(chunk, earlier, cot):
        return read(chunk, joined(earlier, signal(cot)), False)

    def summed(chunk, earlier, cot):  # every argument with a leading batch axis
        now = jax.vmap(signal)(cot)
        c = jtu.tree_map(
            lambda e, a: jnp.concatenate([e, a[:, None]], axis=1), earlier, now
        )
        return read(chunk, c, True)

    chunk = jtu.tree_map(sg, ((mine, Ds, Dfs, xs), traces[SIGNALS][group.name]))
    return _flush_hook(batch_summed(read_out, summed))(new_vals, weights, chunk)


def _read_previous(sub: Graph) -> None:
    names = _PREVIOUS.get()
    if names is not None:
        names.update(u.name for u in sub.units)


def _group_hook(
    algorithm: Any, sub: Graph, group: Group, dtypes: list[Any], anchored: bool
):
    outputs = list(sub.outputs.get(group.name, ()))

    def learning_signal(cot, anchor_cot):
        signal = jnp.stack([_flat(c) for c in cot], axis=-1)
        if anchor_cot is not None:
            signal = signal.at[:, outputs].add(anchor_cot[:, None])
        return {group.name: signal}

    def to_weights(grads):
        return [
            u.site.weight_from_canonical(grads[u.name]).astype(dt)
            for u, dt in zip(sub.units, dtypes)
        ]

    def read_out(traces, jac, cot, anchor_cot):
        previous, traces = traces
        signal = learning_signal(cot, anchor_cot)
        grads = algorithm.gradients_from_previous(sub, previous, signal, jac)
        if grads is None:
            grads = algorithm.gradients(sub, traces, signal, jac)
        else:
            _read_previous(sub)
        return to_weights(grads)

    def summed(traces, jac, cot, anchor_cot):
        previous, traces = traces
        signal = jax.vmap(learning_signal)(cot, anchor_cot)
        grads = algorithm.gradients_from_previous(
            sub, previous, signal, jac, summed=True
        )
        if grads is None:
            grads = algorithm.summed_gradients(sub, traces, signal, jac)
        else:
            _read_previous(sub)
        return to_weights(grads)

    return gradient_hook(batch_summed(read_out, summed), anchored)


def batch_summed(read_out, summed):
    """`read_out(traces, jac, cot, anchor_cot)`, which while `summed_batch` is on
    computes its batch `vmap` as `summed` of the batched arguments: the weights'
    cotangents summed over the batch, unbatched (`custom_vjp` sums them over the
    batch of `online_grad` anyway). Off, `read_out` itself."""
    if not _SUMMED.get():
        return read_out
    summed_read_out = jax.custom_batching.custom_vmap(read_out)

    @summed_read_out.def_vmap
    def _(axis_size, in_batched, *args):
        def batched(a, flag):
            return a if flag else jnp.broadcast_to(a, (axis_size,) + a.shape)

        out = summed(*jtu.tree_map(batched, args, tuple(in_batched)))
        return out, [False] * len(out)

    return summed_read_out


def capability(algorithm: Any, name: str, default: Any) -> Any:
    """An algorithm's declared capability (`routing`, `feedback`, `full_diagonal`),
    looked up through wrappers (`AbstractWrappedAlgorithm.inner`)."""
    while algorithm is not None:
        value = getattr(algorithm, name, None)
        if value is not None:
            return value
        algorithm = getattr(algorithm, "inner", None)
    return default


def run_step(
    compiled: Compiled,
    algorithm: Any,
    dyn_leaves: list[Any],
    state_leaves: list[Any],
    x_leaves: list[Any],
    traces: dict[str, Any],
    t: Any,
    target: Any = None,
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Evaluates one step; returns output leaves, new state leaves and new traces."""
    from ._joint import diagonal_blocks, run_step_joint

    if capability(algorithm, "routing", "group") == "joint":
        return run_step_joint(
            compiled, algorithm, dyn_leaves, state_leaves, x_leaves, traces, t
        )
    feedback = capability(algorithm, "feedback", None)
    source = capability(algorithm, "feedback_source", "error")
    if feedback is not None and source == "target" and target is None:
        raise EtraceError(
            f"{type(algorithm).__name__} projects the target into its learning "
            "signal: pass it to the step, `learner.step(model, trace_state, x, "
            "target)` (`etrace.online_grad` does this for you)."
        )
    dyn_leaves = _checked_masks(compiled, dyn_leaves)
    H = None
    if capability(algorithm, "full_diagonal", False):
        H = diagonal_blocks(compiled, dyn_leaves, state_leaves, x_leaves)
    anchors: list[Any] = []
    anchor_sizes: list[tuple[int, Any]] = []
    program = compiled.program
    eqns = program.eqns
    n_eqns = len(eqns)
    main: dict[int, Any] = dict(program.consts)
    main.update(zip(program.invars, list(dyn_leaves) + state_leaves + x_leaves))
    tail: dict[int, Any] = {}
    live: dict[int, Any] = {}
    hooked: dict[int, Any] = {}
    new_traces = dict(traces)
    sg = jax.lax.stop_gradient
    # Sites whose output is also read with its weight live (a same-step path
    # around the state) keep the product as written: XLA computes the cut and the
    # live product once only while they are the same expression.
    read_live_sites = {
        v
        for (i, pos), mode in compiled.modes.items()
        if mode == "live"
        for v in [eqns[i].ins[pos]]
        if isinstance(v, int) and v in compiled.site_of_out
    } | {
        v
        for mode, v in zip(compiled.out_modes, program.outvars)
        if mode == "live" and isinstance(v, int) and v in compiled.site_of_out
    }
    turn_weights = _FIXED_WEIGHTS.get()

    def cut_operands(i: int, stop: bool) -> list[Any]:
        site = compiled.cut_sites[i]
        wpos = site.w_pos
        args = []
        for pos, a in enumerate(eqns[i].ins):
            if pos == wpos:
                assert isinstance(a, int)
                args.append(sg(main[a]) if stop else main[a])
            else:
                args.append(read_main(i, pos, a))
        return args

    def site_value(v: int, stop: bool) -> Any:
        cache = tail if stop else live
        if v not in cache:
            site = compiled.site_of_out[v]
            if site.kind == "elementwise":
                cache[v] = sg(main[v]) if stop else main[v]
            else:
                assert site.eqn is not None
                eqn = eqns[site.eqn]
                bind = _ir.bind_weight_first if site.w_pos == 0 else _ir.bind

                def product(*operands: Any) -> Any:
                    return bind(eqn, *operands)[0]

                def turned(*operands: Any) -> Any:
                    e, args = _ir.with_weight_turned(eqn, list(operands), site.w_pos)
                    return bind(e, *args)[0]

                operands = cut_operands(site.eqn, stop)
                if stop and turn_weights and v not in read_live_sites:
                    # The weight is cut from the gradient here: its value only.
                    # Turned on the CPU only, where it was measured faster.
                    cache[v] = jax.lax.platform_dependent(
                        *operands, cpu=turned, default=product
                    )
                else:
                    cache[v] = product(*operands)
        return cache[v]

    def read_tail(v: _ir.Operand) -> Any:
        if isinstance(v, _ir.Lit):
            return v.val
        if v in compiled.site_of_out:
            return site_value(v, stop=True)
        if v in tail:
            return tail[v]
        return main[v]

    def read_live(v: _ir.Operand) -> Any:
        if isinstance(v, _ir.Lit):
            return v.val
        if v in compiled.site_of_out:
            return site_value(v, stop=False)
        p = program.producer.get(v)
        if p is None or p not in compiled.tail:
            return main[v]
        if v not in live:
            outs = _ir.bind(eqns[p], *(read_live(a) for a in eqns[p].ins))
            live.update(zip(eqns[p].outs, outs))
        return live[v]

    def read_by_mode(mode: str, v: _ir.Operand) -> Any:
        if mode == "hooked":
            return hooked[v]  # pyright: ignore
        if mode == "live":
            return read_live(v)
        if mode == "tail":
            return read_tail(v)
        return v.val if isinstance(v, _ir.Lit) else main[v]

    def read_main(i: int, pos: int, v: _ir.Operand) -> Any:
        value = read_by_mode(compiled.modes.get((i, pos), "plain"), v)
        if feedback is not None and pos in compiled.reads_new.get(i, ()):
            # Feedback replaces the backward pass through weights that read hidden
            # values: nothing flows back through them.
            value = sg(value)
        return value

    def run_hook(g: int) -> None:
        group = compiled.graph.groups[g]
        sub = compiled.graph.subgraph(group)
        units = sub.units
        sinks = compiled.sinks[g]
        new_vals = [read_tail(s) for s in sinks]
        prev = [sg(main[compiled.state_vars[j]]) for j in group.leaves]
        site_vals = [sg(site_value(u.site.out, stop=True)) for u in units]
        fixed: dict[int, Any] = {}
        for i in compiled.group_tail[g]:
            for a in eqns[i].ins:
                if isinstance(a, int) and a not in fixed:
                    if program.producer.get(a) in compiled.group_tail[g]:
                        continue
                    if a in compiled.site_of_out:
                        continue
                    fixed[a] = sg(read_tail(a))
        D, Df = group_jacobians(compiled, g, prev, site_vals, fixed)
        xs = {}
        for u in units:
            site = u.site
            if site.kind == "matrix":
                assert site.eqn is not None
                ins = eqns[site.eqn].ins
                operands = [
                    sg(read_main(site.eqn, k, a))
                    for k, a in enumerate(ins)
                    if k != site.w_pos
                ]
                xs[u.name] = site.canonical_x(*operands)
            else:
                xs[u.name] = site.canonical_x()
        jac = Jacobians(
            D={group.name: D},
            Df={u.name: d for u, d in zip(units, Df)},
            x=xs,
            t=t,
            H=None if H is None else {group.name: H[group.name]},
        )
        if _CHUNK.get() is not None:
            Dc = D if H is None else H[group.name]
            weights = [main[u.site.weight] for u in units]
            out = _chunk_hook(
                sub, group, jac, Dc, traces, new_traces, new_vals, weights, H is None
            )
            for s, val in zip(sinks, out):
                if isinstance(s, int):
                    hooked[s] = val
            return
        mine = {u.name: traces[u.name] for u in units}
        updated = algorithm.update(sub, mine, jac)
        updated = jtu.tree_map(sg, updated)
        new_traces.update(updated)
        weights = [main[u.site.weight] for u in units]
        anchored = feedback is not None and bool(sub.outputs.get(group.name))
        dtypes = [jnp.result_type(w) for w in weights]
        hook = _group_hook(algorithm, sub, group, dtypes, anchored)
        # Both the traces before and after the update: the read-out may use either
        # (`AbstractAlgorithm.gradients_from_previous`).
        pair = (jtu.tree_map(sg, mine), updated)
        out = hook(new_vals, weights, pair, jtu.tree_map(sg, jac))
        if anchored:
            out, anchor = out
            anchors.append(anchor)
            anchor_sizes.append((group.n, group.dtype))
        for s, val in zip(sinks, out):
            if isinstance(s, int):
                hooked[s] = val

    for node in compiled.order:
        if node >= n_eqns:
            run_hook(node - n_eqns)
            continue
        if node in compiled.cut_sites:
            continue  # evaluated on demand, with or without stop_gradient
        eqn = eqns[node]
        if node in compiled.tail:
            outs = _ir.bind(eqn, *(read_tail(a) for a in eqn.ins))
            tail.update(zip(eqn.outs, outs))
        else:
            outs = _ir.bind(
                eqn, *(read_main(node, pos, a) for pos, a in enumerate(eqn.ins))
            )
            main.update(zip(eqn.outs, outs))

    n_y = compiled.n_y
    y = [read_by_mode(m, v) for m, v in zip(compiled.out_modes, program.outvars[:n_y])]
    if anchors:
        y = output_hook(feedback, source, anchor_sizes)(y, anchors, target)
    new_state = []
    for v, aval in zip(program.outvars[n_y:], compiled.state_avals):
        val = read_tail(v) if isinstance(v, int) else jnp.asarray(v.val, aval.dtype)
        new_state.append(sg(jnp.broadcast_to(val, aval.shape)))
    return y, new_state, new_traces


def _is_concrete(a: Any) -> bool:
    try:
        bool(a)
    except jax.errors.ConcretizationTypeError:
        return False
    return True


def _checked_masks(compiled: Compiled, dyn_leaves: list[Any]) -> list[Any]:
    """Refuses a mask that gained non-zeros since `compile`: traces are only kept
    where the compiled mask was non-zero."""
    if not compiled.mask_leaves:
        return dyn_leaves
    dyn_leaves = list(dyn_leaves)
    for k, nonzero in compiled.mask_leaves:
        leaf = dyn_leaves[k]
        grown = jnp.any((leaf != 0) & ~jnp.asarray(nonzero))
        message = (
            f"The mask `{compiled.layout.paths[k]}` is non-zero where it was zero "
            "when the model was compiled; traces exist only where it was non-zero "
            "then. Call `etrace.compile` again after changing a mask (removing "
            "entries is fine)."
        )
        if not isinstance(grown, jax.Array) or _is_concrete(grown):
            if bool(grown):
                raise EtraceError(message)
        else:
            dyn_leaves[k] = eqx.error_if(leaf, grown, message)
    return dyn_leaves
