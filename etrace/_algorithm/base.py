"""The algorithm interface: stateless strategy objects over the analysed graph.

The engine (`etrace._step`, `Learner`, `online_grad`) calls the methods below and
reads the capabilities declared as class variables here; it names no concrete
algorithm."""

from __future__ import annotations

import abc
import difflib
import inspect
from typing import Any, ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, PyTree

from .._errors import EtraceError
from .._graph import Graph, Unit
from .._kernels import batch_sum, outer_product_sum


# Every capability an algorithm may declare, with its default. They change what
# the driver passes in or how it sums gradients; see `AbstractAlgorithm`.
CAPABILITIES: dict[str, Any] = {
    "routing": "group",
    "dense_jacobians": True,
    "full_diagonal": False,
    "learning_signal": "gradient",
    "site_jacobians": False,
}
LEARNING_SIGNALS = ("gradient", "error_feedback", "target_feedback", "modulator")

_UNKNOWN_CAPABILITY = (
    "`{cls}.{name}` is not a capability of an etrace algorithm{close}. The "
    "capabilities are {known}. A hyper-parameter is a field: annotate it "
    "(`{name}: float = ...`); a private helper starts with an underscore."
)


def _is_field(cls: type, name: str, annotations: dict[str, Any]) -> bool:
    note = annotations.get(name)
    return note is not None and "ClassVar" not in str(note)


def _check_capabilities(cls: type) -> None:
    annotations = inspect.get_annotations(cls)
    names = set(cls.__dict__) | set(annotations)
    for name in sorted(names):
        if name.startswith("_") or name in CAPABILITIES:
            continue
        if _is_field(cls, name, annotations):
            continue
        value = cls.__dict__.get(name)
        is_classvar = "ClassVar" in str(annotations.get(name, ""))
        if not is_classvar and (
            callable(value) or isinstance(value, (property, staticmethod, classmethod))
        ):
            continue
        close = difflib.get_close_matches(name, CAPABILITIES, n=1)
        raise EtraceError(
            _UNKNOWN_CAPABILITY.format(
                cls=cls.__name__,
                name=name,
                close=f" (did you mean `{close[0]}`?)" if close else "",
                known=", ".join(f"`{c}`" for c in CAPABILITIES),
            )
        )
    signal = cls.__dict__.get("learning_signal")
    if isinstance(signal, str) and signal not in LEARNING_SIGNALS:
        raise EtraceError(
            f"`{cls.__name__}.learning_signal` must be one of {LEARNING_SIGNALS}, "
            f"got {signal!r}."
        )


def summed_outer_product(unit: Unit, a: Array, x: Array) -> Array:
    """`_kernels.outer_product_sum(a, x)`, the batch sum of per-example outer
    products in canonical `(B, Fw, C)` form, for an outer-product read-out of
    `unit`. Where the weight is a matrix stored turned, `(C, Fw)` (`x @ W`), the
    product is formed turned and swapped back here: the swap cancels the one that
    maps the gradient to the weight's layout, and the product is written as the
    weight lies."""
    if unit.site.w_perm == (1, 0):
        return outer_product_sum(a, x, turned=True).swapaxes(1, 2)
    return outer_product_sum(a, x)


def overrides(algorithm: Any, cls: type, *names: str) -> bool:
    """Whether `type(algorithm)` replaces any of `cls`'s methods `names` (then a
    shortcut `cls` takes for them no longer computes what the subclass means)."""
    return any(getattr(type(algorithm), n) is not getattr(cls, n) for n in names)


