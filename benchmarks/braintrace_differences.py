"""Where braintrace's online gradients differ from etrace's: the braintrace side.

The braintrace numbers of `docs/from_braintrace.md` ("Coming from braintrace"). Each
section builds a small model from braintrace's layers, takes its online gradient with
`learner.etrace_grad` (and, where it helps, the BPTT gradient with
`brainstate.transform.grad`), and prints what the page quotes. The etrace side of
each comparison is a code block of that page, built from the same weights and data:
both draw them with `numpy.random.RandomState`, in the same order.

braintrace needs Python >= 3.12 and is not a dependency of etrace, so this script runs
in an environment of its own, with the versions the peer benchmarks pin in
`noxfile.py` (it imports nothing from etrace, and nothing imports it):

```
python3.12 -m venv /tmp/bt
/tmp/bt/bin/pip install braintrace==0.2.8 brainstate==0.6.0 brainpy==2.9.0 \\
    braintools==0.4.0 brainunit==0.6.0 brainevent==0.3.0 jax==0.10.2
/tmp/bt/bin/python benchmarks/braintrace_differences.py             # every section
/tmp/bt/bin/python benchmarks/braintrace_differences.py bias gru    # some of them
```

Sections: warmup, cutoff, bias, gru, drtrl, vanilla, reduction, batch, reset, dtype,
eprop. Float64 throughout (`jax_enable_x64` and
`brainstate.environ.set(precision=64)`), except where the `dtype` section changes
it; about a minute on 2 CPU cores, most of it the 1001 steps of `cutoff`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import warnings
from collections.abc import Callable, Sequence


# braintrace's compiler diagnostics and JAX's deprecation notices; the `gru`
# section records the one it quotes.
warnings.filterwarnings("ignore")

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

import brainstate  # noqa: E402
import braintrace  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


np.set_printoptions(precision=8, suppress=True, linewidth=100)

N_IN, N_HID, N_OUT, T = 3, 4, 2, 6  # inputs, hidden units, outputs, steps
LEAK = 0.5  # the leaky layer: h^t = tanh(LEAK h^{t-1} + W x^t + b)


def weights_and_data(length: int = T) -> dict[str, np.ndarray]:
    """The leaky layer's weights in braintrace's `(in, out)` layout, and a sequence.

    The page builds its etrace model from the same draws (`leaky_model_and_data`),
    transposing the matrices into `eqx.nn.Linear`'s `(out, in)` layout."""
    rng = np.random.RandomState(0)
    return {
        "W": 0.8 * rng.normal(size=(N_IN, N_HID)),
        "b": 0.5 * rng.normal(size=(N_HID,)),
        "V": 0.8 * rng.normal(size=(N_HID, N_OUT)),
        "c": 0.5 * rng.normal(size=(N_OUT,)),
        "xs": rng.normal(size=(length, N_IN)),
        "ys": rng.normal(size=(length, N_OUT)),
    }


class Leaky(brainstate.nn.Module):
    """`h = tanh(LEAK h + W x + b)`, `y = V h + c`.

    With `bias_as_weight` the bias is instead the last row of a weight on the input
    `[x, 1]`: the same function."""

    def __init__(self, p: dict[str, np.ndarray], bias_as_weight: bool = False):
        super().__init__()
        self.bias_as_weight = bias_as_weight
        if bias_as_weight:
            w = jnp.asarray(np.concatenate([p["W"], p["b"][None]], axis=0))
            self.layer = braintrace.nn.Linear(N_IN + 1, N_HID, w_init=w, b_init=None)
        else:
            w, b = jnp.asarray(p["W"]), jnp.asarray(p["b"])
            self.layer = braintrace.nn.Linear(N_IN, N_HID, w_init=w, b_init=b)
        v, c = jnp.asarray(p["V"]), jnp.asarray(p["c"])
        self.readout = braintrace.nn.Linear(N_HID, N_OUT, w_init=v, b_init=c)

    def init_state(self, batch_size=None, **kwargs):
        self.h = brainstate.HiddenState(jnp.zeros(_shape(batch_size)))

    def reset_state(self, batch_size=None, **kwargs):
        self.h.value = jnp.zeros(_shape(batch_size))

    def update(self, x):
        if self.bias_as_weight:
            x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,))], axis=-1)
        h = jnp.tanh(LEAK * self.h.value + self.layer(x))
        self.h.value = h
        return self.readout(h)


def _shape(batch_size: int | None) -> tuple[int, ...]:
    return (N_HID,) if batch_size is None else (batch_size, N_HID)


class GRUNet(brainstate.nn.Module):
    """braintrace's GRU cell and a linear readout, as in `peer_braintrace.py`."""

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.cell = braintrace.nn.GRUCell(N_IN, hidden)
        self.readout = braintrace.nn.Linear(hidden, N_OUT)

    def update(self, x):
        return self.readout(self.cell(x))


