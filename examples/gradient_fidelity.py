"""Gradient fidelity: how close every online algorithm's gradient comes to BPTT on
one recurrent spiking network.

The network is the recurrent spiking layer of `docs/nn.md`: one `eqx.nn.Linear`
reads the input and the layer's previous spikes into `--hidden` LIF neurons, and a
linear map and a leaky integrator (`etrace.nn.LeakyRateReadout`) read the spikes
out. Every algorithm etrace ships applies to it: the whole-state ones (RTRL,
SnAp, UORO, KF-RTRL) form the full hidden-to-hidden Jacobian, the diagonal ones (D-RTRL,
e-prop, OSTL, OTTT, OTPE, OSTTP) keep per-neuron traces, ES-D-RTRL keeps factored
ones. The input is a batch of Bernoulli spike trains and the target a sine wave
per output with a random phase; the loss is the mean squared error at every step.

For each algorithm, `etrace.compare` runs `etrace.online_grad` and the BPTT oracle
`etrace.bptt_grad` on the same batch from the same initial state, and reports per
parameter the relative error `|g - g_bptt| / |g_bptt|` and the cosine similarity.
The script prints, per algorithm, both measures over all parameters together and
the cosine of the recurrent weight and of the readout weight; which parameters the
algorithm's maths says should be exact here (`etrace.testing.exact_regime`); and the
trace memory per example. It saves a bar plot of the cosines and relative errors.

What to expect on this model: RTRL is exact (it keeps the full sensitivity).
SnAp-n drops the paths that need more than n steps of the unit graph. D-RTRL,
e-prop without filter and OSTL without H keep each neuron's own dynamics only; the
recurrent weight's paths through other neurons are lost. e-prop's filter `kappa`,
set to the readout's leak, restores the readout's memory of past spikes (OTPE with
the same leak computes the same thing). OTTT keeps only a presynaptic trace. UORO
and KF-RTRL are unbiased but noisy (KF-RTRL less: its Kronecker factors keep the
input and output sides of each weight apart): the script gives every example of the
batch its own random signs, and averages `--uoro-samples` independent runs of each.
OSTTP's learning signal is a fixed random projection of the target: it is not meant
to follow the gradient. DNI-trunc is `etrace.DNI` over RTRL with chunks of 4 steps
and its predictor untrained (zero): truncated BPTT, the baseline that a trained
synthetic gradient improves on (see `docs/algorithms/dni.md`).

It runs in float64 by default, where exact means agreement to about 1e-15.

```
python examples/gradient_fidelity.py                  # about a minute on 2 CPUs
python examples/gradient_fidelity.py --per-parameter  # every parameter's row
python examples/gradient_fidelity.py --hidden 4 --length 8 --batch 2
```
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import _common  # shared with the other examples
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import matplotlib
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm import tqdm

import etrace
import etrace.nn as enn
import etrace.testing as et


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class RecurrentSNN(eqx.Module):
    """A recurrent LIF layer with a linear map and a leaky readout."""

    synapses: eqx.nn.Linear
    lif: enn.LIF
    readout: eqx.nn.Linear
    output: enn.LeakyRateReadout

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_out: int,
        *,
        tau: float,
        tau_out: float,
        input_scale: float,
        key: PRNGKeyArray,
    ):
        k1, k2 = jr.split(key)
        synapses = eqx.nn.Linear(n_in + hidden, hidden, key=k1)
        # Stronger input weights, so that the sparse input spikes make the layer
        # fire: a comparison on a silent network would be vacuous.
        scale = jnp.concatenate([jnp.full(n_in, input_scale), jnp.ones(hidden)])
        self.synapses = eqx.tree_at(
            lambda s: s.weight, synapses, synapses.weight * scale[None, :]
        )
        self.lif = enn.LIF(hidden, tau=tau, threshold=0.5)
        self.readout = eqx.nn.Linear(hidden, n_out, key=k2)
        self.output = enn.LeakyRateReadout(n_out, tau=tau_out)

    def __call__(self, x: Float[Array, " n_in"], state: eqx.nn.State):
        previous = self.lif.spikes(state)  # z^{t-1}
        current = self.synapses(jnp.concatenate([x, previous]))
        z, state = self.lif(current, state)
        return self.output(self.readout(z), state)


def mse(y: Float[Array, " K"], target: Float[Array, " K"]) -> Float[Array, ""]:
    return jnp.mean((y - target) ** 2)


def algorithms(leak: float, kappa: float) -> dict[str, etrace.AbstractAlgorithm]:
    """Every shipped algorithm, with the hyper-parameters this model suggests.

    `leak` is the LIF membrane's `exp(-1/tau)`, `kappa` the readout's.
    """
    return {
        "RTRL": etrace.RTRL(),
        "SnAp-1": etrace.SnAp(1),
        "SnAp-2": etrace.SnAp(2),
        "UORO": etrace.UORO(),
        "KF-RTRL": etrace.KF_RTRL(),
        "DNI-trunc": etrace.DNI(etrace.RTRL(), every=4),
        "D-RTRL": etrace.D_RTRL(),
        "ES-D-RTRL": etrace.ES_D_RTRL(decay=leak),
        "e-prop": etrace.EProp(),
        "e-prop-kappa": etrace.EProp(kappa=kappa),
        "e-prop-random": etrace.EProp(feedback="random", kappa=kappa),
        "OSTL-ff": etrace.OSTLFeedforward(),
        "OSTL-rec": etrace.OSTLRecurrent(),
        "OTTT-A": etrace.OTTT(decay=leak),
        "OTTT-O": etrace.OTTT(mode="O"),
        "OTPE": etrace.OTPE(kappa),
        "F-OTPE": etrace.OTPE(kappa, approx=True),
        "OSTTP": etrace.OSTTP(),
    }


def flat(tree: Any) -> Array:
    leaves = jtu.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def agreement(online: Any, bptt: Any) -> tuple[float, float]:
    """Relative error and cosine similarity over all parameters together."""
    a, b = flat(online), flat(bptt)
    nb = float(jnp.linalg.norm(b))
    na = float(jnp.linalg.norm(a))
    error = float(jnp.linalg.norm(a - b)) / nb
    cosine = float(jnp.dot(a, b)) / (na * nb) if na > 0 else 0.0
    return error, cosine


def trace_bytes(learner: etrace.Learner) -> int:
    """Bytes of the algorithm's traces for one example (shapes only)."""
    shapes = jax.eval_shape(learner.init)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jtu.tree_leaves(shapes.traces)
    )


