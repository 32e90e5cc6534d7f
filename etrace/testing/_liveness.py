"""Is a network live on some data: does it spike, and are its units unsaturated?"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _ir
from .._analysis import initial_state, split_model, trace
from .._interpret import CALLS


_SATURATING = {"tanh": 0.99, "logistic": 0.99}


@dataclasses.dataclass(frozen=True)
class Liveness:
    """What `liveness` found.

    **Attributes:**

    - `rates`: per spike function (a `custom_jvp`/`custom_vjp` call whose outputs are
        all 0 or 1), its mean firing rate over the sequence.
    - `saturation`: per `tanh`/`sigmoid`, the fraction of outputs within 1% of its
        bounds.
    - `live`: every spike function fires sometimes but not always, and no saturating
        unit is saturated everywhere.
    """

    rates: dict[str, float]
    saturation: dict[str, float]

    @property
    def live(self) -> bool:
        spiking = all(0.0 < r < 1.0 for r in self.rates.values())
        return spiking and all(s < 1.0 for s in self.saturation.values())

    def __str__(self) -> str:
        lines = []
        for name, rate in self.rates.items():
            flag = (
                ""
                if 0 < rate < 1
                else "   <- never fires"
                if rate == 0
                else ("   <- always fires")
            )
            lines.append(f"firing rate {rate:.3f}  {name}{flag}")
        for name, sat in self.saturation.items():
            flag = "   <- saturated" if sat >= 1.0 else ""
            lines.append(f"saturated   {sat:.3f}  {name}{flag}")
        return "\n".join(lines) or "(no spike functions or saturating units found)"


def liveness(model: Any, xs: Any, *, state: Any = None) -> Liveness:
    """Firing rates and saturation of a model run over a sequence.

    Spike functions are found in the model's jaxpr: every `custom_jvp`/`custom_vjp`
    call whose outputs are all 0 or 1 on this data counts as one.

    **Arguments:**

    - `model`: the model, `model(x, state) -> (y, state)`.
    - `xs`: one sequence, time on axis 0 (unbatched).
    - `state`: the initial state (default `eqx.nn.State(model)`).

    **Returns:**

    A `Liveness` report; `report.live` says whether a gradient comparison on this data
    means something.
    """
    state = initial_state(model, state)
    sample = jtu.tree_map(lambda a: a[0], xs)
    traced = trace(model, sample, state)
    program, n_y = traced.program, traced.n_y
    watched = [
        (i, e)
        for i, e in enumerate(program.eqns)
        if e.name in CALLS or e.name in _SATURATING
    ]
    dyn, _, _ = split_model(model)
    state_leaves, state_def = jtu.tree_flatten(state)

    def body(dyn, leaves, x):
        env = dict(program.consts)
        env.update(zip(program.invars, list(dyn) + list(leaves) + jtu.tree_leaves(x)))
        _ir.evaluate(program, range(len(program.eqns)), env)
        new = [
            v.val if isinstance(v, _ir.Lit) else env[v] for v in program.outvars[n_y:]
        ]
        stats = []
        for _, e in watched:
            out = env[e.outs[0]]
            if e.name in _SATURATING:
                if e.name == "tanh":
                    sat = jnp.mean(jnp.abs(out) >= _SATURATING["tanh"])
                else:
                    sat = jnp.mean((out <= 0.01) | (out >= 0.99))
                stats.append((sat, jnp.asarray(True)))
            else:
                binary = jnp.all((out == 0) | (out == 1))
                stats.append((jnp.mean(out), binary))
        return new, stats

    def run(dyn, leaves, xs):
        _, stats = jax.lax.scan(functools.partial(body, dyn), leaves, xs)
        return [(jnp.mean(value), jnp.all(binary)) for value, binary in stats]

    # One program (the scan and its reductions), fetched at once; the weights are
    # its arguments, not constants baked into it.
    leaves = [jnp.asarray(a) for a in state_leaves]
    stats = jax.device_get(jax.jit(run)(list(dyn), leaves, xs))
    rates: dict[str, float] = {}
    saturation: dict[str, float] = {}
    for (i, e), (value, binary) in zip(watched, stats):
        where = e.source.strip() or f"equation {i}"
        if e.name in _SATURATING:
            name = "sigmoid" if e.name == "logistic" else e.name
            _unique(saturation, f"{name} at {where}", float(value))
        elif bool(binary):
            fn = e.params.get("name", e.name)
            _unique(rates, f"{fn} at {where}", float(value))
    return Liveness(rates, saturation)


def _unique(table: dict[str, float], key: str, value: float) -> None:
    """Adds `value` under `key`, numbering repeats (one layer class used twice)."""
    name, count = key, 1
    while name in table:
        count += 1
        name = f"{key} #{count}"
    table[name] = value