class Vanilla(brainstate.nn.Module):
    """braintrace's vanilla RNN cell, `h = tanh(W [x; h] + b)`, and a readout, with
    weights drawn by `vanilla_weights`."""

    def __init__(self, p: dict[str, np.ndarray]):
        super().__init__()
        self.cell = braintrace.nn.ValinaRNNCell(N_IN, N_HID, activation="tanh")
        w, b = jnp.asarray(p["U"]), jnp.asarray(p["a"])
        self.cell.W.weight.value = {"weight": w, "bias": b}
        v, c = jnp.asarray(p["V"]), jnp.asarray(p["c"])
        self.readout = braintrace.nn.Linear(N_HID, N_OUT, w_init=v, b_init=c)

    def update(self, x):
        return self.readout(self.cell(x))


def vanilla_weights() -> dict[str, np.ndarray]:
    """The leaky layer's readout and data, and a recurrent cell's weight `U` on
    `[x; h]` (braintrace's `(in + hidden, hidden)` layout) and bias `a`."""
    p = weights_and_data()
    rng = np.random.RandomState(1)
    p["U"] = 0.8 * rng.normal(size=(N_IN + N_HID, N_HID))
    p["a"] = 0.3 * rng.normal(size=(N_HID,))
    return p


def half_squared_error(y, target):
    return 0.5 * jnp.sum((y - target) ** 2)


def online(
    model: brainstate.nn.Module,
    algorithm,
    xs,
    ys,
    *,
    mask=None,
    reduction: str = "sum",
    batch_size: int | None = None,
    **options,
) -> dict:
    """braintrace's online gradient of `sum_t mask_t loss_t`, by `etrace_grad`.

    With a batch, `xs` and `ys` carry it on axis 1 and each step's loss is the
    batch mean."""
    x0 = jnp.asarray(xs[0])
    learner = braintrace.compile(model, algorithm, x0, batch_size=batch_size, **options)

    def step_fn(x, y):
        out = learner(x)
        if batch_size is None:
            return half_squared_error(out, y)
        return jnp.mean(jax.vmap(half_squared_error)(out, y))

    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    grads = learner.etrace_grad(xs, ys, step_fn=step_fn, mask=mask, reduction=reduction)
    return {k: jax.tree.map(np.asarray, v) for k, v in grads.items()}


def bptt(model: brainstate.nn.Module, xs, ys) -> dict:
    """The gradient of the summed loss by back-propagation through time."""
    brainstate.nn.init_all_states(model)
    weights = model.states(brainstate.ParamState)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)

    def total():
        def one(x, y):
            return half_squared_error(model(x), y)

        return jnp.sum(brainstate.transform.for_loop(one, xs, ys))

    grads = brainstate.transform.grad(total, weights)()
    return {k: jax.tree.map(np.asarray, v) for k, v in grads.items()}


def layer(grads: dict) -> dict:
    """The gradient of the leaky layer's `{'weight': ..., 'bias': ...}`."""
    return grads[("layer", "weight")]


# -- sections ----------------------------------------------------------------------


def warmup() -> None:
    """ES-D-RTRL's warm-up correction, which braintrace always applies.

    braintrace divides the output trace by `1 - a^(t+1)` at every read-out; the
    page runs etrace with and without `bias_correction`."""
    p = weights_and_data()
    g = layer(
        online(Leaky(p), braintrace.ES_D_RTRL, p["xs"], p["ys"], decay_or_rank=0.5)
    )
    print("ES_D_RTRL(decay 0.5), leaky layer, T = 6, summed half squared error")
    print("layer weight gradient, (in, out):")
    print(g["weight"])
    print("layer bias gradient:", g["bias"])


def cutoff() -> None:
    """The warm-up correction stops once `running_index` reaches 1000.

    The gradient of the loss of step 999 alone, and of step 1000 alone (a mask
    that is 1 there and 0 elsewhere), with decay 0.999."""
    p = weights_and_data(length=1001)
    a = 0.999
    for step in (999, 1000):
        mask = jnp.zeros(1001).at[step].set(1.0)
        g = layer(
            online(
                Leaky(p),
                braintrace.ES_D_RTRL,
                p["xs"],
                p["ys"],
                mask=mask,
                decay_or_rank=a,
            )
        )
        norm = np.linalg.norm(g["weight"])
        print(
            f"ES_D_RTRL(decay {a}), gradient of step {step} alone: layer weight "
            f"[0, 0] {g['weight'][0, 0]:.10e}, norm {norm:.10e}; "
            f"1 / (1 - a^(t+1)) = {1 / (1 - a ** (step + 1)):.6f}"
        )