def exact_parameters(regime: et.Regime) -> str:
    """The parameters whose gradient should equal BPTT, in a few words."""
    if regime.exact:
        return "all"
    exact = [p for p, ok in regime.params.items() if ok]
    if not exact:
        return "none"
    layers = sorted({p.split(".")[0] for p in exact})
    return "+".join(layers)


def unexpected(regime: et.Regime, rows: dict[str, tuple[float, ...]], rtol: float):
    """The parameters expected to equal BPTT whose relative error exceeds `rtol`."""
    return [p for p, ok in regime.params.items() if ok and rows[p][0] > rtol]


@eqx.filter_jit
def online_gradient(learner, model, trace_state, xs, targets):
    grads, _, _ = etrace.online_grad(learner, mse, model, trace_state, xs, targets)
    return eqx.filter(grads, eqx.is_inexact_array)


def uoro_gradient(learner, model, xs, targets, samples: int, key: PRNGKeyArray):
    """The mean of `samples` gradients of a random estimator (UORO, KF-RTRL), each
    example with its own signs."""
    batch = xs.shape[1]
    total = None
    for sample_key in jr.split(key, samples):
        ts = learner.init(batch_size=batch)
        keys = jr.key_data(jr.split(sample_key, batch))
        ts = eqx.tree_at(lambda t: t.traces["key"], ts, keys)
        grads = online_gradient(learner, model, ts, xs, targets)
        total = grads if total is None else jtu.tree_map(jnp.add, total, grads)
    return jtu.tree_map(lambda g: g / samples, total)