class AbstractAlgorithm(eqx.Module):
    """An online gradient algorithm: how traces start, evolve and are read out.

    Algorithms are stateless: their fields are hyper-parameters only; the traces they
    keep live in the `TraceState` and are passed in and handed back. The driver
    (`Learner.step`) calls `update` and `gradients` once per hidden group and step,
    with the graph restricted to that group (`graph.subgraph(group)`) and the traces
    to its units; `Learner.init` calls `init` once with the whole graph.

    Subclass this directly for full control, subclass `AbstractUnitAlgorithm` when
    every unit (one weight site feeding one hidden group) keeps its own trace, or wrap
    an existing algorithm (`AbstractWrappedAlgorithm`).

    **Capabilities** are class variables declared here with their defaults; a
    subclass sets the ones it needs (or a property of the same name, where they
    depend on its fields). Any other public class variable is an error when the
    class is created, so a misspelled capability cannot be silently ignored:

    - `routing = "joint"` (default `"group"`): the algorithm is called once per
        step for the whole hidden state instead of once per group. `graph.params`
        lists every parameter that reaches a hidden state; `jac.J` and
        `jac.Jtheta` hold the full hidden-to-hidden and immediate Jacobians; the
        signal is `signal["hidden"]` of shape `(H,)`; traces and gradients are
        keyed by parameter path, and gradients have the parameter's shape (`RTRL`,
        `SnAp`, `UORO`). In `update`, `jac.jvp` and `jac.vjp` also give products
        with those Jacobians without forming them.
    - `dense_jacobians = False`, with `routing = "joint"`: `update` uses only
        `jac.jvp` and `jac.vjp`; `jac.J` and `jac.Jtheta` are never computed, and
        using them raises an `EtraceError` (`UORO`).
    - `full_diagonal = True`: `jac.H` holds each neuron's block of the full
        hidden-to-hidden Jacobian, recurrent weights included (`OSTLRecurrent`).
    - `learning_signal`: `"gradient"` (default), the true `dL/dh`; or a fixed
        random projection from `project`: of the output error `dL/dy`
        (`"error_feedback"`, random e-prop) or of the step's target
        (`"target_feedback"`, `OSTTP`), delivered to each group's output state,
        with nothing back-propagated through the weights that read hidden values;
        or `"modulator"`: a third factor passed with each step
        (`learner.step(..., modulator=m)`) in place of `dL/dh` for every state of
        every neuron (`ThreeFactor`).
    - `site_jacobians = True`, with `routing = "joint"`: in `update`, `jac.x` and
        `jac.Df` are keyed by site name: every weight operation's input in
        canonical form `(B, Fx, C)` and `dh^t/dy^t`, the derivative of the whole
        new hidden state by the site's output, `(H, B, Fw, Fx)` (through every
        later layer of the step). With `graph.direct_sites` they give the
        immediate Jacobian of a parameter that is a site's weight as an outer
        product (`KF_RTRL`).
    """

    routing: ClassVar[str] = "group"
    dense_jacobians: ClassVar[bool] = True
    full_diagonal: ClassVar[bool] = False
    learning_signal: ClassVar[str] = "gradient"
    site_jacobians: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_capabilities(cls)

    @abc.abstractmethod
    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        """Zero traces for one example, keyed by unit name.

        **Arguments:**

        - `graph`: the analysed graph; its units give the shapes and dtypes.

        **Returns:**

        A dictionary from unit name to that unit's trace (any pytree of arrays,
        possibly empty), with an entry for every unit of `graph` (for `routing =
        "joint"`, any pytree: RTRL keys it by parameter path).
        """

    @abc.abstractmethod
    def update(
        self, graph: Graph, traces: dict[str, PyTree[Array]], jac: Any
    ) -> dict[str, PyTree[Array]]:
        """Advances the traces by one step.

        **Arguments:**

        - `graph`: the graph restricted to one hidden group.
        - `traces`: that group's units' traces at step `t - 1`.
        - `jac`: an `etrace.Jacobians` with this step's `D`, `Df` and `x`.

        **Returns:**

        The traces at step `t`, same structure.
        """

    @abc.abstractmethod
    def gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        """Reads out parameter gradients from the traces and the learning signal.

        **Arguments:**

        - `graph`: the graph restricted to one hidden group.
        - `traces`: the traces at step `t` (after `update`).
        - `signal`: per group name, `dL^t/dh^t` of shape `(N, K)`: this step's loss
            gradient with respect to the new hidden state, including every same-step
            path through later layers.
        - `jac`: this step's `etrace.Jacobians`.

        **Returns:**

        Per unit name, the gradient with respect to the unit's weight in canonical
        `(B, Fw, C)` layout.
        """

    def summed_gradients(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
    ) -> dict[str, Array]:
        """`gradients` of a whole batch, summed over it.

        Every argument carries a leading batch axis (the traces and Jacobians of
        each example). A batched `Learner.step` calls this instead of `gradients`,
        so that a read-out that is an outer product (ES-D-RTRL, OTTT) becomes one
        matrix product over the batch instead of one outer product per example
        followed by a sum. The default is exactly that: `gradients` per example,
        summed. Override it only together with `gradients`.
        """
        per_example = jax.vmap(lambda tr, s, j: self.gradients(graph, tr, s, j))(
            traces, signal, jac
        )
        return {name: batch_sum(g) for name, g in per_example.items()}

    def reads_previous(self, graph: Graph) -> bool:
        """Whether this group's gradient is read out from the traces *before*
        `update`, with `gradients_from_previous` (default `False`: `gradients`
        reads the updated traces). Static: a function of the graph only."""
        del graph
        return False

    def gradients_from_previous(
        self,
        graph: Graph,
        traces: dict[str, PyTree[Array]],
        signal: dict[str, Array],
        jac: Any,
        *,
        summed: bool = False,
    ) -> dict[str, Array]:
        r"""This step's `gradients` from the traces *before* `update`, where
        `reads_previous` says so.

        Where the read-out is linear in traces that recur linearly (D-RTRL:
        $c \cdot \epsilon^t = \sum_j (c^\top D)_j\,\epsilon^{t-1}_j +
        (c^\top D_f) \otimes x$), the gradient needs the previous traces only,
        and the trace of a state that no state's update reads (a spike) is then
        not read at all.

        **Arguments:**

        As for `gradients`, with `traces` at step `t - 1`; with `summed`, every
        argument has a leading batch axis and the result is summed over it (as
        `summed_gradients`).
        """
        del graph, traces, signal, jac, summed
        raise NotImplementedError(
            f"{type(self).__name__}.reads_previous is True but it does not "
            "implement `gradients_from_previous`."
        )

    def init_full(self, graph: Graph) -> dict[str, PyTree[Array]]:
        """`init`, keeping every trace that a read-out from the *updated* traces
        needs, also those this algorithm's own read-out never reads (D-RTRL's trace
        of a spike, read out from the previous traces). A wrapper that replaces the
        update or the read-out starts from these."""
        return self.init(graph)

    def transposed_gradients(self, graph: Graph, traces: Any) -> frozenset[str]:
        """The units whose summed gradient the read-out forms as the transpose of
        canonical `(B, Fw, C)` (`traces`: one example's, or their shapes): a layout
        hint; `online_grad` then keeps the running sum of such a weight matrix
        transposed. Default: none."""
        del graph, traces
        return frozenset()

    def project(self, index: int, vector: Array, n: int) -> Array:
        """The feedback signal `B v` of the `index`-th hidden group (`n` neurons)
        for the flattened output error or target `vector`, for algorithms whose
        `learning_signal` is a projection."""
        del index, vector, n
        raise NotImplementedError(
            f"{type(self).__name__} declares learning_signal = "
            f"{self.learning_signal!r} but does not implement `project`."
        )

    def trace_of(
        self, graph: Graph, traces: dict[str, Any], path: str
    ) -> dict[str, Any]:
        """The traces of the parameter at `path`, keyed by hidden group name, as
        `Learner.trace_of` shows them (a tuple where several units of a group hold
        it). The default: traces keyed by the path itself (whole-state
        algorithms), else each unit's trace through `view`."""
        if path in traces:
            return {"hidden": traces[path]}
        out: dict[str, list[Any]] = {}
        for u in graph.units_of(path):
            out.setdefault(u.group.name, []).append(self.view(u, traces[u.name]))
        return {g: v[0] if len(v) == 1 else tuple(v) for g, v in out.items()}

    def view(self, unit: Unit, trace: Any) -> Any:
        """How `trace_of` shows one unit's trace: as stored, by default."""
        del unit
        return trace

    def stored_traces(
        self, graph: Graph, traces: dict[str, Any], path: str
    ) -> dict[str, Any]:
        """The traces `path` owns as stored, keyed by trace key: what
        `Learner.summary` counts the bytes of."""
        if path in traces:
            return {path: traces[path]}
        return {
            u.name: traces[u.name] for u in graph.units_of(path) if u.name in traces
        }

    def summary_note(self, graph: Graph, path: str) -> str | None:
        """Words `Learner.summary` adds to the parameter's reason, or `None`."""
        del graph, path
        return None

    def exact_regime(self, facts: Any) -> Any:
        """Where this algorithm equals BPTT on a compiled model, or `None` (the
        default) where it declares no rule (`etrace.testing.exact_regime` then
        says that none is registered).

        The rule is stated with the building blocks `facts` offers (what
        `etrace.testing` reads from the compiled graph), without the model:

        - `facts.diagonal(full_diagonal=False)`: D-RTRL's verdict, exact for the
            groups whose recurrences are all element-wise (with `full_diagonal`,
            also for one-neuron groups with recurrent weights);
        - `facts.full()`: RTRL's verdict, exact unless a value is read from inside
            the recurrent update before it is stored (`facts.one_step_read`);
        - the hidden groups a rule concerns: `facts.with_memory()` (whose update
            reads their previous state), `facts.downstream()` (that feed another
            hidden group), `facts.receiving_signal()` (whose output a weight reads);
        - `facts.restrict(regime, groups, reason)`: the parameters traced into
            `groups` made inexact for `reason`; `facts.inexact(regime, reason,
            paths)`: the parameters at `paths` made inexact;
        - `facts.graph`, `facts.paths`, `facts.traced_paths(groups)`, and
            `facts.learner` for what these do not cover.

        A rule registered with `etrace.testing.register_exact_regime` for this
        type (or a base of it) takes precedence over this method.

        **Arguments:**

        - `facts`: an `etrace.testing` `RegimeFacts` of the compiled model.

        **Returns:**

        An `etrace.testing.Regime` built from `facts`, or `None`.

        !!! Example

            ```python
            def exact_regime(self, facts):
                # D-RTRL's verdict, except where this algorithm's filter acts.
                return facts.restrict(
                    facts.diagonal(), facts.downstream(), "the filter smooths it"
                )
            ```
        """
        del facts
        return None

    def chunk_refusal(self, graph: Graph) -> str | None:
        """Why `online_grad(..., chunk=S)` cannot advance these traces `S` steps at
        a time, or `None` where it can (with `chunk_record`, `chunk_update` and
        `chunk_gradients`)."""
        del graph
        return (
            f"`online_grad(..., chunk=...)` advances D-RTRL's traces; "
            f"{type(self).__name__} keeps other traces or changes their recurrence "
            "or read-out. Leave `chunk` out."
        )

    def chunk_record(self, graph: Graph, jac: Any) -> PyTree[Array]:
        """What one step of a chunk keeps of its `jac` for `chunk_update` and
        `chunk_gradients` (one group's)."""
        raise NotImplementedError

    def chunk_update(
        self, graph: Graph, traces: dict[str, Any], records: PyTree[Array]
    ) -> dict[str, Any]:
        """The traces after a chunk of `S` steps from those before it; `records`:
        each step's `chunk_record`, stacked with the steps first."""
        raise NotImplementedError

    def chunk_gradients(
        self,
        graph: Graph,
        traces: dict[str, Any],
        records: PyTree[Array],
        signals: tuple[Array, ...],
        *,
        summed: bool = False,
    ) -> dict[str, Array]:
        """A chunk's gradient, summed over its steps, from the traces before it,
        its `records` and its learning signals (one array per state, `(S, N)`);
        with `summed`, every argument has a leading batch axis, summed over."""
        raise NotImplementedError