def bias() -> None:
    """A bias under the IO-factorised rule has no input trace.

    The bias gradient against the gradient of the same bias written as the weight
    of a constant input 1 (and the weight gradients of the two models)."""
    for decay, length in ((0.5, T), (0.9, 200)):
        p = weights_and_data(length)
        for name, algorithm, options in (
            (
                f"ES_D_RTRL(decay {decay})",
                braintrace.ES_D_RTRL,
                {"decay_or_rank": decay},
            ),
            ("D_RTRL", braintrace.D_RTRL, {}),
        ):
            g = layer(online(Leaky(p), algorithm, p["xs"], p["ys"], **options))
            col = Leaky(p, bias_as_weight=True)
            col = layer(online(col, algorithm, p["xs"], p["ys"], **options))
            as_weight = col["weight"][-1]
            ratio = np.linalg.norm(g["bias"]) / np.linalg.norm(as_weight)
            same = np.allclose(g["weight"], col["weight"][:-1], rtol=1e-12, atol=0)
            print(f"{name}, T = {length}:")
            print(f"  bias gradient               {g['bias']}")
            print(f"  the bias as a weight on 1   {as_weight}")
            print(f"  ratio of norms {ratio:.4f} (1 - a = {1 - decay:.2f})")
            print(f"  weight gradients equal to a relative 1e-12: {same}")


def gru() -> None:
    """braintrace's GRU gives its reset gate's weight `Wr` no online gradient.

    `Wr`'s output reaches the hidden state only through the candidate's weight
    `Wh`, so braintrace's compiler leaves it out (with a warning)."""
    p = weights_and_data(length=20)
    for name, algorithm, options in (
        ("D_RTRL", braintrace.D_RTRL, {}),
        ("ES_D_RTRL(decay 0.9)", braintrace.ES_D_RTRL, {"decay_or_rank": 0.9}),
    ):
        brainstate.random.seed(0)
        model = GRUNet()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = online(model, algorithm, p["xs"], p["ys"], **options)
        exact = bptt(model, p["xs"], p["ys"])
        print(f"{name}, braintrace.nn.GRUCell(3, 8) and a readout, T = 20:")
        for gate in ("Wz", "Wr", "Wh"):
            key = ("cell", gate, "weight")
            print(
                f"  {gate}: |online| {np.linalg.norm(g[key]['weight']):.4e} "
                f"(bias {np.linalg.norm(g[key]['bias']):.4e}), "
                f"|bptt| {np.linalg.norm(exact[key]['weight']):.4e}"
            )
        for w in caught:
            if "'Wr'" in str(w.message):
                print("  warning:", str(w.message))
                break


def drtrl() -> None:
    """D-RTRL's gradient of every parameter of the leaky layer and its readout.

    The page checks that etrace's is the same."""
    p = weights_and_data()
    g = online(Leaky(p), braintrace.D_RTRL, p["xs"], p["ys"])
    print("D_RTRL, leaky layer, T = 6, summed half squared error; (in, out) layout")
    for key in (("layer", "weight"), ("readout", "weight")):
        for leaf in ("weight", "bias"):
            print(f"{key[0]} {leaf}:")
            print(g[key][leaf])


def vanilla() -> None:
    """D-RTRL on braintrace's vanilla RNN cell (`ValinaRNNCell`, tanh).

    Its state reaches the next step only through the recurrent weight; the page
    checks the gradient against etrace's on `etrace.nn.ElmanCell`."""
    p = vanilla_weights()
    g = online(Vanilla(p), braintrace.D_RTRL, p["xs"], p["ys"])[("cell", "W", "weight")]
    print("D_RTRL, ValinaRNNCell(3, 4, activation='tanh') and a readout, T = 6:")
    print(f"  |gradient of W| {np.linalg.norm(g['weight']):.10e}")
    print(f"  |gradient of the bias| {np.linalg.norm(g['bias']):.10e}")


def reduction() -> None:
    """`etrace_grad` averages over the steps unless told `reduction='sum'`."""
    p = weights_and_data()
    mean = layer(
        online(Leaky(p), braintrace.D_RTRL, p["xs"], p["ys"], reduction="mean")
    )
    total = layer(
        online(Leaky(p), braintrace.D_RTRL, p["xs"], p["ys"], reduction="sum")
    )
    ratio = mean["weight"] / total["weight"]
    print(
        f"reduction='mean' / reduction='sum', T = {T}: "
        f"{ratio.min():.6f} .. {ratio.max():.6f}"
    )