def plot(rows: dict[str, dict[str, Any]], params: Sequence[str], out: str) -> None:
    """`1 - cosine` (per parameter and overall) and relative error, log scale: the
    exact algorithms sit at round-off, far below the approximations."""
    names = list(rows)
    x = np.arange(len(names))
    floor = 1e-17  # where round-off gives exactly 0 (or a hair below)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    series = [("all parameters", None)] + [(p, p) for p in params]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        values = [
            1 - (rows[n]["cosine"] if key is None else rows[n]["per_parameter"][key][1])
            for n in names
        ]
        offset = (i - (len(series) - 1) / 2) * width
        top.bar(x + offset, np.maximum(values, floor), width, label=label)
    top.set_yscale("log")
    top.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    top.set_ylabel("1 - cosine to BPTT")
    top.set_ylim(floor / 3, 1e5)  # room for the legend above the bars
    top.legend(loc="upper center", ncol=len(series), fontsize=8)
    errors = [max(rows[n]["error"], floor) for n in names]
    bottom.bar(x, errors, 0.6, color="tab:red")
    bottom.set_yscale("log")
    bottom.set_ylabel("relative error, all parameters")
    bottom.set_xticks(x, names, rotation=40, ha="right")
    fig.suptitle(
        "Online gradients against BPTT, recurrent LIF with leaky readout "
        "(lower is closer; dashed: orthogonal)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    parser.add_argument("--hidden", type=int, default=16, help="LIF neurons")
    parser.add_argument("--inputs", type=int, default=8, help="input channels")
    parser.add_argument("--outputs", type=int, default=2, help="readout size")
    parser.add_argument("--length", type=int, default=40, help="time steps")
    parser.add_argument("--batch", type=int, default=8, help="sequences")
    parser.add_argument("--rate", type=float, default=0.2, help="input spike prob.")
    parser.add_argument("--tau", type=float, default=10.0, help="membrane tau")
    parser.add_argument("--tau-out", type=float, default=5.0, help="readout tau")
    parser.add_argument(
        "--input-scale", type=float, default=3.0, help="input weight multiplier"
    )
    parser.add_argument(
        "--uoro-samples", type=int, default=20, help="UORO and KF-RTRL runs averaged"
    )
    parser.add_argument(
        "--float32", action="store_true", help="run in float32 (default: float64)"
    )
    parser.add_argument(
        "--per-parameter",
        action="store_true",
        help="also print `etrace.compare`'s table for every algorithm",
    )
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=None,
        metavar="NAME",
        help="a subset, by the names in the table (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="gradient_fidelity.png", help="output PNG")
    args = parser.parse_args(argv)
    if min(args.hidden, args.inputs, args.outputs, args.length, args.batch) < 1:
        parser.error("sizes must be at least 1")
    if not 0 < args.rate <= 1:
        parser.error("--rate must lie in (0, 1]")
    if args.uoro_samples < 1:
        parser.error("--uoro-samples must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Compares every algorithm with BPTT; returns the numbers of the table."""
    args = parse_args(argv)
    precision: Callable[[], Any] = (
        contextlib.nullcontext if args.float32 else et.float64
    )
    with precision():
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    model_key, x_key, phase_key, uoro_key = jr.split(jr.key(args.seed), 4)
    model, state = eqx.nn.make_with_state(RecurrentSNN)(
        args.inputs,
        args.hidden,
        args.outputs,
        tau=args.tau,
        tau_out=args.tau_out,
        input_scale=args.input_scale,
        key=model_key,
    )
    dtype = model.synapses.weight.dtype
    shape = (args.length, args.batch, args.inputs)
    xs = jr.bernoulli(x_key, args.rate, shape).astype(dtype)
    phase = jr.uniform(phase_key, (args.batch, args.outputs), dtype, 0, 2 * math.pi)
    steps = jnp.arange(args.length, dtype=dtype)[:, None, None]
    targets = jnp.sin(2 * math.pi * steps / args.length + phase[None])

    live = et.liveness(model, xs[:, 0], state=state)
    rate = float(np.mean([np.mean(r) for r in live.rates.values()]))
    leak, kappa = math.exp(-1 / args.tau), math.exp(-1 / args.tau_out)
    table = algorithms(leak, kappa)
    names = args.algorithms or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown algorithms {unknown}; choose from {list(table)}")
    print(
        f"recurrent LIF x {args.hidden}, {args.inputs} inputs, leaky readout x "
        f"{args.outputs}; T={args.length}, batch {args.batch}, {dtype.name}; "
        f"hidden firing rate {rate:.3f} (live: {live.live})",
        flush=True,
    )

    # Where an algorithm should be exact, it must agree to round-off.
    rtol = 1e-4 if dtype == jnp.float32 else 1e-9
    rows: dict[str, dict[str, Any]] = {}
    wall = time.perf_counter()
    sample = jnp.zeros(args.inputs, dtype)
    for name in tqdm(names, desc="compare", unit="algorithm"):
        algorithm = table[name]
        learner, _ = etrace.compile(model, sample, state=state, algorithm=algorithm)
        ts = learner.init(batch_size=args.batch)
        result = etrace.compare(learner, mse, model, ts, xs, targets)
        online = result.online
        if isinstance(algorithm, (etrace.UORO, etrace.KF_RTRL)):
            online = uoro_gradient(
                learner, model, xs, targets, args.uoro_samples, uoro_key
            )
            result = etrace.Comparison(
                _per_parameter(online, result.bptt), online, result.bptt
            )
        error, cosine = agreement(online, result.bptt)
        regime = et.exact_regime(algorithm, learner)
        rows[name] = dict(
            error=error,
            cosine=cosine,
            per_parameter={p: (r[0], r[1]) for p, r in result.rows.items()},
            exact=exact_parameters(regime),
            not_exact=unexpected(regime, result.rows, rtol),
            trace_bytes=trace_bytes(learner),
            comparison=result,
        )
    wall = time.perf_counter() - wall

    shown = ["synapses.weight", "readout.weight"]
    head = (
        "algorithm",
        "cosine",
        "rel. error",
        *(f"cos {p}" for p in shown),
        "should be exact",
        "trace/example",
    )
    body = [
        (
            name,
            f"{r['cosine']:.6f}",
            f"{r['error']:.2e}",
            *(f"{r['per_parameter'][p][1]:.4f}" for p in shown),
            r["exact"],
            f"{r['trace_bytes'] / 1024:.1f} KiB",
        )
        for name, r in rows.items()
    ]
    _common.print_table(head, body)
    print(
        "cosine, rel. error: all parameters together; should be exact: the "
        "parameters `etrace.testing.exact_regime` expects to equal BPTT"
    )
    for name, r in rows.items():
        if r["not_exact"]:
            print(
                f"NOTE: {name} should equal BPTT on {r['not_exact']} but its "
                f"relative error there exceeds {rtol:g}"
            )
    for name in ("UORO", "KF-RTRL"):
        if name in rows:
            print(f"{name}: mean of {args.uoro_samples} runs")
    if args.per_parameter:
        for name, r in rows.items():
            print(f"\n{name}\n{r['comparison']}")
    print(f"wall time {wall:.1f} s")

    plot(rows, shown, args.plot)
    print(f"saved {args.plot}")
    for r in rows.values():
        del r["comparison"]
    return rows


def _per_parameter(online: Any, bptt: Any) -> dict[str, tuple[float, ...]]:
    """`etrace.compare`'s per-parameter rows for a gradient computed elsewhere."""
    out = {}
    pairs = jtu.tree_flatten_with_path(eqx.filter(bptt, eqx.is_inexact_array))[0]
    mine = jtu.tree_leaves(eqx.filter(online, eqx.is_inexact_array))
    for (path, b), a in zip(pairs, mine):
        a, b = jnp.ravel(a), jnp.ravel(b)
        na, nb = float(jnp.linalg.norm(a)), float(jnp.linalg.norm(b))
        error = float(jnp.linalg.norm(a - b)) / nb if nb > 0 else float(na > 0)
        cosine = float(jnp.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0
        name = jtu.keystr(path)
        out[name.removeprefix(".")] = (error, cosine, na, nb)
    return out


if __name__ == "__main__":
    main()