class AbstractUnitAlgorithm(AbstractAlgorithm):
    """An algorithm that keeps an independent trace for every unit.

    Subclasses implement `init_unit`, `update_unit` and `gradient_unit`; the diagonal
    Jacobian `D` and the learning signal arrive already gathered to each output of
    the unit (`D[nmap]`, `signal[nmap]`).
    """

    @abc.abstractmethod
    def init_unit(self, unit: Unit) -> PyTree[Array]:
        """Zero trace for one unit and one example.

        **Arguments:**

        - `unit`: the unit; `unit.shape` is its canonical `(B, Fw, Fx, C)`, `unit.k`
            the states per neuron and `unit.dtype` the dtype of its traces
            (complex where the site or its hidden group is).

        **Returns:**

        The unit's trace: any pytree of arrays (without a batch axis).
        """

    @abc.abstractmethod
    def update_unit(
        self, unit: Unit, trace: PyTree[Array], D: Array, Df: Array, x: Array
    ) -> PyTree[Array]:
        """One step of the trace recurrence.

        **Arguments:**

        - `unit`: the unit.
        - `trace`: its trace at step `t - 1`.
        - `D`: the neurons' diagonal Jacobian gathered to each canonical output,
            shape `(B, Fw, Fx, K, K)`.
        - `Df`: the derivative of the neuron's states with respect to each output,
            shape `(B, Fw, Fx, K)`.
        - `x`: the weight operation's input in canonical form, shape `(B, Fx, C)`
            (ones for an element-wise parameter).

        **Returns:**

        The trace at step `t`, same structure.
        """

    @abc.abstractmethod
    def gradient_unit(
        self, unit: Unit, trace: PyTree[Array], signal: Array, Df: Array, x: Array
    ) -> Array:
        """Reads out the unit's weight gradient.

        **Arguments:**

        - `unit`: the unit.
        - `trace`: its trace at step `t` (after `update_unit`).
        - `signal`: the learning signal `dL^t/dh^t` of the neuron of each canonical
            output, shape `(B, Fw, Fx, K)`.
        - `Df`, `x`: as for `update_unit`.

        **Returns:**

        The gradient with respect to the unit's weight in canonical `(B, Fw, C)`
        layout.
        """

    def init(self, graph: Graph) -> dict[str, PyTree[Array]]:
        return {u.name: self.init_unit(u) for u in graph.units}

    def update(self, graph, traces, jac):
        out = {}
        for u in graph.units:
            D = u.gather(jac.D[u.group.name])
            out[u.name] = self.update_unit(
                u, traces[u.name], D, jac.Df[u.name], jac.x[u.name]
            )
        return out

    def gradients(self, graph, traces, signal, jac):
        out = {}
        for u in graph.units:
            sig = u.gather(signal[u.group.name])
            out[u.name] = self.gradient_unit(
                u, traces[u.name], sig, jac.Df[u.name], jac.x[u.name]
            )
        return out

    def summed_gradient_unit(
        self, unit: Unit, trace: PyTree[Array], signal: Array, Df: Array, x: Array
    ) -> Array | None:
        """`gradient_unit` summed over a batch (every argument with a leading batch
        axis), or `None` (the default) to take `gradient_unit` per example and sum.
        A shortcut for read-outs that are outer products (see
        `_kernels.outer_product_sum`); implementations return `None` when a
        subclass replaced `gradient_unit`."""
        del unit, trace, signal, Df, x
        return None

    def summed_gradients(self, graph, traces, signal, jac):
        if overrides(self, AbstractUnitAlgorithm, "gradients"):
            return super().summed_gradients(graph, traces, signal, jac)
        return self.summed_unit_gradients(graph, traces, signal, jac)

    def summed_unit_gradients(self, graph, traces, signal, jac):
        """`summed_gradients` unit by unit, through `summed_gradient_unit`."""
        out = {}
        for u in graph.units:
            args = (
                traces[u.name],
                u.gather(signal[u.group.name], axis=1),
                jac.Df[u.name],
                jac.x[u.name],
            )
            summed = self.summed_gradient_unit(u, *args)
            if summed is None:
                per_example = jax.vmap(self.gradient_unit, in_axes=(None, 0, 0, 0, 0))
                summed = batch_sum(per_example(u, *args))
            out[u.name] = summed
        return out