def batch() -> None:
    """A batch's gradient against the mean of the examples' own gradients.

    The batch from `compile(..., batch_size=B)`, its loss the batch mean."""
    rng = np.random.RandomState(1)
    p = weights_and_data()
    B = 3
    xs = rng.normal(size=(T, B, N_IN))
    ys = rng.normal(size=(T, B, N_OUT))
    for name, algorithm, options in (
        ("D_RTRL", braintrace.D_RTRL, {}),
        ("ES_D_RTRL(decay 0.5)", braintrace.ES_D_RTRL, {"decay_or_rank": 0.5}),
    ):
        batched = layer(online(Leaky(p), algorithm, xs, ys, batch_size=B, **options))
        each = [
            layer(online(Leaky(p), algorithm, xs[:, i], ys[:, i], **options))
            for i in range(B)
        ]
        mean = {k: np.mean([e[k] for e in each], axis=0) for k in ("weight", "bias")}
        diff = max(np.max(np.abs(batched[k] - mean[k])) for k in mean)
        print(f"{name}, batch of {B}: largest |batched - mean of examples| {diff:.2e}")


def reset() -> None:
    """What `reset_state` and `brainstate.nn.reset_all_states` reset."""
    p = weights_and_data()

    class InitOnly(Leaky):
        """The same module with brainstate's default `reset_state`, which does
        nothing: a module that defines only `init_state`."""

        def reset_state(self, batch_size=None, **kwargs):
            brainstate.nn.Module.reset_state(self, batch_size, **kwargs)

    for cls in (Leaky, InitOnly):
        model = cls(p)
        learner = braintrace.compile(model, braintrace.D_RTRL, jnp.asarray(p["xs"][0]))

        def show(when: str) -> None:
            trace = learner.get_etrace_of(model.layer.weight)
            biggest = max(float(np.max(np.abs(t))) for t in jax.tree.leaves(trace))
            print(
                f"  {when}: |h| {float(jnp.linalg.norm(model.h.value)):.4f}, "
                f"largest |trace| {biggest:.4f}, "
                f"running_index {int(learner.running_index.value)}"
            )

        def run() -> None:
            for x in p["xs"]:
                learner(jnp.asarray(x))

        print(
            f"D_RTRL, leaky layer ({'with' if cls is Leaky else 'without'} reset_state)"
        )
        run()
        show("after 6 steps")
        learner.reset_state()
        show("then learner.reset_state()")
        run()
        brainstate.nn.reset_all_states(model)
        show("6 more steps, then brainstate.nn.reset_all_states(model)")
        run()
        brainstate.nn.reset_all_states(learner)
        show("6 more steps, then brainstate.nn.reset_all_states(learner)")


def dtype() -> None:
    """The dtype of weights, states and gradients, from brainstate's precision.

    With `jax_enable_x64` on, under `precision=32` (brainstate's default) and
    `precision=64`."""
    p = weights_and_data()
    for precision in (32, 64):
        brainstate.environ.set(precision=precision)
        model = Leaky(p)  # float64 weights, given as arrays
        brainstate.random.seed(0)
        fresh = braintrace.nn.Linear(N_IN, N_HID)
        g = layer(online(model, braintrace.D_RTRL, p["xs"], p["ys"]))
        print(
            f"precision={precision}: braintrace.nn.Linear(3, 4) initialises "
            f"{fresh.weight.value['weight'].dtype}; given float64 arrays, the layer "
            f"holds {model.layer.weight.value['weight'].dtype}, the hidden state is "
            f"{model.h.value.dtype}, the gradient {g['weight'].dtype}"
        )
    brainstate.environ.set(precision=64)


def eprop() -> None:
    """braintrace's `EProp(kappa_filter_decay=k)` filters every weight's trace.

    Here on the leaky layer, which feeds only a memoryless readout; compared with
    braintrace's `D_RTRL`."""
    p = weights_and_data()
    d_rtrl = layer(online(Leaky(p), braintrace.D_RTRL, p["xs"], p["ys"]))
    for kappa in (0.0, 0.9):
        g = online(
            Leaky(p), braintrace.EProp, p["xs"], p["ys"], kappa_filter_decay=kappa
        )
        diff = np.linalg.norm(layer(g)["weight"] - d_rtrl["weight"])
        rel = diff / np.linalg.norm(d_rtrl["weight"])
        print(
            f"EProp(kappa_filter_decay={kappa}) against D_RTRL: "
            f"relative difference {rel:.4f}"
        )


SECTIONS: dict[str, Callable[[], None]] = {
    "warmup": warmup,
    "cutoff": cutoff,
    "bias": bias,
    "gru": gru,
    "drtrl": drtrl,
    "vanilla": vanilla,
    "reduction": reduction,
    "batch": batch,
    "reset": reset,
    "dtype": dtype,
    "eprop": eprop,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"any of: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    names = ("braintrace", "brainstate", "brainpy", "braintools", "brainunit", "jax")
    print(", ".join(f"{n} {importlib.metadata.version(n)}" for n in names))
    brainstate.environ.set(precision=64)
    for name in args.sections or SECTIONS:
        doc = SECTIONS[name].__doc__ or ""
        print(f"\n== {name}: {doc.splitlines()[0]}")
        SECTIONS[name]()


if __name__ == "__main__":
    main()
